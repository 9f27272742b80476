"""docker-compose.yml, proven without a Docker engine.

1. The file validates against the Compose Specification's JSON schema. tests/data/compose-spec.json is the
   official schema (compose-spec/compose-spec, Apache-2.0) as shipped in the PyPI package
   docker-compose==1.29.2 (compose/config/compose_spec.json); the file uses no key newer than it.
2. The operational wiring the deployment relies on is checked key by key.
3. Each service's `command` runs with its `environment` as local processes on free ports: one tokenizer
   and two engine replicas (what `--scale engine=2` starts), with the compose healthchecks' own commands,
   a generation through the SDK, round robin over both replicas, and the JSON logs of both services
   carrying the request id the SDK set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tokenwire.client import Client
from tokenwire.serving.healthcheck import main as healthcheck_main
from tokenwire.serving.launcher import command

from tests.compose_file import COMPOSE_FILE, ComposeProcess, interpolate, load_compose

ROOT = COMPOSE_FILE.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
GPU_FILE = ROOT / "docker-compose.gpu.yml"
SERVICES = ("tokenizer", "engine")
TOKENIZER_PORT, ENGINE_PORT, METRICS_PORT, GATEWAY_PORT = 50051, 50052, 9090, 8000


# The schema names two formats of its own; compose's grammar for them (checked once values are interpolated).
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("duration")(lambda v: re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms|us|ns))+", str(v)) is not None)
FORMATS.checks("ports")(
    lambda v: (
        re.fullmatch(
            r"((\d{1,3}(\.\d{1,3}){3}:|\[[0-9a-fA-F:]+\]:)?(\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?", str(v)
        )
        is not None
    )
)


def _schema_errors(document: dict, check_formats: bool = True) -> list[str]:
    # The file says draft 2019-09 (under a non-canonical URL, so it is named here rather than looked up).
    validator = jsonschema.Draft201909Validator(SCHEMA, format_checker=FORMATS if check_formats else None)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


# ---- the file itself ----


@pytest.mark.parametrize("path", [COMPOSE_FILE, GPU_FILE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    raw = yaml.safe_load(path.read_text())
    assert _schema_errors(raw, check_formats=False) == []  # ${...} placeholders are not ports yet
    assert _schema_errors(interpolate(raw, {})) == []  # after ${VAR:-default} interpolation, as compose validates


def test_the_schema_catches_mistakes():
    compose = load_compose()
    compose["services"]["engine"]["helthcheck"] = compose["services"]["engine"].pop("healthcheck")
    compose["services"]["tokenizer"]["depends_on"] = {"engine": {"condition": "service_happy"}}
    compose["services"]["tokenizer"]["stop_grace_period"] = "15 seconds"
    compose["services"]["tokenizer"]["ports"] = ["50051:50051:50051"]
    errors = "\n".join(_schema_errors(compose))
    assert "'helthcheck' does not match" in errors, errors
    for path in ("depends_on", "stop_grace_period", "ports/0"):
        assert f"services/tokenizer/{path}:" in errors, errors


def test_services_are_wired_for_operations():
    compose = load_compose()
    services = compose["services"]
    assert set(compose["volumes"]) == {"models"}
    for name in SERVICES:
        service = services[name]
        port = TOKENIZER_PORT if name == "tokenizer" else ENGINE_PORT
        assert service["command"][0] == f"tokenwire-{name}"
        assert service["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "tokenwire.serving.healthcheck",
            "--quiet",
            f"127.0.0.1:{port}",
        ]
        assert service["restart"] == "unless-stopped"
        assert "models:/data/tokenwire" in service["volumes"]  # the shared model cache, a named volume
        assert set(service["deploy"]["resources"]["limits"]) == {"cpus", "memory"}
        assert {"env_file", "configs", "secrets"}.isdisjoint(service)  # env vars and flags only
        env = service["environment"]
        assert env["TOKENWIRE_LOG_FORMAT"] == "json" and env["TOKENWIRE_MODEL"] == "smollm2-135m"
        # Docker's SIGKILL must come after the drain grace period, never during it.
        assert float(service["stop_grace_period"].rstrip("s")) > float(env["TOKENWIRE_DRAIN_GRACE_S"])
    assert services["engine"]["depends_on"] == {"tokenizer": {"condition": "service_healthy"}}
    # A host port *range* per engine port: `--scale engine=N` gives every replica its own host port.
    engine_ports = [p.split(":") for p in services["engine"]["ports"]]
    assert [(host.count("-"), int(target)) for host, target in engine_ports] == [(1, ENGINE_PORT), (1, METRICS_PORT)]
    gateway = services["gateway"]
    assert gateway["command"] == ["tokenwire-gateway", "--port", str(GATEWAY_PORT)]
    assert gateway["ports"] == [f"{GATEWAY_PORT}:{GATEWAY_PORT}"]
    assert gateway["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "tokenwire.gateway.healthcheck",
        "--quiet",
        f"127.0.0.1:{GATEWAY_PORT}",
    ]
    assert gateway["depends_on"] == {name: {"condition": "service_healthy"} for name in SERVICES}
    assert gateway["environment"]["TOKENWIRE_ENGINE"] == f"dns:///engine:{ENGINE_PORT}"
    assert float(gateway["stop_grace_period"].rstrip("s")) > float(gateway["environment"]["TOKENWIRE_DRAIN_GRACE_S"])
    assert services["client"]["environment"]["TOKENWIRE_ENGINE"] == f"dns:///engine:{ENGINE_PORT}"
    assert services["client"]["profiles"] == ["tools"]


def test_healthcheck_fails_without_a_serving_server(capsys):
    from tokenwire.serving.launcher import free_port

    assert healthcheck_main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# ---- the services, run as compose would run them ----


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir, tmp_path_factory):
    """tokenizer + 2 engine replicas from docker-compose.yml, the operator's shell choosing the model."""
    shell = {"TOKENWIRE_MODEL": tiny_llama_dir, "TOKENWIRE_DEVICE": "cpu", "TOKENWIRE_KV_CACHE_MEMORY_GB": "0.05"}
    services = load_compose(shell)["services"]
    logs, home = tmp_path_factory.mktemp("compose-logs"), tmp_path_factory.mktemp("tokenwire-home")
    _share_built_kernels(home)
    processes = [
        ComposeProcess("tokenizer", services["tokenizer"], logs / "tokenizer.log"),
        *(ComposeProcess(f"engine-{i}", services["engine"], logs / f"engine-{i}.log") for i in (1, 2)),
    ]
    for process in processes:
        process.start(home)
    try:
        tokenizer, *engines = processes
        target = "ipv4:" + ",".join(e.address(ENGINE_PORT) for e in engines)  # what DNS gives for N replicas
        with Client(tokenizer.address(TOKENIZER_PORT), target, timeout=60) as client:
            _wait_ready(client, processes)
            yield tokenizer, engines, client, services
    finally:
        for process in processes:
            process.process.terminate()
        codes = [process.process.wait(60) for process in processes]
    assert codes == [0, 0, 0], [p.log_lines()[-20:] for p in processes]  # SIGTERM drains, then exit 0


