"""Session-wide fixtures: the real SmolLM2 tokenizer/model folder and tiny test models built from it."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from tokenwire.serving.model_resolver import resolve_model
from tokenwire.v1 import engine_pb2_grpc

from tests.tiny_models import build_echo_llama, build_tiny_gpt2, build_tiny_llama


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted default model (built once into $TOKENWIRE_HOME, ~30 s the first time)."""
    return resolve_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory) -> str:
    return str(build_tiny_llama(smollm2_dir, tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(smollm2_dir, tmp_path_factory) -> str:
    return str(build_tiny_gpt2(smollm2_dir, tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def echo_llama_dir(smollm2_dir, tmp_path_factory) -> str:
    """A tiny Llama whose greedy output mostly repeats itself: drafts are accepted, and some turned away."""
    return str(build_echo_llama(smollm2_dir, tmp_path_factory.mktemp("echo-llama")))


# ---- over a module's own `gateway` and `services` fixtures (the gateway test modules) ----


@pytest.fixture(scope="module")
def oai(gateway):
    """The official OpenAI client on the module's gateway."""
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def model(gateway) -> str:
    return httpx.get(gateway.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def engine_stub(services):
    """A stub on the module's engine, for GetModelInfo (its encode count)."""
    with grpc.insecure_channel(services[1].address) as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)
