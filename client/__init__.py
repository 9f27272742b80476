"""tokenwire's Python SDK: `Client` (blocking) and `AsyncClient` (asyncio), with the same surface.

from tokenwire.client import Client
with Client(tokenizer="localhost:50051", engine="localhost:50052") as client:
    for chunk in client.generate("The capital of France is", max_new_tokens=16, temperature=0):
        print(chunk.text, end="", flush=True)
"""

from tokenwire.client.async_client import AsyncClient
from tokenwire.client.calls import RetryPolicy
from tokenwire.client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    NoChatTemplateError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
    TokenizerMismatchError,
    TokenwireError,
    UnavailableError,
)
from tokenwire.client.routing import PrefixRouting
from tokenwire.client.sync_client import Client
from tokenwire.client.types import (
    ChatMessage,
    ChatTemplateOptions,
    Completion,
    EngineConfigInfo,
    EngineStats,
    FinishReason,
    GenerationChunk,
    ModelInfo,
    SamplingOptions,
    StopDetail,
    StopKind,
    Timings,
    TokenizerInfo,
    TokenLogprob,
    ToolCall,
    Usage,
)

__all__ = [
    "AsyncClient",
    "Client",
    "RetryPolicy",
    "PrefixRouting",
    "TokenwireError",
    "InvalidRequestError",
    "TokenizerMismatchError",
    "NoChatTemplateError",
    "OverloadedError",
    "UnavailableError",
    "RequestCancelledError",
    "DeadlineExceededError",
    "ServerError",
    "AuthenticationError",
    "ChatMessage",
    "ChatTemplateOptions",
    "Completion",
    "EngineConfigInfo",
    "EngineStats",
    "FinishReason",
    "GenerationChunk",
    "ModelInfo",
    "SamplingOptions",
    "StopDetail",
    "StopKind",
    "Timings",
    "TokenizerInfo",
    "TokenLogprob",
    "ToolCall",
    "Usage",
]
