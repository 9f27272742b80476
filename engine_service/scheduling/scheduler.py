"""Continuous batching: which tokens of which sequences the model runs in the next step.

Each step, under a token budget: (1) every decoding sequence gets its one token, oldest first, so
decodes never starve behind prefills; (2) sequences part-way through a chunked prefill get their next
chunk; (3) waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and free
KV blocks allow. When a running sequence needs a block the pool cannot give, the youngest running
sequence is preempted by recompute: its blocks are freed, its generated tokens kept, and it waits at
the front of the queue to prefill prompt + outputs again (mostly from the prefix cache, when enabled).
The oldest sequence therefore always progresses.

Parallel samples (n > 1): samples 1..n-1 wait behind sample 0 until its prompt is computed, then fork
off its blocks (reference counts, copy-on-write on the first write into a shared block) with all but the
last prompt token computed; each recomputes only that token, for its own logits. So a prompt is
prefilled once whatever n is. Should sample 0 end or lose its blocks first, they are admitted as usual.
Plain Python: no torch, no gRPC.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from tokenwire.engine.config import SchedulerConfig
from tokenwire.engine.scheduling.block_manager import NO_MATCH, BlockManager, PrefixMatch
from tokenwire.engine.scheduling.ngram_proposer import NgramProposer
from tokenwire.engine.scheduling.sequence import FinishReason, ScheduledChunk, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # what the model runs this step: decodes first, then prefills
    block_copies: list[tuple[int, int]]  # (src, dst) KV block copies to do before the forward pass
    preempted: list[Sequence]  # sent back to waiting this step; their KV is gone

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def has_prefill(self) -> bool:
        """Whether any chunk is more than one sampled token (a prompt chunk rather than a decode)."""
        return any(chunk.num_tokens - len(chunk.draft_token_ids) > 1 or not chunk.sample for chunk in self.chunks)


@dataclass
class _StepBuilder:
    """The step being built. Chunks are keyed by sequence so a preemption can take one back."""

    budget: int
    chunks: dict[Sequence, ScheduledChunk] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        start = seq.num_computed_tokens
        self.chunks[seq] = ScheduledChunk(seq, start, num_tokens, sample=start + num_tokens == seq.num_tokens)
        self.budget = max(self.budget - num_tokens, 0)

    def add_drafted(self, seq: Sequence, drafts: list[int]) -> None:
        """A decode plus its drafts: positions [num_computed_tokens, + 1 + len(drafts)), all sampled."""
        num_tokens = 1 + len(drafts)
        self.chunks[seq] = ScheduledChunk(seq, seq.num_computed_tokens, num_tokens, True, tuple(drafts))
        self.budget = max(self.budget - num_tokens, 0)

    def drop(self, seq: Sequence) -> None:
        chunk = self.chunks.pop(seq, None)
        if chunk is not None:
            self.budget += chunk.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                "need 1 <= max_num_seqs <= max_num_batched_tokens (every running sequence "
                f"must fit a decode in one step), got {config.max_num_seqs} and "
                f"{config.max_num_batched_tokens}"
            )
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()  # arrival order; preempted ones (the oldest) in front
        self.running: list[Sequence] = []  # arrival order: the last one is preempted first
        self.num_preemptions = 0
        self._by_id: dict[str, Sequence] = {}
        self._arrival: dict[Sequence, int] = {}
        self._arrivals = itertools.count()
        self._forks: dict[str, list[Sequence]] = {}  # sample 0's id -> samples waiting to fork off it
        self.num_computed_prompt_tokens = 0  # prompt positions the model has run (prefill work)
        self.proposer = (
            NgramProposer(config.ngram_min, config.ngram_max, config.num_speculative_tokens)
            if _speculative(config) == "ngram"
            else None
        )
        self.num_draft_tokens = 0  # drafts verified so far
        self.num_accepted_draft_tokens = 0  # ...and how many of them the model agreed with

    # ---- queue ----

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_requests(self) -> int:
        """Every sequence the scheduler tracks, in any state (0 once all have finished or been aborted)."""
        return len(self._by_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if not 0 < seq.num_tokens <= self.max_model_len:
            raise ValueError(f"{seq.request_id}: {seq.num_tokens} tokens, need 1 to {self.max_model_len}")
        seq.status = SequenceStatus.WAITING
        self._by_id[seq.request_id] = seq
        self._arrival[seq] = next(self._arrivals)
        self.waiting.append(seq)
        parent = self._by_id.get(seq.fork_of) if seq.fork_of else None
        if parent is not None and not self._prefilled(parent):
            self._forks.setdefault(parent.request_id, []).append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """End a waiting or running sequence now and free its blocks; None if unknown or already done."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished or self._by_id.get(seq.request_id) is not seq:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if self.proposer is not None:
            self.proposer.forget(seq)
        del self._by_id[seq.request_id], self._arrival[seq]
        self._forks.pop(seq.request_id, None)  # its samples not forked yet are admitted as usual
        if seq.fork_of in self._forks and seq in self._forks[seq.fork_of]:
            self._forks[seq.fork_of].remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- the step ----

    def schedule(self) -> SchedulerOutput:
        step = _StepBuilder(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step, decoding=True)
        self._schedule_running(step, decoding=False)
        if not step.preempted:  # under KV pressure, finish what runs before taking on more
            self._admit_waiting(step)
        return SchedulerOutput(list(step.chunks.values()), self.block_manager.pop_block_copies(), step.preempted)

    def on_step_done(self, output: SchedulerOutput, num_accepted: dict[Sequence, int] | None = None) -> None:
        """The step's KV is written: advance each sequence and index its newly filled blocks.
        `num_accepted`: how many drafts of each drafted chunk were accepted; the KV of the rejected ones is
        dropped (the sequence advances past the accepted positions only and gives back blocks beyond them).
        Call before appending sampled tokens; sequences finished or aborted meanwhile are skipped."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == chunk.start:
                seq.num_computed_tokens = chunk.end
                if chunk.draft_token_ids:
                    accepted = (num_accepted or {}).get(seq, 0)
                    self.num_draft_tokens += len(chunk.draft_token_ids)
                    self.num_accepted_draft_tokens += accepted
                    seq.num_computed_tokens = chunk.start + 1 + accepted
                    self.block_manager.truncate(seq)
                self.num_computed_prompt_tokens += max(min(chunk.end, seq.num_prompt_tokens) - chunk.start, 0)
                self.block_manager.commit(seq)
                self.block_manager.release_outside_window(seq)
                if self._prefilled(seq) and seq.request_id in self._forks:
                    self._fork_samples(seq)

    # ---- parallel samples ----

    @staticmethod
    def _prefilled(seq: Sequence) -> bool:
        return seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens >= seq.num_prompt_tokens

    def _fork_samples(self, parent: Sequence) -> None:
        """Sample 0's prompt is computed: its waiting samples take its prompt blocks, all of the prompt but
        the last token counted as computed (they still need that token's logits). They stay queued,
        holding shared blocks only, until admitted."""
        for child in self._forks.pop(parent.request_id):
            cached = child.num_prompt_tokens - 1
            self.block_manager.fork(parent, child, cached)
            child.num_computed_tokens = cached
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens  # the request's, in usage

    def _unfork_one(self) -> bool:
        """Under KV pressure, the youngest queued forked sample drops its shared blocks (it computed
        nothing itself) and will be admitted as usual. False when there is none."""
        for seq in reversed(self.waiting):
            if seq.block_table:
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                return True
        return False

    def _waits_for_fork(self, seq: Sequence) -> bool:
        return seq.fork_of is not None and seq in self._forks.get(seq.fork_of, ())

    def _schedule_running(self, step: _StepBuilder, decoding: bool) -> None:
        for seq in list(self.running):  # a snapshot: preemption removes from the live list
            if step.budget == 0:
                return
            remaining = seq.num_tokens - seq.num_computed_tokens
            if seq.status is not SequenceStatus.RUNNING or remaining <= 0 or (remaining == 1) != decoding:
                continue
            if decoding and self._schedule_drafted(seq, step):
                continue
            num_tokens = self._chunk_size(remaining, step)
            if num_tokens > 1 and self.config.enable_chunked_prefill:
                num_tokens = self._fit_chunk(seq, num_tokens, step)
            if num_tokens and self._reserve(seq, num_tokens, step):
                step.add(seq, num_tokens)

    # ---- speculative decoding ----

    def _schedule_drafted(self, seq: Sequence, step: _StepBuilder) -> bool:
        """Schedule `seq`'s decode with n-gram drafts, if it may have some, they fit the budget and their
        blocks are free without preempting anyone (drafts are a bet: never worth another's KV)."""
        if self.proposer is None or len(self.running) > self.config.speculative_max_num_seqs or not _draftable(seq):
            return False
        # Every draft and the bonus token must fit max_new_tokens and the context.
        room = min(
            seq.params.max_new_tokens - len(seq.output_token_ids) - 1,
            self.max_model_len - seq.num_tokens,
            step.budget - 1,
        )
        drafts = self.proposer.propose(seq, room)
        if not drafts:
            return False
        bm = self.block_manager
        spare = bm.num_free_blocks - bm.blocks_needed(seq, 1 + len(drafts)) - len(self.running)
        if spare < 0 or not bm.ensure_slots(seq, 1 + len(drafts)):
            return False
        step.add_drafted(seq, drafts)
        return True

    def _fit_chunk(self, seq: Sequence, num_tokens: int, step: _StepBuilder) -> int:
        """Shrink a prefill chunk to the free KV rather than preempt others for all of it; preempt
        only when not even one token fits. 0 if `seq` itself had to go."""
        if not self._reserve(seq, 1, step):
            return 0
        return min(num_tokens, self.block_manager.num_writable_tokens(seq))

    def _admit_waiting(self, step: _StepBuilder) -> None:
        bm = self.block_manager
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_fork(seq):
                return  # behind sample 0's prefill, which it will share
            if seq.block_table:  # forked: holds sample 0's prompt blocks already
                if not self._admit_forked(seq, step):
                    if self.running or not self._unfork_one():
                        return
                continue
            # Prompt logprobs are recomputed, not cached: a sequence that still owes them prefills its whole
            # prompt (its blocks still enter the cache for others).
            match = NO_MATCH if seq.needs_prompt_logprobs else bm.match_prefix(seq)
            num_tokens = self._chunk_size(seq.num_tokens - match.num_cached_tokens, step)
            if num_tokens == 0 or not bm.can_allocate(seq, num_tokens, match):
                # FIFO: nobody overtakes the head of the queue. With nothing running, only queued forked
                # samples can hold the blocks it needs: they give them back rather than deadlock.
                if num_tokens == 0 or self.running or not self._unfork_one():
                    return
                continue
            self.waiting.popleft()
            self._start(seq, match, num_tokens)
            step.add(seq, num_tokens)

    def _admit_forked(self, seq: Sequence, step: _StepBuilder) -> bool:
        num_tokens = self._chunk_size(seq.num_tokens - seq.num_computed_tokens, step)
        if num_tokens == 0 or not self.block_manager.ensure_slots(seq, num_tokens):
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=self._arrival.__getitem__)
        step.add(seq, num_tokens)
        return True

    def _start(self, seq: Sequence, match: PrefixMatch, num_tokens: int) -> None:
        seq.num_computed_tokens = self.block_manager.allocate_prefix(seq, match)
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        if not self.block_manager.ensure_slots(seq, num_tokens):
            raise RuntimeError(f"{seq.request_id}: blocks vanished between can_allocate and ensure_slots")
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=self._arrival.__getitem__)

    def _chunk_size(self, remaining: int, step: _StepBuilder) -> int:
        """How many of `remaining` prefill tokens run this step; 0 when none can."""
        if remaining <= step.budget:
            return remaining
        if self.config.enable_chunked_prefill:
            return step.budget
        # Without chunking a prompt runs whole. One longer than the whole budget would never fit,
        # so it runs alone in a step that is otherwise empty rather than starve.
        return remaining if not step.chunks else 0

    def _reserve(self, seq: Sequence, num_tokens: int, step: _StepBuilder) -> bool:
        """Find blocks for `seq`, preempting the youngest running sequences (possibly `seq` itself)."""
        while not self.block_manager.ensure_slots(seq, num_tokens):
            if self._unfork_one():  # cheaper than preempting: a queued fork computed nothing
                continue
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, step: _StepBuilder) -> None:
        """Preemption by recompute: free the KV, keep the generated tokens, requeue ahead of newcomers."""
        self.running.remove(seq)
        step.drop(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        step.preempted.append(seq)
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        # Preempted sequences are older than anything never admitted, so they sit at the front,
        # among themselves in arrival order; the scan stops within that short front run.
        key, i = self._arrival[seq], 0
        while i < len(self.waiting) and self._arrival[self.waiting[i]] < key:
            i += 1
        self.waiting.insert(i, seq)


def _speculative(config: SchedulerConfig) -> str:
    if config.speculative not in ("off", "ngram"):
        raise ValueError(f"speculative: 'off' or 'ngram', got {config.speculative!r}")
    return config.speculative


def _draftable(seq: Sequence) -> bool:
    """Whether verification is exact for `seq`: every position's logits processed alike (no penalties over
    a history the drafts would change, no min_tokens mask still applying), one sample. Greedy and sampled
    requests alike (worker/speculative.py: the rejection rule); a grammar masks each drafted position by
    its state after the drafts before it (worker/sampler.py). Other requests decode one token a step."""
    params = seq.params
    return not params.uses_penalties and params.n == 1 and len(seq.output_token_ids) >= params.min_tokens
