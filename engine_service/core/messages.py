"""The engine core's boundary: one dataclass per command (front -> core) and per reply (core -> front).

Both directions carry these objects as they are: pickled over the core process's two pipes, or handed
over in memory when the core runs on a thread (`core.process.InMemoryTransport`). Pickle was kept over
msgspec by measurement: a step's outputs cost a fraction of a percent of the step to pickle and unpickle
(docs/architecture.md, "The process boundary"). Receivers dispatch on `kind` or type, never on the
position of a field.

Commands are applied by the core loop between two steps, in the order sent; replies to one front arrive
in the order the core made them, so a `StatsReply` follows every output of the commands sent before its
query.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tokenwire.engine.core.outputs import EngineStats, RequestOutput
from tokenwire.engine.scheduling.sequence import Sequence

if TYPE_CHECKING:
    from tokenwire.engine.request.preparer import RequestPreparer


class Kind(enum.Enum):
    # front -> core
    ADD = "add"
    ABORT = "abort"
    QUERY_STATS = "query_stats"
    STOP = "stop"
    # core -> front
    READY = "ready"
    LOAD_FAILED = "load_failed"
    STEP_OUTPUTS = "step_outputs"
    STATS_REPLY = "stats_reply"


# ---- commands ----


@dataclass(frozen=True)
class AddRequest:
    """Queue a prepared, validated sequence. Its grammar matcher (if constrained) is built in the core."""

    kind: ClassVar[Kind] = Kind.ADD
    seq: Sequence
    want_text: bool  # the caller wants text deltas (detokenized in the core)


@dataclass(frozen=True)
class AbortRequest:
    """End a request at the next step boundary and free its KV blocks; its final output says ABORT."""

    kind: ClassVar[Kind] = Kind.ABORT
    request_id: str


@dataclass(frozen=True)
class QueryStats:
    """Ask for a stats snapshot, answered by a StatsReply carrying the same token."""

    kind: ClassVar[Kind] = Kind.QUERY_STATS
    token: int


@dataclass(frozen=True)
class Stop:
    """Abort everything in flight (each request gets its final output), then end the loop."""

    kind: ClassVar[Kind] = Kind.STOP


Command = AddRequest | AbortRequest | QueryStats | Stop


# ---- replies ----


@dataclass(frozen=True)
class CoreInfo:
    """What the front needs from the loaded model to validate requests and answer GetModelInfo."""

    architecture: str
    model_impl: str  # the forward serving it: "native" or "transformers" (the fallback)
    device: str
    dtype: str  # "float32", "bfloat16", ...
    kv_cache_dtype: str  # dtype, or a narrower one under a float32 model
    quantization: str  # the linear weights' form, in words: "none", "gguf (168 x Q4_1)", "int8 (...)"
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class CoreStats:
    """Engine state after a step; the front reads the latest one without asking the core."""

    engine: EngineStats
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_live_requests: int  # requests the core loop still owes a final output


@dataclass(frozen=True)
class Ready:
    """Sent once: the model is loaded and warmed up."""

    kind: ClassVar[Kind] = Kind.READY
    info: CoreInfo
    # In process only: the core's own preparer (its tokenizer and grammar compiler), which the front then
    # shares instead of loading a second tokenizer. None across a pipe, where the front loads its own.
    preparer: RequestPreparer | None = None


@dataclass(frozen=True)
class LoadFailed:
    """Sent instead of Ready when the model could not be loaded; the core then exits."""

    kind: ClassVar[Kind] = Kind.LOAD_FAILED
    message: str


@dataclass(frozen=True)
class StepOutputs:
    """Every request's news from one step (or from commands that ended requests), with fresh stats."""

    kind: ClassVar[Kind] = Kind.STEP_OUTPUTS
    outputs: list[RequestOutput]
    stats: CoreStats


@dataclass(frozen=True)
class StatsReply:
    kind: ClassVar[Kind] = Kind.STATS_REPLY
    token: int
    stats: CoreStats


Reply = Ready | LoadFailed | StepOutputs | StatsReply
