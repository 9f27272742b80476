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


# The tiny decoders' shape (the Llama takes 2 layers; the families 4, for both layer kinds twice).
_TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,
)


def build_tiny_llama(tokenizer_dir: str | Path, out: Path, **overrides) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **{**_TINY_SHAPE, "num_hidden_layers": 2},
        tie_word_embeddings=True,
        **_ids(tokenizer),
        **overrides,
    )
    return _save(LlamaForCausalLM, config, tokenizer, out)


def build_echo_llama(tokenizer_dir: str | Path, out: Path, layer_scale: float = 0.1) -> Path:
    """The tiny Llama with its layers' outputs (o_proj, down_proj) scaled down: the tied head then mostly
    sees the last token's own embedding, so greedy decoding mostly repeats it, and n-gram drafts are
    accepted (a random tiny model never continues a copy) while the layers still turn some away."""
    build_tiny_llama(tokenizer_dir, out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
    model.save_pretrained(out)
    return out


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


# Tiny natively-served families beyond Llama: what each config adds. Four layers, so Gemma's interleaved
# sliding and global layers both occur; a window of 6 tokens, shorter than the tests' prompts.
TINY_WINDOW = 6
_FAMILY_CONFIGS = {
    "gemma3": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=TINY_WINDOW,
        head_dim=16,
        query_pre_attn_scalar=16,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
    ),
    "gemma2": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=TINY_WINDOW,
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,  # low caps, so the cap changes scores of a random model
        final_logit_softcapping=3.0,
    ),
    "mistral": dict(sliding_window=TINY_WINDOW),  # every layer slides: KV past the window goes back
    "phi3": dict(
        # su/longrope: short and long factors per rotary frequency (head_dim 16 -> 8).
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0],
        },
        original_max_position_embeddings=256,
    ),
}


def build_tiny_family(family: str, tokenizer_dir: str | Path, out: Path) -> Path:
    """A 4-layer random `family` model (gemma3, gemma2, mistral, phi3) with the SmolLM2 tokenizer."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    model_cls, config_cls = {
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config),
        "mistral": (MistralForCausalLM, MistralConfig),
        "phi3": (Phi3ForCausalLM, Phi3Config),
    }[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_cls(
        vocab_size=len(tokenizer),
        **_TINY_SHAPE,
        tie_word_embeddings=family != "phi3",
        **_ids(tokenizer),
        **_FAMILY_CONFIGS[family],
    )
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (1 + w = 1): random ones exercise the (1 + w)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Tiny families served by the transformers fallback (models/hf_fallback.py), none of them natively:
# GPT-NeoX with partial rotary and parallel residuals, OPT with learned positions offset by 2.
_FALLBACK_CONFIGS = {
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.2,
        rotary_pct=0.5,
        use_parallel_residual=True,
    ),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        init_std=0.2,
        word_embed_proj_dim=64,
    ),
}


def build_tiny_fallback(family: str, tokenizer_dir: str | Path, out: Path) -> Path:
    """A 2-layer random `family` model (gpt_neox, opt) with the SmolLM2 tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    model_cls, config_cls = {"gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig), "opt": (OPTForCausalLM, OPTConfig)}[
        family
    ]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_cls(vocab_size=len(tokenizer), **_ids(tokenizer), **_FALLBACK_CONFIGS[family])
    return _save(model_cls, config, tokenizer, out)


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
