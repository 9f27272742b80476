"""Loading the tokenizer, fingerprinting it, and describing it.

Plain functions on a Hugging Face tokenizer, free of gRPC: the engine imports
`tokenizer_fingerprint` to check that token ids it receives were made by the tokenizer it serves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenwire.serving.model_resolver import resolve_model
from tokenwire.tokenizer.chat_templates import apply_override, renders_tools
from tokenwire.tokenizer.detokenizer import skipped_token_ids

# transformers' VERY_LARGE_INTEGER (int(1e30)): "model_max_length not set".
_UNSET_MAX_LENGTH = int(1e29)
_CONFIG_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Per-call settings transformers rewrites on the backend at every `tokenizer(...)` call: not identity.
_RUNTIME_BACKEND_KEYS = ("truncation", "padding")


def load_tokenizer(model: str, trust_remote_code: bool = False, chat_template: str = "") -> Any:
    """The model's tokenizer, through the same resolver and `from_pretrained` as the engine, with the
    `--chat-template` override (a file or a shipped template's name) applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    return apply_override(tokenizer, chat_template)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Lowercase hex sha256 of everything that decides text <-> ids.

    Covers the backend's full definition (normaliser, pre-tokeniser, model vocabulary and merges,
    post-processor, decoder, added tokens with their flags), the named special tokens, the chat
    template and the decode clean-up flag. Canonical JSON, so key order and whitespace do not
    matter; truncation and padding are left out because they are per-call settings. Two loads of
    the same files give the same fingerprint in any process.
    """
    definition = {
        "backend": _backend_definition(tokenizer),
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
    }
    canonical = json.dumps(definition, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _backend_definition(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a pure-Python tokenizer: its vocabulary and added tokens are its definition
        return {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
            "added_tokens": {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
        }
    definition = json.loads(backend.to_str())
    for key in _RUNTIME_BACKEND_KEYS:
        definition.pop(key, None)
    return definition


@dataclass(frozen=True)
class TokenizerInfo:
    """The constants a client or the engine needs about the served tokenizer."""

    model: str  # as the service was started (resolver name, folder, hub id)
    vocab_size: int  # valid ids are [0, vocab_size), added tokens included
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    special_tokens: tuple[tuple[str, int], ...]  # (content, id) of every token skip_special_tokens drops
    max_model_length: int  # 0: unknown
    fingerprint: str
    has_chat_template: bool
    renders_tools: bool  # the chat template reads `tools` (else a request with tools is refused)


def describe_tokenizer(tokenizer: Any, model: str) -> TokenizerInfo:
    special_ids = sorted(skipped_token_ids(tokenizer))
    return TokenizerInfo(
        model=model,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        special_tokens=tuple(zip(tokenizer.convert_ids_to_tokens(special_ids), special_ids)),
        max_model_length=max_model_length(tokenizer),
        fingerprint=tokenizer_fingerprint(tokenizer),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        renders_tools=renders_tools(getattr(tokenizer, "chat_template", None)),
    )


def max_model_length(tokenizer: Any) -> int:
    """The tokenizer's declared limit, else the model config's context length, else 0 (unknown)."""
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < _UNSET_MAX_LENGTH:
        return declared
    config_path = Path(str(getattr(tokenizer, "name_or_path", ""))) / "config.json"
    if not config_path.is_file():  # a hub id or a tokenizer-only folder: nothing local to read
        return 0
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    return next((int(config[key]) for key in _CONFIG_LENGTH_KEYS if isinstance(config.get(key), int)), 0)
