"""Client: the blocking SDK. Same surface as AsyncClient, whose coroutines it runs on an event-loop thread,
so both behave identically (one deadline per call, the same retries and typed errors).

All Clients of a process share that one loop thread, which lives as long as the process: gRPC's aio
layer delivers late completions (of calls cancelled at close) to the loop that made them, and a loop
that outlives every channel never sees one after it has closed.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from tokenwire.client.async_client import DEFAULT_ENGINE, DEFAULT_TOKENIZER, AsyncClient, Message
from tokenwire.client.calls import RetryPolicy
from tokenwire.client.routing import PrefixRouting
from tokenwire.client.types import (
    ChatTemplateOptions,
    Completion,
    GenerationChunk,
    ModelInfo,
    SamplingOptions,
    TokenizerInfo,
)

T = TypeVar("T")
_END = object()


class Client:
    """`timeout` is the default deadline (seconds) of every call; each method also takes `timeout=`."""

    def __init__(
        self,
        tokenizer: str | None = DEFAULT_TOKENIZER,
        engine: str = DEFAULT_ENGINE,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        tls_root_cert: str | bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        auth_token: str | None = None,
        routing: str = "round_robin",
        prefix_routing: PrefixRouting = PrefixRouting(),
        text_from: str = "engine",
    ):
        """See AsyncClient: the same options, TLS, auth, routing and text source included."""
        self._loop = _shared_loop()
        self._closed = False
        self._client: AsyncClient = self._run(
            _make(
                tokenizer,
                engine,
                timeout=timeout,
                retry=retry,
                interceptors=interceptors,
                tls_root_cert=tls_root_cert,
                credentials=credentials,
                auth_token=auth_token,
                routing=routing,
                prefix_routing=prefix_routing,
                text_from=text_from,
            )
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def routed(self) -> dict[str, int]:
        """Under prefix routing, the Generate calls sent to each replica address so far; else empty."""
        return self._client.routed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run(self._client.close())

    # ---- generation ----

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> Iterator[GenerationChunk]:
        """Stream a generation; see AsyncClient.generate. Closing the iterator early cancels the request."""
        return self._iterate(
            self._client.generate(prompt, token_ids=token_ids, timeout=timeout, request_id=request_id, **sampling)
        )

    def chat(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> Iterator[GenerationChunk]:
        return self._iterate(self._client.chat(messages, timeout=timeout, request_id=request_id, **sampling))

    def complete(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Iterable[Message] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> Completion:
        return self._run(
            self._client.complete(
                prompt, token_ids=token_ids, messages=messages, timeout=timeout, request_id=request_id, **sampling
            )
        )

    def complete_batch(
        self,
        prompts: Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> list[Completion]:
        return self._run(
            self._client.complete_batch(
                prompts, token_ids=token_ids, timeout=timeout, request_id=request_id, **sampling
            )
        )

    # ---- tokenizer and engine services ----

    def encode(self, text: str, *, add_special_tokens: bool = True, timeout: float | None = None) -> list[int]:
        return self._run(self._client.encode(text, add_special_tokens=add_special_tokens, timeout=timeout))

    def encode_batch(self, texts: Sequence[str], *, timeout: float | None = None) -> list[list[int]]:
        return self._run(self._client.encode_batch(texts, timeout=timeout))

    def decode(
        self, token_ids: Sequence[int], *, skip_special_tokens: bool = True, timeout: float | None = None
    ) -> str:
        return self._run(self._client.decode(token_ids, skip_special_tokens=skip_special_tokens, timeout=timeout))

    def apply_chat_template(
        self,
        messages: Iterable[Message],
        *,
        template: ChatTemplateOptions = ChatTemplateOptions(),
        timeout: float | None = None,
    ) -> list[int]:
        return self._run(self._client.apply_chat_template(messages, template=template, timeout=timeout))

    def tokenizer_info(self, *, timeout: float | None = None) -> TokenizerInfo:
        return self._run(self._client.tokenizer_info(timeout=timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return self._run(self._client.model_info(timeout=timeout))

    def health(self, *, timeout: float | None = 3.0) -> dict[str, bool]:
        return self._run(self._client.health(timeout=timeout))

    def wait_ready(self, *, timeout: float | None = 60.0) -> None:
        return self._run(self._client.wait_ready(timeout=timeout))

    # ---- bridge to the event-loop thread ----

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: do not leave the call running
            future.cancel()
            raise

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """Pump the async stream into a queue on the loop thread; cancelling the pump (the consumer
        stopped early or was interrupted) closes the stream, which cancels its RPCs."""
        items: queue.SimpleQueue = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for item in stream:
                    items.put(item)
                items.put(_END)
            except BaseException as exc:  # handed to the consumer, CancelledError included
                items.put(exc)
                raise

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="tokenwire-client", daemon=True).start()
        return _loop


async def _make(tokenizer: str | None, engine: str, **options) -> AsyncClient:
    return AsyncClient(tokenizer, engine, **options)  # made on the loop thread: its channels belong there
