"""Scheduler on plain objects: `run_step` plays the engine (schedule, write KV into a simulated store,
on_step_done, append a token, finish at max_new_tokens) and checks every step's invariants."""

from __future__ import annotations

import random

import pytest
from tokenwire.engine.config import SchedulerConfig
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.block_manager import BlockManager
from tokenwire.engine.scheduling.scheduler import Scheduler, SchedulerOutput
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, chunked=True, prefix=True, max_model_len=512):
    bm = BlockManager(num_blocks, BS, enable_prefix_cache=prefix)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked),
        bm,
        max_model_len,
    )
    sched.kv = {}  # simulated KV store: slot -> the token ids whose KV it holds
    return sched


def make_seq(rid, num_prompt, max_new=4, first_token=0):
    return Sequence(rid, [first_token + i for i in range(num_prompt)], SamplingParams(max_new_tokens=max_new))


def run_step(sched: Scheduler, token=7) -> SchedulerOutput:
    out = sched.schedule()
    check_step(sched, out)
    write_kv(sched, out)
    sched.on_step_done(out)
    for chunk in out.chunks:
        if chunk.sample:
            seq = chunk.seq
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                sched.finish(seq, FinishReason.LENGTH)
    return out


def run_to_completion(sched, max_steps=2000):
    steps = []
    while sched.has_unfinished():
        steps.append(run_step(sched))
        assert len(steps) < max_steps, "no progress"
    assert_all_free(sched)
    return steps


def check_step(sched, out):
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens or len(out.chunks) == 1
    assert len({id(c.seq) for c in out.chunks}) == len(out.chunks)
    assert sched.num_running <= sched.config.max_num_seqs
    for chunk in out.chunks:
        seq = chunk.seq
        assert seq.status is SequenceStatus.RUNNING and chunk.num_tokens >= 1
        assert chunk.start == seq.num_computed_tokens and chunk.end <= seq.num_tokens
        assert chunk.sample == (chunk.end == seq.num_tokens)
        assert len(seq.block_table) * BS >= chunk.end
    assert not {id(s) for s in out.preempted} & {id(c.seq) for c in out.chunks}
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0


def write_kv(sched, out):
    kv = sched.kv
    for src, dst in out.block_copies:
        for i in range(BS):
            if src * BS + i in kv:
                kv[dst * BS + i] = kv[src * BS + i]
    for chunk in out.chunks:
        seq, tokens = chunk.seq, tuple(chunk.seq.all_token_ids)
        for pos in range(chunk.start):  # what attention reads: cached or computed before
            assert kv.get(slot(seq, pos)) == tokens[: pos + 1], f"{seq.request_id} reads a wrong KV at {pos}"
        for pos in range(chunk.start, chunk.end):
            kv[slot(seq, pos)] = tokens[: pos + 1]


def slot(seq, pos):
    return seq.block_table[pos // BS] * BS + pos % BS


def assert_all_free(sched):
    bm = sched.block_manager
    assert sched.num_running == 0 and sched.num_waiting == 0 and not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_prefill_then_decode_then_finish():
    sched = make_scheduler()
    sched.add(seq := make_seq("a", 10, max_new=3))
    first = run_step(sched)
    assert [(c.start, c.num_tokens, c.sample) for c in first.chunks] == [(0, 10, True)]
    assert seq.status is SequenceStatus.RUNNING and sched.num_running == 1
    assert [(c.start, c.num_tokens) for c in run_step(sched).chunks] == [(10, 1)]
    run_step(sched)
    assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH
    assert_all_free(sched)


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make_scheduler(budget=16, max_seqs=3)
    for i in range(6):
        sched.add(make_seq(f"s{i}", 7, max_new=5, first_token=100 * i))
    for out in run_to_completion(sched):
        assert out.num_batched_tokens <= 16
        assert len(out.chunks) <= 3


def test_decodes_are_scheduled_before_prefills():
    sched = make_scheduler(budget=16)
    sched.add(make_seq("old", 5, max_new=8))
    run_step(sched)
    sched.add(make_seq("new", 40, first_token=100))
    out = run_step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("old", 1), ("new", 15)]
    assert out.has_prefill  # the step profile files it under prefill steps
    assert [run_step(sched).has_prefill for _ in range(3)] == [True, True, False]  # 15 + 10 more, then decodes


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_end():
    sched = make_scheduler(budget=16)
    sched.add(seq := make_seq("long", 50, max_new=2))
    chunks = [run_step(sched).chunks[0] for _ in range(4)]
    assert [(c.start, c.num_tokens, c.sample) for c in chunks] == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
    ]
    assert seq.output_token_ids == [7]
    run_to_completion(sched)


def test_without_chunking_a_prompt_waits_for_a_step_it_fits_whole():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add(make_seq("a", 10, max_new=3))
    sched.add(make_seq("b", 10, max_new=3, first_token=100))
    assert [(c.seq.request_id, c.num_tokens) for c in run_step(sched).chunks] == [("a", 10)]
    assert [(c.seq.request_id, c.num_tokens) for c in run_step(sched).chunks] == [("a", 1), ("b", 10)]
    run_to_completion(sched)


def test_without_chunking_a_prompt_longer_than_the_budget_runs_alone():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add(make_seq("short", 4, max_new=3))
    sched.add(make_seq("huge", 40, max_new=2, first_token=100))
    assert [c.seq.request_id for c in run_step(sched).chunks] == ["short"]
    while sched.get("short") is not None:
        assert [c.seq.request_id for c in run_step(sched).chunks] == ["short"]
    assert [(c.seq.request_id, c.num_tokens) for c in run_step(sched).chunks] == [("huge", 40)]
    run_to_completion(sched)


