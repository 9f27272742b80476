"""Our forward for GPT-2 over a HF `GPT2LMHeadModel`'s weights.

GPT-2 differs from the Llama family in ways the weights make visible: Conv1D projections stored as
[in, out] (transposed once at load into our `Linear`), learned absolute positions, LayerNorm with
bias, gelu_new and multi-head (not grouped) attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenwire.engine.models.attention import AttentionBatch, KVCache, paged_attention
from tokenwire.engine.models.linear import Linear
from transformers.activations import ACT2FN

# gelu_new is the tanh approximation; F.gelu does it in one fused op instead of HF's five.
_FUSED_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class _Block:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: Linear  # E -> 3E
    proj: Linear  # E -> E
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc: Linear  # E -> inner
    out: Linear  # inner -> E
    scale: float


class GPT2Forward:
    def __init__(self, hf_model: torch.nn.Module, gemv=None):
        """`gemv`: the native few-row GEMM, or None (see linear.Linear)."""
        config = hf_model.config
        inner = hf_model.transformer
        self.num_layers = config.n_layer
        self.num_heads = self.num_kv_heads = config.n_head
        self.hidden_size = config.n_embd
        self.head_dim = self.hidden_size // self.num_heads
        self.eps = config.layer_norm_epsilon
        self.act = _FUSED_ACTS.get(config.activation_function) or ACT2FN[config.activation_function]
        with torch.no_grad():
            self.wte = inner.wte.weight.detach()
            self.wpe = inner.wpe.weight.detach()
            self.ln_f = (inner.ln_f.weight.detach(), inner.ln_f.bias.detach())
            self.lm_head = Linear(hf_model.get_output_embeddings().weight.detach(), gemv=gemv)
            self.blocks = [_block(b, gemv) for b in inner.h]
        self.vocab_size = self.lm_head.out_features
        self.kv_window = None  # no sliding layers

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        batch: AttentionBatch,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) of the rows `sample_rows` of this flat batch of tokens."""
        T, E, d = input_ids.shape[0], self.hidden_size, self.head_dim
        h = F.embedding(input_ids, self.wte).add_(F.embedding(positions, self.wpe))
        for i, b in enumerate(self.blocks):
            x = F.layer_norm(h, (E,), b.ln1_w, b.ln1_b, self.eps)
            qkv = b.qkv(x)
            q, k, v = (qkv[:, j * E : (j + 1) * E].view(T, self.num_heads, d) for j in range(3))
            h = b.proj.add(paged_attention(q, k, v, kv.k[i], kv.v[i], batch, b.scale), h)
            x = F.layer_norm(h, (E,), b.ln2_w, b.ln2_b, self.eps)
            h = b.out.add(self.act(b.fc(x)), h)
        h = F.layer_norm(h.index_select(0, sample_rows), (E,), *self.ln_f, self.eps)
        return self.lm_head(h).float()


def _block(block, gemv) -> _Block:
    attn, mlp = block.attn, block.mlp
    return _Block(
        ln1_w=block.ln_1.weight.detach(),
        ln1_b=block.ln_1.bias.detach(),
        qkv=_conv1d(attn.c_attn, gemv),
        proj=_conv1d(attn.c_proj, gemv),
        ln2_w=block.ln_2.weight.detach(),
        ln2_b=block.ln_2.bias.detach(),
        fc=_conv1d(mlp.c_fc, gemv),
        out=_conv1d(mlp.c_proj, gemv),
        scale=float(attn.scaling),
    )


def _conv1d(conv, gemv) -> Linear:
    """HF's Conv1D keeps its weight as [in, out]; Linear wants nn.Linear's [out, in]."""
    return Linear(conv.weight.detach().t().contiguous(), conv.bias.detach(), gemv)
