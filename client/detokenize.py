"""Generated ids back to text through the tokenizer service's DecodeStream (one TextStream per sample), for
a stream of engine messages or one merged result: the client needs no model files, and complete().text is
the concatenation of generate()'s deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from tokenwire.client import convert
from tokenwire.client.calls import CallScope, TextStream
from tokenwire.client.errors import Endpoint
from tokenwire.client.types import Completion, GenerationChunk
from tokenwire.v1 import engine_pb2, tokenizer_pb2_grpc


async def chunks(
    messages: AsyncGenerator[engine_pb2.GenerateResponse, None],
    request: engine_pb2.GenerateRequest,
    prompt_ids: Sequence[int],
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub | None,
    endpoint: Endpoint,
    scope: CallScope,
) -> AsyncIterator[GenerationChunk]:
    """The engine's messages as chunks with their text delta (the engine's own text when it sent one)."""
    texts: dict[int, TextStream] = {}  # one detokenizer per sample (index)
    try:
        async for message in messages:
            delta = message.text
            if not request.return_text:
                if message.index not in texts:
                    texts[message.index] = TextStream(
                        tokenizer, endpoint, prompt_ids, convert.skip_special_tokens(request), scope
                    )
                text = texts[message.index]
                delta = await text.push(message.token_ids)
                if message.finish_reason:
                    delta += await text.finish()
            yield convert.chunk(message, delta)
    finally:
        for text in texts.values():
            text.cancel()
        await messages.aclose()  # a failed text side ends the engine stream too: its request is cancelled


async def completion(
    result: engine_pb2.GenerateResponse,
    request: engine_pb2.GenerateRequest,
    prompt_ids: Sequence[int],
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub | None,
    endpoint: Endpoint,
    scope: CallScope,
) -> Completion:
    """One sample's merged result as a Completion, decoded by the same DecodeStream as chunks()."""
    if request.return_text:
        return convert.completion(result, result.text)
    text = TextStream(tokenizer, endpoint, prompt_ids, convert.skip_special_tokens(request), scope)
    try:
        body = await text.push(result.token_ids)
        return convert.completion(result, body + await text.finish())
    finally:
        text.cancel()


async def completions(
    results: Sequence[engine_pb2.GenerateResponse],
    request: engine_pb2.GenerateRequest,
    prompt_ids: Sequence[int],
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub | None,
    endpoint: Endpoint,
    scope: CallScope,
) -> Completion:
    """One request's merged results (one per sample, index order) as one Completion."""
    return Completion.of_samples(
        await asyncio.gather(*(completion(r, request, prompt_ids, tokenizer, endpoint, scope) for r in results))
    )
