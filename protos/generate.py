"""Regenerate the Python stubs of every `protos/tokenwire/v1/*.proto`, the one pinned way.

    python protos/generate.py [--out DIR]

Runs `grpc_tools.protoc` (grpcio-tools) with `-I protos`, writing `*_pb2.py`, `*_pb2_grpc.py` and the
mypy-protobuf `.pyi` stubs under DIR (default `protos/`, so they land next to the .proto files and
import as `tokenwire.v1.*_pb2`). The stubs are committed; `tests/test_protos.py` regenerates them
into a temporary folder and fails when the committed ones differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE = Path("tokenwire") / "v1"
_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def proto_files() -> list[Path]:
    """Every contract, sorted so the protoc invocation (and its output) never depends on disk order."""
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def _plugin(name: str) -> str:
    # The venv's own plugin first: PATH need not contain .venv/bin when run as `.venv/bin/python`.
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf (see pyproject's dev extra)")
    return found


def protoc_args(out_dir: Path) -> list[str]:
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}"]
    args += [f"--plugin={name}={_plugin(name)}" for name in _PLUGINS]
    args += [f"--{kind}_out={out_dir}" for kind in ("python", "grpc_python", "mypy", "mypy_grpc")]
    return args + [str(path) for path in proto_files()]


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Writes the stubs under out_dir and returns the generated files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    if not proto_files():
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE}")
    if protoc.main(protoc_args(out_dir)) != 0:
        raise SystemExit("protoc failed (its message is above)")
    return sorted((out_dir / PROTO_PACKAGE).glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
