"""What the engine hands out: per-step deltas for each request, and engine-wide stats."""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenwire.engine.sequence import FinishReason


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # top-n alternatives (id, logprob), best first


@dataclass
class RequestTimings:
    arrival_time: float                      # time.monotonic() at submission
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
    text_delta: str = ""                     # only when the request asked for text or has stop strings
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None                 # set when the engine failed this request
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: RequestTimings | None = None    # on the final output


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_prompt_encodes: int                  # prompts this engine tokenized itself (text requests)
    prefix_cache_hit_rate: float
    num_preemptions: int
    extra: dict = field(default_factory=dict)
