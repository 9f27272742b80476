"""The EngineService gRPC handlers (grpc.aio).

Handlers validate and encode off the event loop (`asyncio.to_thread(_prepare, ...)`, with the core
client's RequestPreparer), hand the prepared sequences to the engine core (CoreClient.submit), and read
their outputs from a per-request asyncio queue that the core client fills on the event loop (one core message per step carries every request's
outputs). Whatever way a handler exits (finish, error, client cancel, deadline, shutdown) an unfinished
request is aborted inside the engine, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import grpc
from tokenwire.engine.core.outputs import RequestOutput
from tokenwire.engine.edge import convert
from tokenwire.engine.edge.submission import Submitted
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence
from tokenwire.serving.errors import (
    FIELD_METADATA_KEY,
    REASON_METADATA_KEY,
    REASON_TOKENIZER_MISMATCH,
    InvalidRequestError,
    bounded,
)
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

if TYPE_CHECKING:  # kept out of the import path: the server binds its port before loading torch
    from tokenwire.engine.edge.core_client import CoreClient
    from tokenwire.engine.request.preparer import RequestPreparer

log = logging.getLogger(__name__)

# Request ids land in logs and metrics: printable ASCII without spaces, so none can forge a log line.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,256}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class _Refused(Exception):
    """A request the servicer turns into an error status (raised before or during its stream)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.reason = code, message, field, reason

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The offending field and the failed precondition, for clients that map errors without parsing."""
        return (((FIELD_METADATA_KEY, bounded(self.field)),) if self.field else ()) + (
            ((REASON_METADATA_KEY, self.reason),) if self.reason else ()
        )


def _messages(submitted: Submitted, outputs: Seq[RequestOutput]) -> list[pb.GenerateResponse]:
    """One stream message per sample present in `outputs`, in order of first appearance."""
    by_sample: dict[str, list[RequestOutput]] = {}
    for out in outputs:
        by_sample.setdefault(out.request_id, []).append(out)
    return [
        convert.generate_response(submitted.request_id, outs, submitted.index_of[sample_id])
        for sample_id, outs in by_sample.items()
    ]


def _raise_if_failed(
    output: RequestOutput, core_death: str | None, request: pb.GenerateRequest, field_prefix: str = ""
) -> None:
    """Errors travel as a status, never inside an OK stream."""
    if output.error is not None and output.error == core_death:
        raise _Refused(grpc.StatusCode.UNAVAILABLE, core_death)
    if output.error is not None and output.error_field is not None:  # the core refused a field (a grammar)
        field = field_prefix + convert.request_field_path(output.error_field, request)
        message = output.error.removeprefix(f"{output.error_field}: ")
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)
    if output.error is not None:
        raise _Refused(grpc.StatusCode.INTERNAL, f"the engine failed this request: {output.error}")
    if output.finished and output.finish_reason is FinishReason.ABORT:
        # Not our own abort (that ends the handler first): the engine loop is shutting down.
        raise _Refused(grpc.StatusCode.UNAVAILABLE, "request aborted: the engine is shutting down")


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """Admission: at most `max_pending_requests` requests in flight, of which at most
    `max_waiting_requests` not generating yet; past either bound a request gets RESOURCE_EXHAUSTED at
    once, before any work, rather than queueing without bound."""

    def __init__(self, max_pending_requests: int, max_waiting_requests: int | None = None):
        self.max_pending_requests = max_pending_requests
        self.max_waiting_requests = max_waiting_requests or max_pending_requests
        self.core: CoreClient | None = None
        self.draining = False
        self._active: set[str] = set()  # request ids being served (also refuses duplicates)
        self._waiting: set[str] = set()  # ...of which those with no output yet (queued or prefilling)
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, core: CoreClient) -> None:
        """Start serving generation once the model is loaded and warmed up."""
        self.core = core

    @property
    def num_active_requests(self) -> int:
        return len(self._active)

    async def wait_idle(self) -> None:
        """Returns once no request is being served (used while draining)."""
        await self._idle.wait()

    # ---- RPCs ----

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        try:
            core = self._serving_core()
            with self._reserve([request.request_id]) as (rid,):
                seqs = await asyncio.to_thread(
                    _prepare, core.preparer, core.info.tokenizer_fingerprint, request, rid, arrival
                )
                submitted = Submitted(core, seqs, request.return_text, self._waiting.discard)
                try:
                    while not submitted.finished:
                        outputs = await submitted.next_outputs()
                        for output in outputs:
                            _raise_if_failed(output, core.death, request)
                        for message in _messages(submitted, outputs):
                            yield message
                finally:  # client cancel / deadline lands here as CancelledError
                    submitted.abort_unless_finished()
        except _Refused as refused:
            await _abort(context, refused)
        except Exception as exc:  # a bug must end this call cleanly (INTERNAL), never hang or kill others
            await _abort(context, _internal(exc))

    async def GenerateBatch(
        self, request: pb.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateBatchResponse:
        arrival = time.monotonic()
        try:
            core = self._serving_core()
            self._check_batch_size(len(request.requests))
            with self._reserve([r.request_id for r in request.requests], batch=True) as rids:
                seqs = await asyncio.to_thread(
                    _prepare_batch, core.preparer, core.info.tokenizer_fingerprint, request.requests, rids, arrival
                )
                batch = [
                    Submitted(core, samples, r.return_text, self._waiting.discard)
                    for samples, r in zip(seqs, request.requests)
                ]
                try:
                    results = await asyncio.gather(*(s.all_outputs() for s in batch))
                finally:
                    for submitted in batch:
                        submitted.abort_unless_finished()
            for i, (outputs, r) in enumerate(zip(results, request.requests)):
                for output in outputs:
                    _raise_if_failed(output, core.death, r, f"requests[{i}].")
            return pb.GenerateBatchResponse(
                results=[
                    message
                    for s, outs in zip(batch, results)
                    for message in sorted(_messages(s, outs), key=lambda m: m.index)
                ]
            )
        except _Refused as refused:
            await _abort(context, refused)
        except Exception as exc:
            await _abort(context, _internal(exc))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            core = self._serving_core(allow_draining=True)
        except _Refused as refused:
            await _abort(context, refused)
        try:
            stats = await core.stats()  # a snapshot between two steps of the core
        except RuntimeError as exc:  # the core died meanwhile
            await _abort(context, _Refused(grpc.StatusCode.UNAVAILABLE, str(exc)))
        info = core.info
        return pb.GetModelInfoResponse(
            model=core.config.model,
            architecture=info.architecture,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            config=convert.engine_config_info(core.config, info),
            stats=convert.engine_stats(stats.engine, self.num_active_requests),
            eos_token_ids=list(info.eos_token_ids),
        )

    # ---- admission ----

    def _serving_core(self, allow_draining: bool = False) -> CoreClient:
        if self.core is None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.core.death is not None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, self.core.death)
        if self.draining and not allow_draining:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return self.core

    def _check_batch_size(self, size: int) -> None:
        """A batch bigger than the admission bounds could never be admitted: a bad request, not overload."""
        limit = min(self.max_pending_requests, self.max_waiting_requests)
        if size > limit:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"requests: at most {limit} requests per call, got {size}", "requests"
            )

    @contextlib.contextmanager
    def _reserve(self, request_ids: Seq[str], batch: bool = False):
        """Claim request ids (assigning missing ones) for the handler's lifetime; refuse overload."""
        fields = [f"requests[{i}].request_id" if batch else "request_id" for i in range(len(request_ids))]
        for rid, field in zip(request_ids, fields):
            if rid and not _REQUEST_ID.fullmatch(rid):
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field}: must be 1 to 256 printable ASCII characters without spaces",
                    field,
                )
        self._check_capacity(len(request_ids))
        rids = [rid or uuid.uuid4().hex for rid in request_ids]
        seen: set[str] = set()
        for rid, field in zip(rids, fields):
            if rid in self._active or rid in seen:
                raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"{field}: {rid!r} is already in flight", field)
            if self.core is not None and self.core.is_ending(rid):  # cancelled, its abort not done yet
                raise _Refused(
                    grpc.StatusCode.ALREADY_EXISTS, f"{field}: {rid!r} is still ending after its abort; retry", field
                )
            seen.add(rid)
        self._active.update(rids)
        self._waiting.update(rids)
        self._idle.clear()
        try:
            yield rids
        finally:
            self._active.difference_update(rids)
            self._waiting.difference_update(rids)
            if not self._active:
                self._idle.set()

    def _check_capacity(self, num_requests: int) -> None:
        if len(self._active) + num_requests > self.max_pending_requests:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._active)} requests in flight; the limit is {self.max_pending_requests}",
            )
        if len(self._waiting) + num_requests > self.max_waiting_requests:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._waiting)} requests waiting to start; the limit is {self.max_waiting_requests}",
            )


