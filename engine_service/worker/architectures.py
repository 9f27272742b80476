"""Which forward serves a model: tokenwire's own (`models/llama.py`, `gemma.py`, `gpt2.py`) where it knows
the architecture, else transformers' own modules through the fallback (`models/hf_fallback.py`), per
`EngineConfig.model_impl` ("auto", "native", "transformers"; vLLM's `--model-impl`)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.engine.models.gemma import GemmaForward
from tokenwire.engine.models.gpt2 import GPT2Forward
from tokenwire.engine.models.hf_fallback import check_fallback_config
from tokenwire.engine.models.llama import LlamaForward

NATIVE_FORWARDS = {
    "LlamaForCausalLM": LlamaForward,
    "MistralForCausalLM": LlamaForward,
    "Qwen2ForCausalLM": LlamaForward,
    "Qwen3ForCausalLM": LlamaForward,
    "Phi3ForCausalLM": LlamaForward,
    "Gemma2ForCausalLM": GemmaForward,
    "Gemma3ForCausalLM": GemmaForward,
    "GPT2LMHeadModel": GPT2Forward,
}
SUPPORTED_ARCHITECTURES = tuple(NATIVE_FORWARDS)
# The forwards that fuse quantized blocks (llama._linear); the others run dense.
QUANTIZED_ARCHITECTURES = {name for name, forward in NATIVE_FORWARDS.items() if forward in (LlamaForward, GemmaForward)}
MODEL_IMPLS = ("auto", "native", "transformers")
NATIVE, TRANSFORMERS = "native", "transformers"  # the two paths, as GetModelInfo and the log name them

# Old checkpoints and GGUF-loaded configs may omit `architectures` (or name a multimodal wrapper);
# their model_type names the family.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@dataclass(frozen=True)
class ModelPath:
    architecture: str  # the class name served (for the fallback: the config's first, else its model_type)
    impl: str  # NATIVE or TRANSFORMERS


def select(hf_config, model_impl: str) -> ModelPath:
    """The path `hf_config` takes under `model_impl`; ValueError naming the architecture and the reason when
    neither path can serve it."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl: one of {', '.join(MODEL_IMPLS)}, got {model_impl!r}")
    native = _native_architecture(hf_config)
    if native is not None and model_impl != TRANSFORMERS:
        return ModelPath(native, NATIVE)
    names = getattr(hf_config, "architectures", None) or []
    if model_impl == NATIVE:
        raise ValueError(
            f"unsupported model architecture {names or hf_config.model_type!r} for model_impl 'native'; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_impl 'auto' or 'transformers' runs others "
            "through transformers' own modules)"
        )
    check_fallback_config(hf_config)
    return ModelPath(native or (names[0] if names else hf_config.model_type), TRANSFORMERS)


def _native_architecture(hf_config) -> str | None:
    for name in getattr(hf_config, "architectures", None) or []:
        if name in NATIVE_FORWARDS:
            return name
    # GGUF-loaded configs carry a model_type (gemma3_text) and no architectures.
    return _BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
