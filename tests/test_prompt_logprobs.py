"""Prompt logprobs (SamplingParams.prompt_logprobs) and min_tokens in the in-process engine, held against
transformers' log-softmax over the same prompt: one prefill chunk or several, a cold or a warm prefix
cache, with or without generated tokens."""

from __future__ import annotations

import pytest
import torch
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import FinishReason
from tokenwire.serving.errors import InvalidRequestError

from tests.reference import EXACT, hf_model
from tests.test_engine import make_engine, random_prompts

TOL = 1e-4 if EXACT else 0.25  # fp32; bf16 only as loose as its rounding allows
BUDGET = 64  # tokens per step: a longer prompt is prefilled in several chunks


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return make_engine(tiny_llama_dir, budget=BUDGET)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    model = hf_model(tiny_llama_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


def run(engine, ids: list[int], params: SamplingParams) -> list:
    """Every output of one request, in order."""
    rid = engine.add_request(prompt_token_ids=ids, params=params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def prompt_logprobs_of(outs) -> list:
    carrying = [o for o in outs if o.prompt_logprobs]
    assert len(carrying) == 1 and carrying[0] is outs[0]  # all at once, on the first output
    return carrying[0].prompt_logprobs


def assert_matches_reference(entries, ids: list[int], expected: torch.Tensor, n: int) -> None:
    assert [e.token_id for e in entries] == ids[1:]
    for i, entry in enumerate(entries):
        row = expected[i]  # position i scores token i + 1
        assert abs(entry.logprob - float(row[ids[i + 1]])) <= TOL, (i, entry.logprob, float(row[ids[i + 1]]))
        values, top_ids = row.topk(n)
        assert {t for t, _ in entry.top} == set(top_ids.tolist()) or not EXACT, i  # bf16: near-ties may swap
        for (t, v), ref in zip(entry.top, values.tolist()):
            assert abs(v - float(row[t])) <= TOL and abs(v - ref) <= TOL


@pytest.mark.parametrize("length", [20, 3 * BUDGET + 5], ids=["one-chunk", "several-chunks"])
def test_prompt_logprobs_match_transformers(llama, reference, length):
    ids = random_prompts(1, lo=length, hi=length, seed=length)[0]
    outs = run(llama, ids, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=4))
    assert_matches_reference(prompt_logprobs_of(outs), ids, reference(ids), 4)
    assert sum(len(o.new_token_ids) for o in outs) == 3


def test_warm_prefix_cache_gives_the_same_prompt_logprobs(tiny_llama_dir, reference):
    engine = make_engine(tiny_llama_dir, budget=BUDGET)
    ids = random_prompts(1, lo=2 * BUDGET + 9, hi=2 * BUDGET + 9, seed=7)[0]
    params = SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=2)
    cold = prompt_logprobs_of(run(engine, ids, params))
    plain = run(engine, ids, SamplingParams(max_new_tokens=2, temperature=0))  # the cache now holds the prompt
    assert plain[-1].num_cached_prompt_tokens > 0
    warm = run(engine, ids, params)
    assert prompt_logprobs_of(warm) == cold  # recomputed, not read from the cache: identical
    assert warm[-1].num_cached_prompt_tokens == 0
    assert_matches_reference(warm[0].prompt_logprobs, ids, reference(ids), 2)
    assert run(engine, ids, SamplingParams(max_new_tokens=2, temperature=0))[-1].num_cached_prompt_tokens > 0


