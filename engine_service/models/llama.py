"""Our forward for the Llama family (SmolLM2, Llama, Mistral, Qwen2, Qwen3, Phi-3) over a HF model's weights.

q/k/v are fused into one matmul and gate/up into another, residual adds ride inside the GEMMs
(`Linear.add`), and the HF module's own rotary embedding supplies cos/sin, so every rope scaling variant
matches transformers. Qwen2's qkv bias, Qwen3's per-head q/k norms, an explicit head_dim, tied
embeddings, sliding-window layers and Phi-3's pre-fused qkv/gate_up (and su/longrope, through
the HF rotary module) are handled from the config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenwire.engine.models.attention import AttentionBatch, KVCache, paged_attention
from tokenwire.engine.models.gguf_weights import quantized_of
from tokenwire.engine.models.linear import GEMV_MAX_ROWS, Linear, gemm_rows
from tokenwire.engine.models.quantized import concat
from transformers.activations import ACT2FN


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    window: int | None


class LlamaForward:
    def __init__(self, hf_model: torch.nn.Module, gemv=None):
        """`gemv`: the native few-row GEMM, or None (see linear.Linear)."""
        config = hf_model.config
        inner = hf_model.model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.act = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]
        self.rotary = inner.rotary_emb
        with torch.no_grad():
            self.embed = _embedding(inner.embed_tokens)
            self.final_norm = inner.norm.weight.detach()
            # The embedding's own weight when tied (the packed GEMM copy is separate either way).
            head = hf_model.get_output_embeddings()
            self.lm_head = Linear(head.weight.detach(), gemv=gemv, quantized=quantized_of(head))
            windows = _layer_windows(config)
            self.layers = [_fuse(layer, windows[i], gemv) for i, layer in enumerate(inner.layers)]
            self._windows = [w or 0 for w in windows]
        self.kv_window = common_window(windows)
        self.vocab_size = self.lm_head.out_features
        self._check_rope()

    # Computed on first use: the runner may yet drop the linears' dense copies (Linear.drop_dense_copy).
    @functools.cached_property
    def _decode_weights(self) -> list[torch.Tensor | None] | None:
        return self._native_decode_weights()

    @functools.cached_property
    def _small_decode_weights(self) -> list[torch.Tensor | None] | None:
        return self._native_decode_weights(small=True)

    def _native_decode_weights(self, small: bool = False) -> list[torch.Tensor | None] | None:
        """The flat weight list of the native decode layers (`cpu_decode.cpp`), or None where that op
        does not apply: per-head q/k norms, an activation other than SiLU, or GEMMs not on oneDNN.
        `small`: the plain weights of the native GEMV instead (steps of up to GEMV_MAX_ROWS decodes)."""
        if self.act is not F.silu or any(layer.q_norm is not None for layer in self.layers):
            return None
        weight = (lambda lin: lin.gemv_weight) if small else (lambda lin: lin.packed)
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if any(weight(lin) is None for lin in linears) or any(
            lin.bias is not None for layer in self.layers for lin in (layer.o, layer.gate_up, layer.down)
        ):
            return None
        return [
            w
            for layer in self.layers
            for w in (
                layer.input_norm,
                weight(layer.qkv),
                layer.qkv.bias,
                weight(layer.o),
                layer.post_norm,
                weight(layer.gate_up),
                weight(layer.down),
            )
        ]

    def _check_rope(self) -> None:
        # apply_rope below uses half-width cos/sin: HF builds them as cat(freqs, freqs) for every rope type.
        probe = torch.arange(8, device=self.embed.device)[None]
        cos, sin = self.rotary(self.embed[:1], probe)
        half = self.head_dim // 2
        if cos.shape[-1] != self.head_dim or not torch.equal(cos[..., :half], cos[..., half:]):
            raise ValueError("unsupported rotary embedding: expected full-head_dim, half-rotated rope")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        batch: AttentionBatch,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) of the rows `sample_rows` of this flat batch of tokens."""
        h = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(h, positions[None])
        half = self.head_dim // 2
        cos, sin = cos[0, :, None, :half], sin[0, :, None, :half]  # [T, 1, d/2]
        if batch.native is not None and self.act is F.silu:
            return self._forward_native(batch.native, h, cos[:, 0], sin[:, 0], kv, batch, sample_rows)
        for i, layer in enumerate(self.layers):
            attn = self._attention(
                F.rms_norm(h, (self.hidden_size,), layer.input_norm, self.eps), layer, cos, sin, kv.k[i], kv.v[i], batch
            )
            h = layer.o.add(attn, h)
            gate_up = layer.gate_up(F.rms_norm(h, (self.hidden_size,), layer.post_norm, self.eps))
            inter = self.intermediate_size
            gate = gate_up[:, :inter]
            gate = F.silu(gate, inplace=True) if self.act is F.silu else self.act(gate)
            h = layer.down.add(gate.mul_(gate_up[:, inter:]), h)
        h = F.rms_norm(h.index_select(0, sample_rows), (self.hidden_size,), self.final_norm, self.eps)
        return self.lm_head(h).float()

    def _forward_native(
        self, native, h, cos, sin, kv: KVCache, batch: AttentionBatch, sample_rows: torch.Tensor
    ) -> torch.Tensor:
        """The same layers through the fused CPU kernels: rms_norm, rope + cache write, decode attention,
        SiLU*mul; a step of decodes alone runs every layer in one native call."""
        T, d, eps = h.shape[0], self.head_dim, self.eps
        H, KVH = self.num_heads, self.num_kv_heads
        q_end, k_end = H * d, (H + KVH) * d
        if self._decode_weights is not None and not batch.prefills:  # decodes alone: every layer in C++
            group = batch.decodes[0]
            weights = self._decode_weights
            if T <= GEMV_MAX_ROWS and self._small_decode_weights is not None:
                weights = self._small_decode_weights  # plain weights: the GEMMs run on the native GEMV
            h = native.decode_layers(
                h,
                cos,
                sin,
                batch.slot_mapping,
                kv.k,
                kv.v,
                group.tables,
                group.lens,
                weights,
                self._windows,
                H,
                KVH,
                eps,
                self.scale,
                gemm_rows(T),
            )
            h = native.rms_norm(h.index_select(0, sample_rows), self.final_norm, eps)
            return self.lm_head(h).float()
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv.k[i], kv.v[i]
            qkv = layer.qkv(native.rms_norm(h, layer.input_norm, eps))
            if layer.q_norm is None:
                native.rope_and_cache(qkv, cos, sin, batch.slot_mapping, k_cache, v_cache, H, KVH)
                q, k = qkv[:, :q_end].view(T, H, d), qkv[:, q_end:k_end].view(T, KVH, d)
                written = True
            else:
                q = apply_rope(
                    F.rms_norm(qkv[:, :q_end].view(T, -1, d), (d,), layer.q_norm, eps), cos[:, None], sin[:, None]
                )
                k = apply_rope(
                    F.rms_norm(qkv[:, q_end:k_end].view(T, -1, d), (d,), layer.k_norm, eps), cos[:, None], sin[:, None]
                )
                written = False
            v = qkv[:, k_end:].view(T, KVH, d)
            attn = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale, layer.window, written)
            h = layer.o.add(attn, h)
            h = layer.down.add(native.silu_mul(layer.gate_up(native.rms_norm(h, layer.post_norm, eps))), h)
        h = native.rms_norm(h.index_select(0, sample_rows), self.final_norm, eps)
        return self.lm_head(h).float()

    def _attention(self, x, layer: _Layer, cos, sin, k_cache, v_cache, batch) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        qkv = layer.qkv(x)
        q_end, k_end = self.num_heads * d, (self.num_heads + self.num_kv_heads) * d
        v = qkv[:, k_end:].view(T, self.num_kv_heads, d)
        if layer.q_norm is None:  # rotate q and k together: one set of ops for both
            qk = apply_rope(qkv[:, :k_end].view(T, -1, d), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = F.rms_norm(qkv[:, :q_end].view(T, -1, d), (d,), layer.q_norm, self.eps)
            k = F.rms_norm(qkv[:, q_end:k_end].view(T, -1, d), (d,), layer.k_norm, self.eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return paged_attention(q, k, v, k_cache, v_cache, batch, self.scale, layer.window)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's half-rotation rope, x [T, N, d] with cos/sin [T, 1, d/2]; four fused ops into a new tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


def _layer_windows(config) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if types is None:  # Mistral: one window for every layer
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def common_window(windows: list[int | None]) -> int | None:
    """The window all layers attend within, so KV older than it is never read again (the block manager
    gives its blocks back); None when any layer is global."""
    return None if not windows or None in windows else max(windows)


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError("unsupported checkpoint: bias on only some of the fused projections")
    return torch.cat([t.detach() for t in tensors])


def _linear(*projections: torch.nn.Linear, gemv) -> Linear:
    """One Linear computing the given projections side by side (their outputs concatenated), on their
    quantized blocks where all of them have blocks of one layout."""
    blocks = [quantized_of(p) for p in projections]
    fused = concat(blocks) if all(b is not None for b in blocks) else None
    return Linear(_cat(*(p.weight for p in projections)), _cat(*(p.bias for p in projections)), gemv, fused)


def _embedding(embedding: torch.nn.Embedding) -> torch.Tensor:
    blocks = quantized_of(embedding)
    weight = embedding.weight.detach()
    return weight if blocks is None else blocks.dequantize(weight.dtype).to(weight.device)


def _projections(module, fused: str, parts: tuple[str, ...]) -> list[torch.nn.Module]:
    """Phi-3 checkpoints hold q/k/v (gate/up) already fused, in the order the forward splits them."""
    if hasattr(module, fused):
        return [getattr(module, fused)]
    return [getattr(module, name) for name in parts]


def _fuse(layer, window: int | None, gemv) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return _Layer(
        input_norm=layer.input_layernorm.weight.detach(),
        qkv=_linear(*_projections(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")), gemv=gemv),
        q_norm=None if q_norm is None else q_norm.weight.detach(),
        k_norm=None if k_norm is None else k_norm.weight.detach(),
        o=_linear(attn.o_proj, gemv=gemv),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=_linear(*_projections(mlp, "gate_up_proj", ("gate_proj", "up_proj")), gemv=gemv),
        down=_linear(mlp.down_proj, gemv=gemv),
        window=window,
    )
