"""The service's RPCs in flight, bounded apart from health (`--max-concurrent-rpcs`).

gRPC's own `maximum_concurrent_rpcs` counts every call alike, so with it alone the open, token-free
grpc.health Watch streams could take every slot and an authenticated call would get RESOURCE_EXHAUSTED.
This interceptor counts only the service's calls (not health, which has its own budget: serving/health.py)
and refuses one past the bound with RESOURCE_EXHAUSTED, as gRPC's limiter would. A call counts from the
moment its handler starts until it ends, streams included.
"""

from __future__ import annotations

import functools
import inspect

import grpc
from tokenwire.serving.security import OPEN_SERVICES


class RpcBudget(grpc.aio.ServerInterceptor):
    """Install inside auth, so calls refused for their credentials never take a slot."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._bounded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        bounded = self._bounded.get(details.method)
        if bounded is None:  # handlers are fixed per method: wrap each one once
            bounded = self._bounded[details.method] = self._wrap(handler)
        return bounded

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.in_flight >= self.max_in_flight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_in_flight} RPCs are in flight (open streams included); retry later",
            )
        self.in_flight += 1

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        serde = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._call(handler.unary_unary), **serde)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._either(handler.unary_stream), **serde)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._call(handler.stream_unary), **serde)
        return grpc.stream_stream_rpc_method_handler(self._either(handler.stream_stream), **serde)

    def _either(self, behaviour):
        """Streaming handlers are async generators or coroutines that write to the context."""
        return self._stream(behaviour) if inspect.isasyncgenfunction(behaviour) else self._call(behaviour)

    def _call(self, behaviour):
        @functools.wraps(behaviour)
        async def bounded(request, context):
            await self._enter(context)
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight -= 1

        return bounded

    def _stream(self, behaviour):
        @functools.wraps(behaviour)
        async def bounded(request, context):
            await self._enter(context)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                self.in_flight -= 1

        return bounded
