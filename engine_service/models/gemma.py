"""Our forward for Gemma 2 and Gemma 3 (text) over a HF model's weights, on the paged cache.

What Gemma adds over Llama: `(1 + w)` RMSNorms computed in float32 (as HF does), norms after attention
and around the feed-forward, GeGLU with tanh-gelu, embeddings scaled by sqrt(hidden), a query scale of
`query_pre_attn_scalar`, interleaved sliding-window and global layers (`layer_types`). Gemma 3 adds
per-head q/k norms and its own rope base per layer kind; Gemma 2 soft-caps attention scores and the
final logits. q/k/v and gate/up are fused GEMMs as in `llama.py`; attention is `paged_attention`
(the native decode kernel where a layer has no soft-cap: it takes the window itself).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenwire.engine.models.attention import AttentionBatch, KVCache, paged_attention
from tokenwire.engine.models.gguf_weights import quantized_of
from tokenwire.engine.models.linear import Linear
from tokenwire.engine.models.llama import _embedding, _layer_windows, _linear, apply_rope, common_window
from transformers.activations import ACT2FN


@dataclass
class _GemmaLayer:
    input_norm: torch.Tensor  # every norm weight here is already 1 + w, in float32
    qkv: Linear
    q_norm: torch.Tensor | None  # Gemma 3
    k_norm: torch.Tensor | None
    o: Linear
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    window: int | None
    kind: str  # "sliding_attention" or "full_attention": which rope table the layer uses


class GemmaForward:
    def __init__(self, hf_model: torch.nn.Module, gemv=None):
        config = hf_model.config
        inner = hf_model.model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scale = config.query_pre_attn_scalar**-0.5
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.act = ACT2FN[config.hidden_activation]
        self.rotary = inner.rotary_emb
        # Gemma 3's rotary module holds one table per layer kind; Gemma 2's one for all.
        self._rope_per_kind = "layer_type" in inspect.signature(self.rotary.forward).parameters
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        with torch.no_grad():
            self.embed = _embedding(inner.embed_tokens)
            # HF multiplies by the scale rounded to the weight dtype.
            self.embed_scale = torch.tensor(config.hidden_size**0.5).to(self.embed.dtype)
            self.final_norm = _norm_weight(inner.norm)
            head = hf_model.get_output_embeddings()
            self.lm_head = Linear(head.weight.detach(), gemv=gemv, quantized=quantized_of(head))
            windows = _layer_windows(config)
            self.layers = [_fuse(layer, windows[i], kinds[i], gemv) for i, layer in enumerate(inner.layers)]
        self.kv_window = common_window(windows)  # None for Gemma 2/3: their global layers read every block
        self.vocab_size = self.lm_head.out_features

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        batch: AttentionBatch,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) of the rows `sample_rows` of this flat batch of tokens."""
        h = F.embedding(input_ids, self.embed) * self.embed_scale
        ropes = self._ropes(h, positions)
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[layer.kind]
            attn = self._attention(self._norm(h, layer.input_norm), layer, cos, sin, kv.k[i], kv.v[i], batch)
            h = h + self._norm(layer.o(attn), layer.post_attn_norm)
            gate_up = layer.gate_up(self._norm(h, layer.pre_ff_norm))
            inter = self.intermediate_size
            mlp = layer.down(self.act(gate_up[:, :inter]).mul_(gate_up[:, inter:]))
            h = h + self._norm(mlp, layer.post_ff_norm)
        h = self._norm(h.index_select(0, sample_rows), self.final_norm)
        logits = self.lm_head(h)
        if self.final_softcap is not None:  # in the model dtype, as HF
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _ropes(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Half-width cos/sin [T, 1, d/2] of each layer kind present."""
        half, out = self.head_dim // 2, {}
        shared = None if self._rope_per_kind else self.rotary(h, positions[None])
        for kind in {layer.kind for layer in self.layers}:
            cos, sin = self.rotary(h, positions[None], kind) if shared is None else shared
            out[kind] = (cos[0, :, None, :half], sin[0, :, None, :half])
        return out

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF: normalise and scale in float32, then round to the model dtype once.
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(x.dtype)

    def _attention(self, x, layer: _GemmaLayer, cos, sin, k_cache, v_cache, batch) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        qkv = layer.qkv(x)
        q_end, k_end = self.num_heads * d, (self.num_heads + self.num_kv_heads) * d
        q, k = qkv[:, :q_end].view(T, -1, d), qkv[:, q_end:k_end].view(T, -1, d)
        v = qkv[:, k_end:].view(T, self.num_kv_heads, d)
        if layer.q_norm is not None:
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return paged_attention(q, k, v, k_cache, v_cache, batch, self.scale, layer.window, softcap=self.attn_softcap)


def _norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    return 1.0 + norm.weight.detach().float()


def _fuse(layer, window: int | None, kind: str, gemv) -> _GemmaLayer:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return _GemmaLayer(
        input_norm=_norm_weight(layer.input_layernorm),
        qkv=_linear(attn.q_proj, attn.k_proj, attn.v_proj, gemv=gemv),
        q_norm=None if q_norm is None else _norm_weight(q_norm),
        k_norm=None if k_norm is None else _norm_weight(k_norm),
        o=_linear(attn.o_proj, gemv=gemv),
        post_attn_norm=_norm_weight(layer.post_attention_layernorm),
        pre_ff_norm=_norm_weight(layer.pre_feedforward_layernorm),
        post_ff_norm=_norm_weight(layer.post_feedforward_layernorm),
        gate_up=_linear(mlp.gate_proj, mlp.up_proj, gemv=gemv),
        down=_linear(mlp.down_proj, gemv=gemv),
        window=window,
        kind=kind,
    )
