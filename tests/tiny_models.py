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
