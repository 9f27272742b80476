"""`docker compose up` on a small host: Docker refuses a container whose CPU limit exceeds the host's CPU
count ("Range of CPUs is from 0.01 to 2.00"), so every default limit, in every compose file, must fit a
2-core, 24 GiB machine; larger hosts raise them through the variables."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.compose_file import COMPOSE_FILE, interpolate, load_compose

GPU_FILE = COMPOSE_FILE.parent / "docker-compose.gpu.yml"
HOST_CPUS, HOST_MEMORY = 2.0, 24 * 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def memory_bytes(value: str | int) -> int:
    """Compose's byte values: `3g`, `512m`, `1024` (bytes)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(value).strip().lower())
    if match is None or match[2] not in _UNITS:
        raise ValueError(f"memory: not a compose byte value: {value!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def default_limits(path) -> dict[str, dict]:
    """service -> its deploy.resources.limits, with every ${VAR:-default} at its default."""
    services = interpolate(yaml.safe_load(path.read_text()), {}).get("services", {})
    return {name: s.get("deploy", {}).get("resources", {}).get("limits", {}) for name, s in services.items()}


def oversized(limits_by_service: dict[str, dict]) -> list[str]:
    """The limits a 2-core, 24 GiB host cannot grant, as `service.key=value`."""
    found = []
    for name, limits in limits_by_service.items():
        if "cpus" in limits and not 0 < float(limits["cpus"]) <= HOST_CPUS:
            found.append(f"{name}.cpus={limits['cpus']}")
        if "memory" in limits and not 0 < memory_bytes(limits["memory"]) <= HOST_MEMORY:
            found.append(f"{name}.memory={limits['memory']}")
    return found


@pytest.mark.parametrize("path", [COMPOSE_FILE, GPU_FILE], ids=lambda p: p.name)
def test_default_limits_fit_a_two_core_host(path):
    assert oversized(default_limits(path)) == []


def test_the_check_catches_the_limit_that_failed_on_a_two_core_host():
    assert oversized({"engine": {"cpus": "4", "memory": "6g"}}) == ["engine.cpus=4"]
    assert oversized({"engine": {"cpus": "2", "memory": "25g"}}) == ["engine.memory=25g"]


def test_one_replica_of_each_service_fits_the_host_memory_together():
    limits = default_limits(COMPOSE_FILE)
    assert sum(memory_bytes(v["memory"]) for v in limits.values() if "memory" in v) <= HOST_MEMORY


def test_limits_come_from_variables():
    shell = {
        "TOKENWIRE_ENGINE_CPUS": "8",
        "TOKENWIRE_ENGINE_MEMORY": "32g",
        "TOKENWIRE_TOKENIZER_CPUS": "3",
        "TOKENWIRE_TOKENIZER_MEMORY": "4g",
    }
    services = load_compose(shell)["services"]
    assert services["engine"]["deploy"]["resources"]["limits"] == {"cpus": "8", "memory": "32g"}
    assert services["tokenizer"]["deploy"]["resources"]["limits"] == {"cpus": "3", "memory": "4g"}


def test_memory_bytes_reads_compose_units():
    assert memory_bytes("3g") == 3 * 1024**3 and memory_bytes("512m") == 512 * 1024**2
    assert memory_bytes(1024) == 1024
    with pytest.raises(ValueError, match="memory"):
        memory_bytes("3 gigs")
