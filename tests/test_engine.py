"""The in-process engine end to end on tiny models: exactness vs transformers, batching invariance,
prefix cache, chunked prefill, preemption, block accounting and the encode-once counter."""

from __future__ import annotations

import random

import pytest
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import FinishReason
from tokenwire.serving.errors import InvalidRequestError

from tests.reference import ENGINE_DTYPE, EXACT, assert_greedy_matches_reference, assert_runs_agree

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def make_engine(model_dir, num_blocks=256, block_size=4, budget=64, max_seqs=16, prefix=True, chunked=True):
    return LLMEngine(
        EngineConfig(
            model=model_dir,
            device="cpu",
            dtype=ENGINE_DTYPE,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_cache=prefix),
            scheduler=SchedulerConfig(
                max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked
            ),
        )
    )


def random_prompts(n, lo=1, hi=40, seed=0, vocab=49152):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_all_blocks_free(engine):
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return make_engine(tiny_llama_dir)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_greedy_matches_transformers(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    prompts = random_prompts(6, seed=1)
    engine = make_engine(model_dir)
    assert_greedy_matches_reference(model_dir, prompts, engine.generate(prompt_token_ids=prompts, params=GREEDY))
    assert_all_blocks_free(engine)


def test_batch_equals_one_at_a_time(tiny_llama_dir, llama):
    prompts = random_prompts(8, seed=2)
    seeded = [
        SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True) for i in range(8)
    ]

    def alone(params):
        return [llama.generate(prompt_token_ids=[p], params=[sp])[0] for p, sp in zip(prompts, params)]

    batched = llama.generate(prompt_token_ids=prompts, params=GREEDY)
    assert_runs_agree(tiny_llama_dir, prompts, batched, alone([GREEDY] * 8))
    if EXACT:  # seeded draws are batch-invariant given the same logits, which bf16 does not promise
        assert llama.generate(prompt_token_ids=prompts, params=seeded) == alone(seeded)
    assert_all_blocks_free(llama)


def test_prefix_cache_on_equals_off_and_hits(tiny_llama_dir, llama):
    system = random_prompts(1, lo=24, hi=24, seed=3)[0]
    prompts = [system + tail for tail in random_prompts(6, lo=1, hi=9, seed=4)]
    off = make_engine(tiny_llama_dir, prefix=False).generate(prompt_token_ids=prompts, params=GREEDY)
    llama.generate(prompt_token_ids=prompts[:1], params=GREEDY)  # warm the cache with the shared prefix
    rid = llama.add_request(prompt_token_ids=prompts[1], params=GREEDY)
    cached = None
    while llama.has_unfinished():
        for out in llama.step():
            if out.finished and out.request_id == rid:
                cached = out.num_cached_prompt_tokens
    assert cached == 24  # 6 full blocks of 4 tokens
    assert_runs_agree(tiny_llama_dir, prompts, llama.generate(prompt_token_ids=prompts, params=GREEDY), off)
    assert llama.stats().prefix_cache_hit_rate > 0
    assert_all_blocks_free(llama)


def test_fully_cached_prompt_is_recomputed_copy_on_write(llama):
    prompt = random_prompts(1, lo=16, hi=16, seed=5)[0]  # exactly 4 full blocks
    first = llama.generate(prompt_token_ids=[prompt], params=GREEDY)
    assert llama.generate(prompt_token_ids=[prompt, prompt], params=GREEDY) == first * 2
    assert_all_blocks_free(llama)


def test_chunked_prefill_equals_unchunked(tiny_llama_dir):
    prompts = random_prompts(5, lo=30, hi=60, seed=6)
    chunked = make_engine(tiny_llama_dir, budget=16, chunked=True)
    whole = make_engine(tiny_llama_dir, budget=512, chunked=False)
    assert chunked.generate(prompt_token_ids=prompts, params=GREEDY) == whole.generate(
        prompt_token_ids=prompts, params=GREEDY
    )


