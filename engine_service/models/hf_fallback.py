"""The transformers fallback: any other decoder-only `AutoModelForCausalLM` runs its own HF modules on
tokenwire's flat batch, paged KV cache and continuous batching (vLLM's Transformers backend, on CPU).

We register an attention function (`tokenwire_paged`) in transformers' `AttentionInterface` and set the
model's attention implementation to it. Each step the HF forward sees the whole flat batch as one row of
T tokens, `position_ids` the sequences' real positions, no HF cache and no mask (transformers builds no
mask for an implementation its mask interface does not know). The step's KV cache and `AttentionBatch`
ride in the forward's kwargs, which HF passes down to every attention call; there each layer writes its
new K/V into their slots and attends over each sequence's own blocks (`attention.paged_attention`), so
a sequence never sees another's tokens and the scheduler, prefix cache and preemption work unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tokenwire.engine.models.attention import AttentionBatch, KVCache, paged_attention
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ATTN_IMPLEMENTATION = "tokenwire_paged"
_STEP_KWARG = "tokenwire_step"


@dataclass(frozen=True)
class _Step:
    """What every attention call of one forward needs: the cache and the step's index tensors."""

    kv: KVCache
    batch: AttentionBatch


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [1, H, T, d], key/value [1, kv_heads, T, d] of this
    step's tokens; returns ([1, T, H, d], no weights)."""
    step = kwargs.get(_STEP_KWARG)
    layer = getattr(module, "layer_idx", None)
    if step is None or layer is None:
        raise ValueError(
            f"transformers fallback: {type(module).__name__} was called without tokenwire's step"
            f" ({_STEP_KWARG} kwarg: {step is not None}, layer_idx: {layer}); its model does not pass the"
            " forward's kwargs down to attention"
        )
    if attention_mask is not None:  # a model-made mask or bias (ALiBi, say) we would silently drop
        raise ValueError(f"transformers fallback: {type(module).__name__} passes its own attention mask")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"transformers fallback: {type(module).__name__} uses attention sinks (s_aux)")
    k_cache, v_cache = step.kv.k[layer], step.kv.v[layer]
    if key.shape[1:2] + key.shape[3:] != k_cache.shape[2:] or value.shape[3] != v_cache.shape[3]:
        raise ValueError(
            f"transformers fallback: layer {layer}'s key/value {tuple(key.shape)}/{tuple(value.shape)} do not fit"
            f" the KV cache's [kv_heads, head_dim] {tuple(k_cache.shape[2:])}"
        )
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    q = query[0].transpose(0, 1).contiguous()  # [T, H, d]: the flat-batch layout of paged_attention
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = paged_attention(q, k, v, k_cache, v_cache, step.batch, scaling, sliding_window, softcap=softcap)
    return out.view(1, q.shape[0], q.shape[1], -1), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def check_fallback_config(hf_config) -> None:
    """Refuse, naming the architecture and the reason, a config the fallback cannot serve: encoder-decoders,
    model types without a causal-LM class, modules outside the attention interface, bidirectional
    (encoder-only) attention. Builds the model on the meta device only: no weights are read."""
    name = _name(hf_config)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"unsupported model architecture {name}: encoder-decoder; tokenwire serves decoder-only LMs")
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not _remote_causal_lm(hf_config):
        raise ValueError(f"unsupported model architecture {name}: transformers has no AutoModelForCausalLM for it")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    if not type(model).is_backend_compatible():
        raise ValueError(
            f"unsupported model architecture {name}: {type(model).__name__} does not call transformers'"
            " attention interface, which the fallback plugs tokenwire's paged KV cache into"
        )
    bidirectional = sorted({type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False})
    if bidirectional:
        raise ValueError(
            f"unsupported model architecture {name}: encoder-only, its attention ({', '.join(bidirectional)}) is"
            " bidirectional (is_causal=False), so it cannot generate left to right"
        )


def _name(hf_config) -> str:
    names = getattr(hf_config, "architectures", None) or []
    return f"{'/'.join(names) or hf_config.model_type} (model_type {hf_config.model_type!r})"


def _remote_causal_lm(hf_config) -> bool:
    return "AutoModelForCausalLM" in (getattr(hf_config, "auto_map", None) or {})


class HFFallbackForward:
    """The `CausalLM` contract (model_runner.py) over a HF model's own modules."""

    def __init__(self, hf_model: torch.nn.Module, gemv=None):
        """`gemv` is unused: the HF modules run their own linears."""
        hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if hf_model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"unsupported model architecture {_name(hf_model.config)}: its attention implementation cannot be set"
            )
        config = hf_model.config.get_text_config()
        self.hf_model = hf_model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.kv_window = None  # HF's modules may read any earlier position: every block is kept
        # Only the sampling rows reach the lm_head where the model's forward can be told so.
        self._keeps_rows = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        # Every parameter once (tied ones share storage): what model_runner.weight_bytes counts.
        self.weights = list({p.data_ptr(): p.detach() for p in hf_model.parameters()}.values())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        batch: AttentionBatch,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) of the rows `sample_rows` of this flat batch of tokens."""
        step = {_STEP_KWARG: _Step(kv, batch)}
        if self._keeps_rows:
            logits = self.hf_model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=sample_rows,
                **step,
            ).logits[0]
        else:
            logits = self.hf_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False, **step)
            logits = logits.logits[0].index_select(0, sample_rows)
        return logits.float()
