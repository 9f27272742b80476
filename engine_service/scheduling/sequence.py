"""One request's state as it moves through the engine. Plain Python: no torch, no gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenwire.engine.request.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context
    ABORT = "abort"  # aborted by the caller (cancel, deadline, shutdown)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    seed: int = 0  # sampling seed: params.seed, or one the engine drew for it
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)  # KV block ids, in position order
    num_computed_tokens: int = 0  # tokens whose KV is already in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    num_preemptions: int = 0
    # Structured output: a grammar.GrammarMatcher at the position of output_token_ids (which survive
    # preemption, so the matcher does too); None when unconstrained.
    grammar: object | None = None
    # Parallel samples (SamplingParams.n > 1): which sample this is, and for samples 1..n-1 the request id
    # of sample 0, whose prefill they share (the scheduler forks them off its blocks once it is done).
    sample_index: int = 0
    fork_of: str | None = None
    # params.prompt_logprobs: prompt positions whose next-token logprobs are out (position p scores prompt
    # token p + 1, so positions [0, num_prompt_tokens - 1) are wanted). Survives preemption, so a
    # recompute never sends them twice.
    num_prompt_logprobs: int = 0

    def __getstate__(self) -> dict:
        """Pickled for the engine core's pipe without the matcher (not picklable); the core rebuilds it."""
        return {**self.__dict__, "grammar": None}

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Owes prompt logprobs (sample 0 computes them for the whole request). Such a sequence skips the
        prefix cache: the logits of the positions a cache hit would skip are exactly what it needs."""
        return (
            self.params.prompt_logprobs is not None
            and self.sample_index == 0
            and self.num_prompt_logprobs < self.num_prompt_tokens - 1
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class ScheduledChunk:
    """Positions [start, start + num_tokens) of one sequence, fed to the model in this step."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens when scheduled
    num_tokens: int  # a prefill chunk (many), a decode (1), or a decode plus its drafts
    sample: bool  # the chunk reaches the sequence's last known token: sample the next one
    # Speculative decoding: ids proposed to follow the last known token, verified in this forward. Each of
    # the chunk's 1 + len(drafts) positions is sampled; the longest agreeing prefix is kept, plus one more.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.num_tokens