def _share_built_kernels(home: Path) -> None:
    """The volume's kernels are this run's: a fresh volume would have both replicas compile them first
    (~2-3 min on 2 cores), which tests the compiler, not the compose wiring."""
    from tokenwire.serving.model_resolver import tokenwire_home

    built = tokenwire_home() / "kernels"
    if built.is_dir():
        (home / "kernels").symlink_to(built, target_is_directory=True)


def _wait_ready(client: Client, processes: list[ComposeProcess]) -> None:
    for process in processes:  # fail fast, with its log, if a service died while starting
        if process.process.poll() is not None:
            log = "\n".join(process.log_lines())
            raise RuntimeError(f"{process.name} exited {process.process.returncode}:\n{log}")
    client.wait_ready(timeout=180)
    for engine in processes[1:]:
        with Client(None, engine.address(ENGINE_PORT)) as single:
            single.wait_ready(timeout=180)


def test_compose_healthchecks_report_serving(deployment):
    tokenizer, engines, _, _ = deployment
    for process in (tokenizer, *engines):
        result = subprocess.run(process.healthcheck_argv(), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (process.name, result.stderr)


def test_generation_through_the_compose_services(deployment):
    _, _, client, _ = deployment
    completion = client.complete("The capital of France is", max_new_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8 and completion.text


def test_round_robin_spreads_calls_over_the_engine_replicas(deployment):
    _, engines, client, _ = deployment
    before = [_generate_calls(engine) for engine in engines]
    for _ in range(6):
        client.complete(token_ids=[1, 2, 3, 4], max_new_tokens=2, temperature=0)
    served = [_generate_calls(engine) - b for engine, b in zip(engines, before)]
    assert sum(served) == 6 and min(served) >= 2, served  # 3/3 once both replicas are known ready


def test_the_client_service_generates_through_a_dns_target(deployment):
    """The compose `client` service's command and environment, `engine` resolved through dns:///."""
    tokenizer, engines, _, services = deployment
    spec = services["client"]
    env = {
        **spec["environment"],
        "TOKENWIRE_TOKENIZER": tokenizer.address(TOKENIZER_PORT),
        "TOKENWIRE_ENGINE": spec["environment"]["TOKENWIRE_ENGINE"].replace(
            f"engine:{ENGINE_PORT}", engines[0].address(ENGINE_PORT)
        ),
    }
    argv = command(spec["command"][0]) + spec["command"][1:]
    result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_both_services_log_the_sdk_request_id_as_json(deployment):
    tokenizer, engines, client, _ = deployment
    request_id = f"compose-test-{uuid.uuid4().hex[:8]}"
    client.complete("Hello there", max_new_tokens=4, temperature=0, request_id=request_id)
    # TOKENWIRE_LOG_FORMAT=json: every line of both services' output is one JSON object.
    lines = {p.name: [json.loads(line) for line in p.log_lines()] for p in (tokenizer, *engines)}
    tagged = {name: [r for r in records if r.get("request_id") == request_id] for name, records in lines.items()}
    assert {r["rpc"] for r in tagged["tokenizer"] if "rpc" in r} >= {"Encode"}  # text comes from the engine
    engine_rpcs = [r["rpc"] for name, records in tagged.items() if name != "tokenizer" for r in records if "rpc" in r]
    assert engine_rpcs == ["Generate"]
    assert all(r["code"] == "OK" for records in tagged.values() for r in records if "code" in r)


def test_the_gateway_service_serves_openai_clients(deployment, tmp_path):
    """The compose `gateway` command and environment, its targets pointed at the local processes: its
    healthcheck passes, the openai client gets a chat completion, and SIGTERM ends it with 0."""
    tokenizer, engines, _, services = deployment
    spec = dict(services["gateway"])
    spec["environment"] = {
        **spec["environment"],
        "TOKENWIRE_TOKENIZER": tokenizer.address(TOKENIZER_PORT),
        "TOKENWIRE_ENGINE": spec["environment"]["TOKENWIRE_ENGINE"].replace(
            f"engine:{ENGINE_PORT}", engines[0].address(ENGINE_PORT)
        ),
    }
    gateway = ComposeProcess("gateway", spec, tmp_path / "gateway.log").start(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(gateway.healthcheck_argv(), capture_output=True, timeout=30).returncode != 0:
            assert gateway.process.poll() is None and time.monotonic() < deadline, gateway.log_lines()[-20:]
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://{gateway.address(GATEWAY_PORT)}/v1", api_key="x", max_retries=0) as oai:
            reply = oai.chat.completions.create(
                model=spec["environment"]["TOKENWIRE_SERVED_MODEL_NAME"],
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
            )
        assert reply.usage.completion_tokens == 4
        assert all(json.loads(line) for line in gateway.log_lines())  # JSON logs, one object a line
    finally:
        gateway.process.terminate()
    assert gateway.process.wait(60) == 0


def _generate_calls(process: ComposeProcess) -> float:
    text = urllib.request.urlopen(f"http://{process.address(METRICS_PORT)}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenwire_rpc_requests_total" and sample.labels.get("rpc") == "Generate":
                return sample.value
    return 0.0