def test_zero_new_tokens_scores_the_prompt_only(llama, reference):
    ids = random_prompts(1, lo=30, hi=30, seed=3)[0]
    outs = run(llama, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason is FinishReason.LENGTH
    assert outs[0].new_token_ids == [] and outs[0].num_output_tokens == 0
    entries = outs[0].prompt_logprobs
    assert all(e.top == [] for e in entries)
    assert_matches_reference(entries, ids, reference(ids), 0)


def test_only_sample_zero_carries_prompt_logprobs(llama, reference):
    ids = random_prompts(1, lo=25, hi=25, seed=4)[0]
    rids = llama.add_samples(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=3, prompt_logprobs=1, n=3))
    outs = []
    while llama.has_unfinished():
        outs += llama.step()
    carrying = [o for o in outs if o.prompt_logprobs]
    assert [o.request_id for o in carrying] == [rids[0]]
    assert_matches_reference(carrying[0].prompt_logprobs, ids, reference(ids), 1)


def test_one_token_prompt_has_no_prompt_logprobs(llama):
    outs = run(llama, [42], SamplingParams(max_new_tokens=2, prompt_logprobs=3))
    assert all(o.prompt_logprobs is None for o in outs) and outs[-1].num_output_tokens == 2


def test_min_tokens_holds_against_a_forced_eos(llama):
    eos = min(llama.runner.eos_token_ids)
    forced = SamplingParams(max_new_tokens=10, temperature=0, logit_bias=((eos, 100.0),))
    ids = random_prompts(1, lo=8, hi=8, seed=5)[0]
    assert llama.generate(prompt_token_ids=[ids], params=forced) == [[eos]]  # eos at once without min_tokens
    for params in (forced, SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, logit_bias=((eos, 100.0),))):
        held = SamplingParams(**{**params.__dict__, "min_tokens": 5})
        out = llama.generate(prompt_token_ids=[ids], params=held)[0]
        assert len(out) == 6 and eos not in out[:5] and out[5] == eos


def test_min_tokens_masks_stop_token_ids(llama):
    ids = random_prompts(1, lo=8, hi=8, seed=6)[0]
    first = llama.generate(prompt_token_ids=[ids], params=SamplingParams(max_new_tokens=1, temperature=0))[0][0]
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(first,), logit_bias=((first, 100.0),))
    assert llama.generate(prompt_token_ids=[ids], params=params) == [[first]]
    held = SamplingParams(**{**params.__dict__, "min_tokens": 3})
    out = llama.generate(prompt_token_ids=[ids], params=held)[0]
    assert len(out) == 4 and first not in out[:3] and out[3] == first


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(prompt_logprobs=10_000), "prompt_logprobs"),
        (SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),  # 0 only when scoring the prompt
        (SamplingParams(max_new_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
    ],
)
def test_bad_values_name_their_field(llama, params, field):
    with pytest.raises(InvalidRequestError) as error:
        llama.add_request(prompt_token_ids=[1, 2, 3], params=params)
    assert error.value.field == field


def test_preemption_sends_each_prompt_logprob_once(tiny_llama_dir, reference):
    """A pool too small for every prompt at once: sequences are preempted (some mid-prefill) and
    recomputed, and each request still gets its prompt logprobs once, whole and exact."""
    tight = make_engine(tiny_llama_dir, num_blocks=40, budget=16, max_seqs=6)  # 160 slots for ~6 x 70 tokens
    prompts = random_prompts(6, lo=50, hi=60, seed=11)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=2)
    preempt, mid_prefill = tight.scheduler._preempt, []

    def recording_preempt(seq, step):  # what each victim had scored when its KV went
        mid_prefill.append(0 < seq.num_prompt_logprobs < seq.num_prompt_tokens - 1)
        preempt(seq, step)

    tight.scheduler._preempt = recording_preempt
    rids = [tight.add_request(prompt_token_ids=ids, params=params) for ids in prompts]
    outs: dict[str, list] = {rid: [] for rid in rids}
    while tight.has_unfinished():
        for out in tight.step():
            outs[out.request_id].append(out)
    assert any(mid_prefill), mid_prefill
    for rid, ids in zip(rids, prompts):
        assert_matches_reference(prompt_logprobs_of(outs[rid]), ids, reference(ids), 2)
        assert sum(len(o.new_token_ids) for o in outs[rid]) == 10
