"""A client-side record of the RPCs the SDK makes, through real gRPC interceptors."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Call:
    method: str  # e.g. "Generate"
    request: object  # the request message; None for client-streaming calls
    metadata: dict  # the call's metadata (x-request-id, ...)


class CallLog:
    """Records every RPC the SDK makes. grpc.aio files each interceptor under one call kind only,
    hence one recorder per kind."""

    def __init__(self):
        self.calls: list[Call] = []
        self.interceptors = [_UnaryUnary(self.calls), _UnaryStream(self.calls), _StreamStream(self.calls)]

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]


class _Recorder:
    def __init__(self, calls: list):
        self.calls = calls

    async def _record(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.calls.append(
            Call(
                method.rsplit("/", 1)[-1],
                request if hasattr(request, "ByteSize") else None,
                dict(details.metadata or ()),
            )
        )
        return await continuation(details, request)


class _UnaryUnary(_Recorder, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Recorder._record


class _UnaryStream(_Recorder, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Recorder._record


class _StreamStream(_Recorder, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _Recorder._record