def test_preemption_keeps_outputs_identical(tiny_llama_dir, llama):
    prompts = random_prompts(8, lo=10, hi=20, seed=7)
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, seed=i, ignore_eos=True) for i in range(8)]
    tight = make_engine(tiny_llama_dir, num_blocks=24, prefix=False)  # 96 token slots for ~8 x 40
    assert tight.generate(prompt_token_ids=prompts, params=params) == llama.generate(
        prompt_token_ids=prompts, params=params
    )
    assert tight.stats().num_preemptions > 0
    assert_all_blocks_free(tight)


def test_encode_counter_ids_cost_zero_text_costs_one(llama):
    before = llama.num_prompt_encodes
    llama.generate(prompt_token_ids=[[5, 6, 7]], params=GREEDY)
    assert llama.num_prompt_encodes == before
    text_out = llama.generate(prompts=["Hello there, tokenwire"], params=GREEDY)
    assert llama.num_prompt_encodes == before + 1
    ids = llama.tokenizer.encode("Hello there, tokenwire")
    assert llama.generate(prompt_token_ids=[ids], params=GREEDY) == text_out
    assert llama.num_prompt_encodes == before + 1


def test_abort_frees_blocks_and_ends_with_abort(llama):
    rids = [
        llama.add_request(prompt_token_ids=p, params=SamplingParams(max_new_tokens=50, ignore_eos=True))
        for p in random_prompts(4, seed=8)
    ]
    llama.step()
    ends = [llama.abort(rid) for rid in rids[:2]]
    assert all(e.finished and e.finish_reason is FinishReason.ABORT for e in ends)
    assert llama.abort(rids[0]) is None  # exactly one terminal output
    finished = set()
    while llama.has_unfinished():
        finished |= {o.request_id for o in llama.step() if o.finished}
    assert finished == set(rids[2:])
    assert_all_blocks_free(llama)


def test_stop_conditions(llama):
    ids = llama.generate(prompt_token_ids=[[10, 11, 12]], params=GREEDY)[0]
    stop_id = ids[3]
    out = llama.generate(
        prompt_token_ids=[[10, 11, 12]],
        params=SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_id,)),
    )[0]
    assert out == ids[: ids.index(stop_id) + 1]
    text = llama.tokenizer.decode(ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    llama.add_request(
        prompt_token_ids=[10, 11, 12],
        want_text=True,
        params=SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)),
    )
    pieces, reason = [], None
    while llama.has_unfinished():
        for o in llama.step():
            pieces.append(o.text_delta)
            reason = o.finish_reason if o.finished else reason
    assert reason is FinishReason.STOP
    assert "".join(pieces) == text[: text.find(stop)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_token_ids=[]), "prompt_token_ids"),
        (dict(prompt_token_ids=[1, 10**9]), "prompt_token_ids"),
        (dict(prompt=""), "prompt"),
        (dict(), "prompt"),
        (dict(prompt="x", prompt_token_ids=[1]), "prompt"),
        (dict(prompt_token_ids=[1] * 5000), "prompt"),
        (dict(prompt_token_ids=[1], params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        (dict(prompt_token_ids=[1], params=SamplingParams(temperature=float("nan"))), "temperature"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_p=0.0)), "top_p"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_k=-1)), "top_k"),
        (dict(prompt_token_ids=[1], params=SamplingParams(logprobs=1000)), "logprobs"),
    ],
)
def test_bad_requests_rejected_at_submission(llama, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        llama.add_request(**kwargs)
    assert info.value.field == field
    assert not llama.has_unfinished()


def test_smollm2_greedy_matches_transformers(smollm2_dir):
    engine = LLMEngine(
        EngineConfig(model=smollm2_dir, device="cpu", dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=128))
    )
    prompts = [
        engine.tokenizer.encode(t)
        for t in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    assert_greedy_matches_reference(smollm2_dir, prompts, engine.generate(prompt_token_ids=prompts, params=params))


# ---- parallel samples (SamplingParams.n) ----


def _samples(engine, prompt, params):
    """Generate one request's samples by hand: (ids per sample, final outputs by sample index)."""
    rids = engine.add_samples(prompt_token_ids=prompt, params=params)
    ids: dict[str, list[int]] = {rid: [] for rid in rids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finals[out.sample_index] = out
    return [ids[rid] for rid in rids], finals


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("length", [17, 16])  # a partial last block (copy-on-write) and a full one
def test_n_samples_prefill_once(tiny_llama_dir, prefix, length):
    engine = make_engine(tiny_llama_dir, prefix=prefix)
    prompt = random_prompts(1, lo=length, hi=length, seed=20)[0]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True, n=4)
    outs, finals = _samples(engine, prompt, params)
    # The prompt runs once; samples 1..3 each recompute only its last token for their own logits.
    assert engine.scheduler.num_computed_prompt_tokens == length + 3
    assert sorted(finals) == [0, 1, 2, 3]
    assert all(f.num_prompt_tokens == length and f.num_output_tokens == 8 for f in finals.values())
    assert len({tuple(o) for o in outs}) > 1  # distinct seeds, distinct samples
    assert_all_blocks_free(engine)


def test_n_samples_seeded_reproducible_and_sample0_is_n1(tiny_llama_dir, llama):
    prompt = random_prompts(1, lo=13, hi=13, seed=21)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, seed=42, ignore_eos=True, n=3)
    first, _ = _samples(llama, prompt, params)
    tight = make_engine(tiny_llama_dir, budget=8, max_seqs=4)  # chunked prefill of sample 0, then the fork
    assert _samples(tight, prompt, params)[0] == first
    single = SamplingParams(max_new_tokens=10, temperature=0.9, seed=42, ignore_eos=True)
    assert llama.generate(prompt_token_ids=[prompt], params=single)[0] == first[0]
    assert llama.generate(prompt_token_ids=[prompt], params=params) == first
    assert_all_blocks_free(llama)
    assert_all_blocks_free(tight)


