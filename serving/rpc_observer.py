"""A grpc.aio server interceptor both services install: request ids, one access-log line and RPC metrics
per call, and a per-message hook for service metrics, all without touching the servicers.

The request id is the caller's `x-request-id` metadata (one is made up when absent), bound to
`request_id_var` for the RPC's task so every log line written while serving it carries it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tokenwire.serving.errors import REQUEST_ID_METADATA
from tokenwire.serving.logging_setup import request_id_var
from tokenwire.serving.metrics import RpcMetrics

log = logging.getLogger("tokenwire.rpc")

# (rpc method name, request, response message, seconds since the previous message of this call or None
# for the first). Called in the RPC's task for every successful response message.
ResponseHook = Callable[[str, Any, Any, "float | None"], None]
# Probes and tooling: counted in metrics, logged at DEBUG only (a healthcheck every few seconds is noise).
_QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


class RpcObserver(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics, on_response: ResponseHook | None = None):
        self.metrics = metrics
        self.on_response = on_response

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        service, _, rpc = details.method.lstrip("/").rpartition("/")
        request_id = _metadata(details.invocation_metadata, REQUEST_ID_METADATA) or uuid.uuid4().hex
        call = lambda: _Call(self, service, rpc, request_id)  # noqa: E731  (one per invocation)
        return _wrap(handler, call)


class _Call:
    """One RPC invocation: timing, status code, metrics and the access-log line."""

    def __init__(self, observer: RpcObserver, service: str, rpc: str, request_id: str):
        self.observer, self.service, self.rpc, self.request_id = observer, service, rpc, request_id
        self.short_service = service.rpartition(".")[2]
        self.start = self.last = time.monotonic()
        self.messages = 0
        request_id_var.set(request_id)  # runs inside the RPC's own task: scoped to this call
        observer.metrics.started(self.short_service, rpc)

    def response(self, request: Any, message: Any) -> None:
        now = time.monotonic()
        gap, self.last = (now - self.last if self.messages else None), now
        self.messages += 1
        if self.observer.on_response is not None:
            try:
                self.observer.on_response(self.rpc, request, message, gap)
            except Exception:  # a metrics bug must never fail the RPC
                log.exception("response hook failed for %s", self.rpc)

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        seconds = time.monotonic() - self.start
        code = _status_code(context, error)
        self.observer.metrics.finished(self.short_service, self.rpc, code, seconds)
        level = logging.DEBUG if self.service in _QUIET_SERVICES else logging.INFO
        log.log(
            level,
            "%s %s %.1f ms",
            self.rpc,
            code,
            seconds * 1e3,
            extra={"rpc": self.rpc, "code": code, "duration_ms": round(seconds * 1e3, 3), "messages": self.messages},
        )


def _wrap(handler: grpc.RpcMethodHandler, new_call: Callable[[], _Call]) -> grpc.RpcMethodHandler:
    """The same handler kind, with the behaviour wrapped; (de)serializers are kept as they are."""
    serde = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, new_call), **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, new_call), **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, new_call), **serde)
    return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, new_call), **serde)


def _streaming(behaviour, new_call: Callable[[], _Call]):
    # A streaming handler is an async generator (its messages are observed) or a coroutine that sends
    # with `context.write` (health's Watch): then only the call itself is.
    return _generator(behaviour, new_call) if inspect.isasyncgenfunction(behaviour) else _unary(behaviour, new_call)


def _unary(behaviour, new_call: Callable[[], _Call]):
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call, error = new_call(), None
        try:
            response = await behaviour(request, context)
            if response is not None:  # None: the handler set an error status itself
                call.response(request, response)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(context, error)

    return observed


def _generator(behaviour, new_call: Callable[[], _Call]):
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call, error = new_call(), None
        try:
            async for response in behaviour(request, context):
                call.response(request, response)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(context, error)

    return observed


def _status_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        # The client went away, or its deadline passed (which the server sees as a cancellation).
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()  # set by context.abort / set_code
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    return "UNKNOWN" if error is not None else "OK"


def _metadata(metadata, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            return item[1]
    return None
