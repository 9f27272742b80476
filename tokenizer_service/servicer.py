"""The TokenizerService gRPC handlers (grpc.aio): validate, convert, call the codec, convert back.

Errors map to status codes and never escape as crashes: InvalidRequestError -> INVALID_ARGUMENT
(the message names the field), a missing chat template -> FAILED_PRECONDITION, a request before the
tokenizer has loaded -> UNAVAILABLE, anything unexpected -> INTERNAL (and a logged traceback).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from tokenwire.serving.errors import (
    FIELD_METADATA_KEY,
    REASON_METADATA_KEY,
    REASON_NO_CHAT_TEMPLATE,
    InvalidRequestError,
    bounded,
)
from tokenwire.tokenizer import convert
from tokenwire.tokenizer.codec import NoChatTemplateError, TokenCodec
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.detokenizer import MAX_CONTEXT_IDS
from tokenwire.v1 import tokenizer_pb2 as pb
from tokenwire.v1 import tokenizer_pb2_grpc

log = logging.getLogger(__name__)
# The prompt ids a DecodeStream reads as context, from the end: the detokenizer keeps fewer still (past
# skipped special tokens), so a whole prompt costs no more than its tail.
PROMPT_CONTEXT_IDS = 64 * MAX_CONTEXT_IDS
T = TypeVar("T")
Context = grpc.aio.ServicerContext


class NotReadyError(RuntimeError):
    """The tokenizer is still loading."""


def _field_metadata(error: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the offending field of an INVALID_ARGUMENT (as the engine sends it), or the
    failed precondition, so that clients can tell these errors apart without parsing messages."""
    if isinstance(error, InvalidRequestError):
        return ((FIELD_METADATA_KEY, bounded(error.field)),)
    if isinstance(error, NoChatTemplateError):
        return ((REASON_METADATA_KEY, REASON_NO_CHAT_TEMPLATE),)
    return ()


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, NoChatTemplateError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, NotReadyError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    log.exception("unexpected error in a tokenizer RPC", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


def _unary(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a unary handler, turning its exceptions into one status (abort stays outside the try)."""

    @functools.wraps(handler)
    async def wrapper(self: TokenizerServicer, request: Any, context: Context) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as error:  # every failure becomes a status, never a dead handler
            code, message = _status_of(error)
            metadata = _field_metadata(error)
        await context.abort(code, bounded(message), trailing_metadata=metadata)

    return wrapper


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Answers UNAVAILABLE until `attach` hands it a loaded codec."""

    def __init__(self, config: TokenizerServiceConfig):
        self.config = config
        self._codec: TokenCodec | None = None

    def attach(self, codec: TokenCodec) -> None:
        self._codec = codec

    @property
    def codec(self) -> TokenCodec:
        if self._codec is None:
            raise NotReadyError("the tokenizer is still loading; retry when health reports SERVING")
        return self._codec

    async def _run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        # Small work costs microseconds: a thread hop would cost more than it saves.
        if size <= self.config.inline_work_limit:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    @_unary
    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        options = convert.encode_options(request)
        [encoded] = await self._run(len(request.text), self.codec.encode_batch, [request.text], options)
        return pb.EncodeResponse(ids=encoded.ids, truncated=encoded.truncated)

    @_unary
    async def BatchEncode(self, request: pb.BatchEncodeRequest, context: Context) -> pb.BatchEncodeResponse:
        if len(request.texts) > self.config.max_batch_size:
            raise InvalidRequestError(
                "texts", f"at most {self.config.max_batch_size} texts per call, got {len(request.texts)}"
            )
        options = convert.encode_options(request)
        texts = list(request.texts)
        size = sum(map(len, texts))
        encoded = await self._run(size, self.codec.encode_batch, texts, options)
        return pb.BatchEncodeResponse(encodings=[convert.token_sequence(e) for e in encoded])

    @_unary
    async def Decode(self, request: pb.DecodeRequest, context: Context) -> pb.DecodeResponse:
        ids = list(request.ids)
        text = await self._run(len(ids), self.codec.decode, ids, request.skip_special_tokens)
        return pb.DecodeResponse(text=text)

    async def DecodeStream(
        self, request_iterator: AsyncIterator[pb.DecodeStreamRequest], context: Context
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        try:
            async for response in self._decode_stream(request_iterator):
                yield response
            return
        except Exception as error:
            code, message = _status_of(error)
            metadata = _field_metadata(error)
        await context.abort(code, bounded(message), trailing_metadata=metadata)

    async def _decode_stream(self, requests: AsyncIterator[pb.DecodeStreamRequest]):
        """One delta per request message, then a final flush once the client half-closes. The detokenizer
        keeps a bounded window, and a push is bounded too: a push past the inline limit decodes in a
        thread, so the event loop (health, other streams) never waits on it."""
        codec, detokenizer = self.codec, None
        async for request in requests:
            if detokenizer is None:
                prompt_tail = list(request.prompt_ids[-PROMPT_CONTEXT_IDS:])
                detokenizer = codec.detokenizer(request.skip_special_tokens, prompt_tail)
            elif request.prompt_ids:
                raise InvalidRequestError("prompt_ids", "only allowed in the first message of the stream")
            if len(request.ids) > self.config.max_stream_push_ids:
                raise InvalidRequestError(
                    "ids", f"at most {self.config.max_stream_push_ids} ids per message, got {len(request.ids)}"
                )
            ids = list(request.ids)
            codec.check_ids("ids", ids)
            yield pb.DecodeStreamResponse(text=await self._run(len(ids), detokenizer.push, ids))
        tail = detokenizer.finish() if detokenizer is not None else ""
        yield pb.DecodeStreamResponse(text=tail, final=True)

    @_unary
    async def ApplyChatTemplate(
        self, request: pb.ApplyChatTemplateRequest, context: Context
    ) -> pb.ApplyChatTemplateResponse:
        messages = convert.chat_messages(request.messages)
        options = convert.chat_template_options(request)
        size = sum(len(m["content"]) for m in messages) + sum(map(len, request.tools))
        ids, text = await self._run(size, self.codec.apply_chat_template, messages, options)
        return pb.ApplyChatTemplateResponse(ids=ids, text=text if request.return_text else "")

    @_unary
    async def GetInfo(self, request: pb.GetInfoRequest, context: Context) -> pb.GetInfoResponse:
        return convert.info_response(self.codec.info)
