"""Tiny deterministic causal LMs for tests and smoke benchmarks, paired with the real SmolLM2 tokenizer.

Random weights from a fixed seed, a wide init so greedy choices are not near-ties, a few MB on disk,
built in about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

SEED = 1234


def _ids(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def build_tiny_llama(tokenizer_dir: str | Path, out: Path, **overrides) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=True,
        **_ids(tokenizer),
        **overrides,
    )
    return _save(LlamaForCausalLM, config, tokenizer, out)


def build_tiny_gpt2(tokenizer_dir: str | Path, out: Path, **overrides) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        initializer_range=0.2,
        **_ids(tokenizer),
        **overrides,
    )
    return _save(GPT2LMHeadModel, config, tokenizer, out)


def _save(model_cls, config, tokenizer, out: Path) -> Path:
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The tiny Llama's shape, in GGUF's keys (the tokenizer and chat template come from the default model's file).
_TINY_GGUF_SHAPE = {
    "llama.block_count": 2,
    "llama.context_length": 1024,
    "llama.embedding_length": 64,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.rope.dimension_count": 16,
}


def build_tiny_gguf(source: Path, out: Path, linear_type: str = "Q4_1", embedding_type: str = "Q8_0") -> Path:
    """A 2-layer Llama GGUF file with random weights quantized to `linear_type` (Q4_0, Q4_1 or Q8_0: the
    types gguf-py can quantize), the embedding (tied output) to `embedding_type`, and the tokenizer,
    chat template and every other key of the default model's file `source`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(source)
    writer = GGUFWriter(out, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = _TINY_GGUF_SHAPE.get(name, field.contents())
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type)
    rng = np.random.default_rng(SEED)
    hidden, inter, vocab = 64, 128, len(reader.fields["tokenizer.ggml.tokens"].contents())

    def add(name: str, rows: int, cols: int, kind: str, scale: float = 0.2) -> None:
        weight = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        qtype = GGMLQuantizationType[kind]
        writer.add_tensor(name, quants.quantize(weight, qtype), raw_dtype=qtype)

    add("token_embd.weight", vocab, hidden, embedding_type)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for part, rows in (
            ("attn_q", hidden),
            ("attn_k", hidden // 2),
            ("attn_v", hidden // 2),
            ("attn_output", hidden),
        ):
            add(f"blk.{i}.{part}.weight", rows, hidden, linear_type)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden, linear_type)
        add(f"blk.{i}.ffn_up.weight", inter, hidden, linear_type)
        add(f"blk.{i}.ffn_down.weight", hidden, inter, linear_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
