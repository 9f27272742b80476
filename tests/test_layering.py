"""The package graph holds: each import runs in a fresh interpreter, and what it loaded is checked.

    v1 <- serving <- tokenizer <- engine          client: v1 + serving's wire names, no torch, no service
                                                   gateway: client + serving, no torch, no service
                                                   bench on top of everything

Inside the engine (tokenwire.engine), by process:
    front process: edge (gRPC) + request (validation, encoding)   never torch, worker or models
    core process:  core -> scheduling (plain Python) + worker (torch) -> models; request for grammars
The scheduling package is plain Python, unit-testable with no torch or gRPC.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_NO_TORCH_NOR_WIRE = [
    "torch",
    "grpc",
    "tokenwire.tokenizer",
    "tokenwire.v1",
    "tokenwire.engine.worker",
    "tokenwire.engine.models",
    "tokenwire.engine.edge",
]
_THE_EDGE_NEVER_LOADS = [
    "torch",
    "tokenwire.engine.worker",
    "tokenwire.engine.models",
    "tokenwire.engine.core.engine",
    "tokenwire.client",
    "tokenwire.bench",
]
FORBIDDEN = {
    # module: prefixes of modules it must not load
    "tokenwire.engine.scheduling.scheduler": _NO_TORCH_NOR_WIRE + ["tokenwire.engine.core"],
    "tokenwire.engine.scheduling.block_manager": _NO_TORCH_NOR_WIRE + ["tokenwire.engine.core"],
    "tokenwire.engine.scheduling.prefix_cache": _NO_TORCH_NOR_WIRE + ["tokenwire.engine.core"],
    "tokenwire.engine.request.preparer": _NO_TORCH_NOR_WIRE + ["tokenwire.engine.core", "transformers"],
    "tokenwire.engine.core.messages": _NO_TORCH_NOR_WIRE + ["transformers"],
    # The engine's gRPC front binds its port before torch loads (health answers while the model loads),
    # and its side of the core boundary never loads the models.
    "tokenwire.engine.cli": _THE_EDGE_NEVER_LOADS + ["transformers"],
    "tokenwire.engine.edge.server": _THE_EDGE_NEVER_LOADS + ["transformers"],
    "tokenwire.engine.edge.core_client": _THE_EDGE_NEVER_LOADS,
    "tokenwire.engine.core.process": _THE_EDGE_NEVER_LOADS + ["grpc", "tokenwire.engine.edge"],
    "tokenwire.tokenizer.server": ["tokenwire.engine", "tokenwire.client", "tokenwire.bench", "torch"],
    "tokenwire.tokenizer.cli": ["tokenwire.engine", "tokenwire.client", "tokenwire.bench", "torch"],
    "tokenwire.client": ["torch", "transformers", "tokenwire.engine", "tokenwire.tokenizer", "tokenwire.bench"],
    "tokenwire.client.cli": ["torch", "transformers", "tokenwire.engine", "tokenwire.tokenizer", "tokenwire.bench"],
    "tokenwire.serving.server": ["tokenwire.engine", "tokenwire.tokenizer", "tokenwire.client", "torch"],
    "tokenwire.serving.launcher": ["tokenwire.engine", "tokenwire.tokenizer", "tokenwire.client", "torch"],
    "tokenwire.serving.errors": ["grpc", "google.protobuf", "tokenwire.v1"],
    # The gateway sits on the SDK and serving: it never loads torch, a tokenizer or the engine.
    "tokenwire.gateway.cli": ["torch", "transformers", "tokenwire.engine", "tokenwire.tokenizer", "tokenwire.bench"],
}
# The only tokenizer modules the engine may use: the fingerprint (tokenizer.py), the detokenizer and the
# --chat-template override (chat_templates.py; the fingerprint covers the template).
ENGINE_MAY_USE = {
    "tokenwire.tokenizer",
    "tokenwire.tokenizer.tokenizer",
    "tokenwire.tokenizer.detokenizer",
    "tokenwire.tokenizer.chat_templates",
}


def loaded_modules(module: str) -> list[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def offending(loaded: list[str], prefixes: list[str]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)]


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_loads_nothing_above_its_layer(module):
    assert offending(loaded_modules(module), FORBIDDEN[module]) == []


def test_serving_loads_no_service():
    import pkgutil

    import tokenwire.serving

    names = [f"tokenwire.serving.{m.name}" for m in pkgutil.iter_modules(tokenwire.serving.__path__)]
    code = (
        "import sys, json, importlib\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout)
    assert offending(loaded, ["tokenwire.engine", "tokenwire.tokenizer", "tokenwire.client", "tokenwire.bench"]) == []


def test_engine_uses_only_the_fingerprint_and_detokenizer_of_the_tokenizer():
    loaded = loaded_modules("tokenwire.engine.edge.server") + loaded_modules("tokenwire.engine.core.engine")
    assert sorted(set(offending(loaded, ["tokenwire.tokenizer"])) - ENGINE_MAY_USE) == []
