"""The suite's one dtype switch and the transformers reference the engine is held against.

`TOKENWIRE_TEST_DTYPE=bfloat16 make test` runs every engine the tests build in bfloat16 (default:
float32), so that the bf16 paths are exercised for correctness on any machine, AVX2 ones included.

- float32: the engine's greedy ids equal transformers `generate()` token for token.
- bfloat16: the reference is transformers in bfloat16 too, but two bf16 forwards that add in a different
  order round differently, so ids may part at a near-tie. The check is then by logprob: fed the engine's
  own ids, the reference must rank each generated token within `BF16_LOGPROB_TOL` of its best one.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ENGINE_DTYPE = os.environ.get("TOKENWIRE_TEST_DTYPE", "float32")
if ENGINE_DTYPE not in _DTYPES:
    raise ValueError(f"TOKENWIRE_TEST_DTYPE: expected one of {sorted(_DTYPES)}, got {ENGINE_DTYPE!r}")
TORCH_DTYPE = _DTYPES[ENGINE_DTYPE]
EXACT = ENGINE_DTYPE == "float32"  # token-exact comparisons hold only in fp32
# bf16 keeps 8 bits of mantissa: logits of a few units carry errors of a few hundredths, which compound
# over layers; a token within this many nats of the reference's best is a tie the dtype cannot resolve.
BF16_LOGPROB_TOL = 0.25


def hf_model(model_dir: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPE).eval()


def hf_greedy(model_dir: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate()`, one prompt at a time, in the suite's dtype."""
    model = hf_model(model_dir)
    outs = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def assert_greedy_matches_reference(model_dir: str, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """fp32: `outputs` == transformers' greedy ids. bf16: every output token is a near-argmax of the bf16
    reference fed the same ids (teacher forcing), so one rounding difference cannot fail the check."""
    if EXACT:
        assert outputs == hf_greedy(model_dir, prompts, max(len(o) for o in outputs))
        return
    model = hf_model(model_dir)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt + output[:-1]])
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(output)[:, None])[:, 0]
        gap = logprobs.max(-1).values - chosen
        assert float(gap.max()) <= BF16_LOGPROB_TOL, (prompt, output, gap.tolist())


def assert_runs_agree(model_dir: str, prompts: list[list[int]], a: list[list[int]], b: list[list[int]]) -> None:
    """Two greedy runs of the engine that differ only in batching or caching: equal in fp32. In bf16 a
    different batch shape rounds differently, so each run is held against the reference instead."""
    if EXACT:
        assert a == b
        return
    assert_greedy_matches_reference(model_dir, prompts, a)
    assert_greedy_matches_reference(model_dir, prompts, b)