def test_n_greedy_samples_equal_the_single_answer(llama):
    prompt = random_prompts(1, lo=9, hi=9, seed=22)[0]
    one = llama.generate(prompt_token_ids=[prompt], params=GREEDY)[0]
    n3 = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, n=3)
    assert llama.generate(prompt_token_ids=[prompt], params=n3) == [one] * 3
    assert_all_blocks_free(llama)


def test_n_samples_abort_frees_all_blocks(llama):
    prompt = random_prompts(1, lo=30, hi=30, seed=23)[0]
    rids = llama.add_samples(prompt_token_ids=prompt, params=SamplingParams(max_new_tokens=40, ignore_eos=True, n=4))
    llama.step()  # sample 0's prefill; the others fork off it
    llama.step()
    ends = [llama.abort(rid) for rid in rids]
    assert all(e.finished and e.finish_reason is FinishReason.ABORT for e in ends)
    assert not llama.has_unfinished()
    assert_all_blocks_free(llama)


def test_n_samples_one_token_each(llama):
    """Sample 0 ends in the very step its prefill completes: the fork still happened first."""
    prompt = random_prompts(1, lo=11, hi=11, seed=24)[0]
    outs, _ = _samples(llama, prompt, SamplingParams(max_new_tokens=1, seed=3, n=5))
    assert [len(o) for o in outs] == [1] * 5
    assert_all_blocks_free(llama)


@pytest.mark.parametrize("n", [0, 17, 2.5])
def test_n_out_of_range_names_n(llama, n):
    with pytest.raises(InvalidRequestError) as err:
        llama.add_request(prompt_token_ids=[5, 6], params=SamplingParams(n=n))
    assert err.value.field == "n"


def test_n_samples_under_kv_pressure_finish_and_free(tiny_llama_dir, llama):
    """A pool far too small for n forks at once: queued forks give their blocks back, samples are
    preempted and recomputed, and every sample still matches the roomy engine's."""
    prompt = random_prompts(1, lo=30, hi=30, seed=25)[0]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=9, ignore_eos=True, n=4)
    tight = make_engine(tiny_llama_dir, num_blocks=12, prefix=False)  # 48 slots for ~4 x 42 tokens
    assert tight.generate(prompt_token_ids=[prompt], params=params) == llama.generate(
        prompt_token_ids=[prompt], params=params
    )
    assert_all_blocks_free(tight)
