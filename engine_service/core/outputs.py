"""What the engine hands out: per-step deltas for each request, and engine-wide stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tokenwire.engine.scheduling.sequence import FinishReason


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # top-n alternatives (id, logprob), best first


class StopKind(enum.Enum):
    EOS = "eos"  # one of the model's eos ids
    TOKEN_ID = "stop_token_id"  # an id of SamplingParams.stop_token_ids
    STRING = "stop_string"  # a string of SamplingParams.stop


@dataclass(frozen=True)
class StopDetail:
    """What ended a request whose finish_reason is STOP."""

    kind: StopKind
    token_id: int | None = None  # EOS, TOKEN_ID: the id
    text: str | None = None  # STRING: the stop string as given

    @classmethod
    def for_token(cls, token_id: int, eos: bool) -> StopDetail:
        return cls(StopKind.EOS if eos else StopKind.TOKEN_ID, token_id=token_id)


@dataclass
class RequestTimings:
    arrival_time: float  # time.monotonic() at submission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def queue_wait(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class RequestOutput:
    """One request's news from one engine step. Exactly one output per request has `finished=True`."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    text_delta: str = ""  # only when the request asked for text or has stop strings
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the engine failed or refused this request
    error_field: str | None = None  # with `error`: the request field it refused (INVALID_ARGUMENT)
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: RequestTimings | None = None  # on the final output
    stop_detail: StopDetail | None = None  # on the final output, when finish_reason is STOP
    sample_index: int = 0  # which of the request's n samples (Sequence.sample_index)
    # SamplingParams.prompt_logprobs: prompt tokens 1.. (the first has none), on sample 0's first output
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_prompt_encodes: int  # prompts this engine tokenized itself (text requests)
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_requests: int = 0  # requests the engine holds state for (0 once all have ended)
    num_scheduled_requests: int = 0  # ...and the scheduler's count (running, waiting, swapped)
    num_draft_tokens: int = 0  # speculative drafts verified
    num_accepted_draft_tokens: int = 0  # ...and accepted

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
