"""Session-wide fixtures: the real SmolLM2 tokenizer/model folder and tiny test models built from it."""

from __future__ import annotations

import pytest
from tokenwire.serving.model_resolver import resolve_model

from tests.tiny_models import build_tiny_gpt2, build_tiny_llama


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
