"""Call mechanics shared by the SDK's methods: one deadline and request id per SDK call, retries where
safe, typed errors, and the tokenizer service's DecodeStream as an incremental detokenizer.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenwire.client.errors import DeadlineExceededError, Endpoint, ServerError, from_rpc_error
from tokenwire.serving.errors import REQUEST_ID_METADATA
from tokenwire.v1 import tokenizer_pb2, tokenizer_pb2_grpc

T = TypeVar("T")
# Prompt ids sent to DecodeStream as context: the detokenizer only looks at the last few (a leading-space
# or merge decision); sending the tail keeps a long prompt from crossing the wire twice.
DECODE_CONTEXT_IDS = 32


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed UNAVAILABLE before any token arrived (nothing was generated, so a
    retry cannot duplicate output). Backoff is exponential with full jitter, and never outlives the
    call's deadline."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))


class CallScope:
    """One SDK call, however many RPCs (and retries) it takes: one deadline, and one request id sent as
    `x-request-id` metadata on each RPC, so the log lines of both services for this call share it."""

    def __init__(
        self, timeout_s: float | None, request_id: str | None = None, metadata: tuple[tuple[str, str], ...] = ()
    ):
        """`metadata`: sent on every RPC of the call too (e.g. the client's authorization header)."""
        self.request_id = request_id or uuid.uuid4().hex
        self.metadata = ((REQUEST_ID_METADATA, self.request_id), *metadata)
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); raises DeadlineExceededError once the deadline has passed."""
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("deadline exceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
        return left


async def with_retries(
    attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, scope: CallScope, service: Endpoint | str
) -> T:
    """Run `attempt` (one RPC), retrying on UNAVAILABLE; every failure leaves as a typed exception."""
    n = 0
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or n + 1 >= policy.max_attempts:
                raise from_rpc_error(error, service) from None
        await backoff(policy, n, scope)
        n += 1


async def stream_with_retries(
    start: Callable[[], grpc.aio.UnaryStreamCall], policy: RetryPolicy, scope: CallScope, service: Endpoint | str
) -> AsyncIterator:
    """Iterate a server stream, restarting it on UNAVAILABLE only while no message has arrived.
    Leaving the iteration early (break, cancel, error) cancels the RPC, so the server stops work."""
    for n in range(policy.max_attempts):
        call = start()
        received = False
        try:
            async for message in call:
                received = True
                yield message
            return
        except grpc.aio.AioRpcError as error:
            if received or error.code() != grpc.StatusCode.UNAVAILABLE or n + 1 >= policy.max_attempts:
                raise from_rpc_error(error, service) from None
        finally:
            call.cancel()
        await backoff(policy, n, scope)


async def backoff(policy: RetryPolicy, attempt: int, scope: CallScope) -> None:
    delay = policy.backoff_s(attempt)
    left = scope.remaining()
    await asyncio.sleep(delay if left is None else min(delay, left))


class TextStream:
    """Generated ids -> text deltas through the tokenizer service's DecodeStream (the client holds no
    tokenizer files). Opened lazily on the first push; one write and one read per push."""

    def __init__(
        self,
        stub: tokenizer_pb2_grpc.TokenizerServiceStub,
        endpoint: Endpoint,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool,
        scope: CallScope,
    ):
        self._stub = stub
        self._endpoint = endpoint
        self._first = tokenizer_pb2.DecodeStreamRequest(
            skip_special_tokens=skip_special_tokens, prompt_ids=list(prompt_ids[-DECODE_CONTEXT_IDS:])
        )
        self._scope = scope
        self._call: grpc.aio.StreamStreamCall | None = None

    async def push(self, ids: Sequence[int]) -> str:
        request = tokenizer_pb2.DecodeStreamRequest(ids=ids)
        if self._call is None:
            self._call = self._stub.DecodeStream(timeout=self._scope.remaining(), metadata=self._scope.metadata)
            self._first.ids.extend(ids)
            request = self._first
        return await self._exchange(self._call.write(request))

    async def finish(self) -> str:
        """Half-close: the service flushes text it held back (an incomplete character at the end), then
        ends the RPC with OK, which is awaited so the call ends cleanly rather than cancelled."""
        if self._call is None:
            await self.push([])
        text = await self._exchange(self._call.done_writing())
        await self._call.code()
        return text

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _exchange(self, sent: Awaitable[None]) -> str:
        try:
            await sent
            response = await self._call.read()
        except grpc.aio.AioRpcError as error:
            self._scope.remaining()  # a write racing the deadline fails as INTERNAL: report the deadline
            raise from_rpc_error(error, self._endpoint) from None
        except asyncio.InvalidStateError:  # a write to an RPC that already ended (the service went away)
            raise await self._ended_error() from None
        if response is grpc.aio.EOF:  # an OK status before the final message: a broken service
            raise ServerError("tokenizer: DecodeStream ended before its final message")
        return response.text

    async def _ended_error(self) -> Exception:
        """The typed error for how the ended RPC ended."""
        code = await self._call.code()
        if code == grpc.StatusCode.OK:
            return ServerError("tokenizer: DecodeStream ended before its final message")
        error = grpc.aio.AioRpcError(
            code, await self._call.initial_metadata(), await self._call.trailing_metadata(), await self._call.details()
        )
        return from_rpc_error(error, self._endpoint)


async def wait_serving(stub: health_pb2_grpc.HealthStub, scope: CallScope) -> None:
    """Watch the server's health until SERVING; a server not up yet is waited for, not an error."""
    while True:
        call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=scope.remaining(), wait_for_ready=True)
        try:
            async for response in call:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError("services not ready before the deadline", error.code()) from None
        finally:
            call.cancel()
        await asyncio.sleep(0.1)  # the server went away mid-watch (restart): look again


async def check_serving(stub: health_pb2_grpc.HealthStub, timeout_s: float | None) -> bool:
    """One health Check: True when the server reports SERVING; False when not, or unreachable."""
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