def _prepare_batch(
    preparer: RequestPreparer,
    served_fingerprint: str,
    requests: Seq[pb.GenerateRequest],
    rids: Seq[str],
    arrival: float,
) -> list[list[Sequence]]:
    if not requests:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "requests: must not be empty", "requests")
    return [
        _prepare(preparer, served_fingerprint, r, rid, arrival, f"requests[{i}].")
        for i, (r, rid) in enumerate(zip(requests, rids))
    ]


def _prepare(
    preparer: RequestPreparer,
    served_fingerprint: str,
    request: pb.GenerateRequest,
    rid: str,
    arrival: float,
    field_prefix: str = "",
) -> list[Sequence]:
    """One Sequence per sample (SamplingParams.n). Fingerprint check first (no work for a mismatched
    tokenizer), then validation and, for a text prompt, its one encode. Runs in a worker thread: a long
    prompt must not stall the event loop."""
    fingerprint = request.tokenizer_fingerprint
    if fingerprint and not _FINGERPRINT.fullmatch(fingerprint):
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field_prefix}tokenizer_fingerprint: must be 64 lowercase hex digits (GetInfo's fingerprint) or empty",
            f"{field_prefix}tokenizer_fingerprint",
        )
    if fingerprint and fingerprint != served_fingerprint:
        raise _Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{field_prefix}tokenizer_fingerprint: the ids were made by tokenizer "
            f"{fingerprint[:16]}..., this engine serves {served_fingerprint[:16]}...",
            f"{field_prefix}tokenizer_fingerprint",
            REASON_TOKENIZER_MISMATCH,
        )
    prompt = convert.prompt_kwargs(request)
    if not prompt:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"{field_prefix}prompt: set text or token_ids", f"{field_prefix}prompt"
        )
    try:
        return preparer.prepare_samples(
            params=convert.sampling_params(request.sampling), request_id=rid, arrival_time=arrival, **prompt
        )
    except InvalidRequestError as exc:
        field = field_prefix + convert.request_field_path(exc.field, request)
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field) from None


def _internal(exc: Exception) -> _Refused:
    log.exception("unexpected error serving a request", exc_info=exc)
    return _Refused(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


async def _abort(context: grpc.aio.ServicerContext, refused: _Refused) -> None:
    await context.abort(refused.code, bounded(refused.message), trailing_metadata=refused.trailing_metadata)