def test_admission_waits_for_free_blocks():
    sched = make_scheduler(num_blocks=5, budget=64)
    sched.add(a := make_seq("a", 16, max_new=2))  # 4 blocks, then a 5th for its first decode
    sched.add(b := make_seq("b", 8, first_token=100))  # 2 blocks: does not fit beside a
    run_step(sched)
    assert sched.num_running == 1 and sched.num_waiting == 1 and b.status is SequenceStatus.WAITING
    run_step(sched)
    assert a.is_finished and b.status is SequenceStatus.WAITING
    assert [c.seq.request_id for c in run_step(sched).chunks] == ["b"]
    run_to_completion(sched)


def test_preemption_by_recompute_under_block_pressure():
    sched = make_scheduler(num_blocks=6, budget=64, prefix=False)
    sched.add(old := make_seq("old", 8, max_new=8))
    sched.add(young := make_seq("young", 8, max_new=8, first_token=100))
    sched.add(newer := make_seq("newer", 9, max_new=1, first_token=200))
    run_step(sched)  # 2 + 2 blocks; newer's 3 do not fit
    preempted = None
    for _ in range(8):
        out = run_step(sched)
        if out.preempted:
            preempted = out
            break
    assert preempted is not None and preempted.preempted == [young]
    assert [c.seq for c in preempted.chunks] == [old]
    assert young.num_preemptions == 1 and sched.num_preemptions == 1
    outputs = list(young.output_token_ids)
    assert outputs and young.num_computed_tokens == 0
    assert list(sched.waiting) == [young, newer]  # ahead of the newcomer
    run_to_completion(sched)
    assert young.output_token_ids[: len(outputs)] == outputs and len(young.output_token_ids) == 8
    assert old.is_finished and newer.is_finished


def test_readmitted_sequence_recomputes_prompt_and_outputs():
    sched = make_scheduler(num_blocks=5, budget=64, prefix=False)
    sched.add(old := make_seq("old", 8, max_new=6))
    sched.add(young := make_seq("young", 6, max_new=6, first_token=100))
    while not young.num_preemptions:
        run_step(sched)
    known = young.num_tokens
    assert young.num_tokens > young.num_prompt_tokens
    readmit = None
    while readmit is None:
        readmit = next((c for c in run_step(sched).chunks if c.seq is young), None)
    assert old.is_finished
    assert (readmit.start, readmit.num_tokens, readmit.sample) == (0, known, True)
    run_to_completion(sched)


def test_prefix_hits_are_counted_once_and_fully_cached_prompts_copy_on_write():
    sched = make_scheduler()
    sched.add(a := make_seq("a", 8, max_new=6))
    run_step(sched)
    sched.add(b := make_seq("b", 10))  # shares a's 2 full blocks
    sched.add(c := make_seq("c", 8))  # a's whole prompt: last token recomputed
    out = run_step(sched)
    assert b.num_cached_prompt_tokens == 8 and c.num_cached_prompt_tokens == 7
    assert [(ch.seq.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == [
        ("a", 8, 1),
        ("b", 8, 2),
        ("c", 7, 1),
    ]
    ((src, dst),) = out.block_copies
    assert src == a.block_table[1] and c.block_table == [a.block_table[0], dst]
    run_to_completion(sched)
    assert sched.block_manager.prefix_cache_hit_rate > 0


def test_abort_from_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_seqs=1)
    sched.add(running := make_seq("running", 9, max_new=50))
    sched.add(waiting := make_seq("waiting", 5, first_token=100))
    run_step(sched)
    assert sched.abort("waiting") is waiting and waiting.finish_reason is FinishReason.ABORT
    assert sched.abort("running") is running and running.is_finished
    assert sched.abort("running") is None and sched.abort("unknown") is None
    assert_all_free(sched)


def test_finished_or_aborted_during_a_step_is_ignored_by_on_step_done():
    sched = make_scheduler()
    sched.add(seq := make_seq("a", 5))
    out = sched.schedule()
    sched.abort("a")
    sched.on_step_done(out)
    assert seq.num_computed_tokens == 0
    assert_all_free(sched)


def test_rejects_bad_configs_and_duplicates():
    with pytest.raises(ValueError):
        make_scheduler(budget=4, max_seqs=8)
    sched = make_scheduler(max_model_len=8)
    sched.add(make_seq("a", 3))
    with pytest.raises(ValueError):
        sched.add(make_seq("a", 3))
    with pytest.raises(ValueError):
        sched.add(make_seq("b", 9))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("chunked, prefix", [(True, True), (True, False), (False, True), (False, False)])
def test_random_workload_finishes_everything_and_frees_every_block(seed, chunked, prefix):
    rng = random.Random(seed)
    sched = make_scheduler(
        num_blocks=rng.randint(10, 24), budget=rng.choice([8, 16, 32]), max_seqs=6, chunked=chunked, prefix=prefix
    )
    shared = [rng.randrange(50) for _ in range(12)]
    for i in range(300):
        if rng.random() < 0.4:
            # Shared heads give prefix hits; a bare head of whole blocks gives copy-on-write.
            head = shared[: rng.randint(0, 12)]
            tail = [rng.randrange(50) for _ in range(rng.randint(0 if head else 1, 14))]
            sched.add(Sequence(f"s{i}", head + tail, SamplingParams(max_new_tokens=rng.randint(1, 12))))
        if rng.random() < 0.05 and sched.has_unfinished():
            sched.abort(rng.choice(list(sched.waiting) + sched.running).request_id)
        run_step(sched, token=rng.randrange(50))
    run_to_completion(sched)
