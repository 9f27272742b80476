"""The gateway's view of the two services, all through the SDK's AsyncClient: the served model, prompt
encoding (once, by the tokenizer service), generation streams, and token strings for logprobs."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Sequence

from tokenwire.client import AsyncClient
from tokenwire.client.types import ChatTemplateOptions, GenerationChunk, ModelInfo
from tokenwire.gateway.config import GatewayConfig
from tokenwire.gateway.errors import ApiError
from tokenwire.gateway.protocol import ChatMessageIn, ChatTemplateFields

_TAG = re.compile(r"[^A-Za-z0-9._:-]+")
_TOKEN_NAMES_CACHED = 65536


class Backend:
    def __init__(self, config: GatewayConfig, client: AsyncClient):
        self.config = config
        self.client = client
        self._info: ModelInfo | None = None
        self._names: dict[int, str] = {}

    async def model_info(self) -> ModelInfo:
        if self._info is None:  # the served model never changes under a running engine: ask once
            self._info = await self.client.model_info(timeout=self.config.request_timeout_s)
        return self._info

    async def model_name(self) -> str:
        return self.config.served_model_name or (await self.model_info()).model

    async def check_model(self, model: str | None) -> str:
        """The served model's name; a request naming another one is a 404."""
        name = await self.model_name()
        if model is not None and model != name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this gateway serves `{name}`",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return name

    async def default_max_tokens(self, prompt_len: int) -> int:
        """Without max_tokens a reply may use the rest of the context (as OpenAI and vLLM do), up to the
        engine's cap; a prompt that fills the context is left for the engine to refuse."""
        info = await self.model_info()
        return max(1, min(info.config.max_new_tokens_cap, info.max_model_len - prompt_len))

    # ---- prompts: encoded once, here, by the tokenizer service ----

    async def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [await self.client.encode(texts[0], timeout=self.config.request_timeout_s)]
        return await self.client.encode_batch(texts, timeout=self.config.request_timeout_s)

    async def chat_ids(
        self, messages: Sequence[ChatMessageIn], template: ChatTemplateOptions = ChatTemplateOptions()
    ) -> list[int]:
        return await self.client.apply_chat_template(
            chat_messages(messages), template=template, timeout=self.config.request_timeout_s
        )

    async def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return await self.client.decode(
            ids, skip_special_tokens=skip_special_tokens, timeout=self.config.request_timeout_s
        )

    async def token_names(self, ids: set[int], as_ids: bool) -> dict[int, str]:
        """Each id's own text (for logprobs), or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        if as_ids:
            return {i: f"token_id:{i}" for i in ids}
        missing = sorted(i for i in ids if i not in self._names)
        texts = await asyncio.gather(*(self.decode([i], skip_special_tokens=False) for i in missing))
        if len(self._names) + len(missing) > _TOKEN_NAMES_CACHED:
            self._names.clear()
        self._names.update(zip(missing, texts))
        return {i: self._names[i] for i in ids}

    # ---- generation ----

    def generate(self, ids: Sequence[int], options: dict, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self.client.generate(
            token_ids=ids, request_id=request_id, timeout=self.config.request_timeout_s, **options
        )


def request_id(user: str | None) -> str:
    """A fresh id, tagged with the caller's `user` (printable, short) so logs can be grepped by user."""
    rid = uuid.uuid4().hex
    tag = _TAG.sub("_", user or "")[:64]
    return f"{tag}-{rid}" if tag else rid


def chat_messages(messages: Sequence[ChatMessageIn]) -> list[dict]:
    """OpenAI messages -> the SDK's: text parts joined with newlines (as vLLM does), `developer` is a
    system message, a missing content (an assistant turn that only called tools) is empty."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or ())
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            message["name"] = m.name
        out.append(message)
    return out


def template_options(req: ChatTemplateFields, tools: Sequence[dict] = ()) -> ChatTemplateOptions:
    """The request's template options; `tools` as the tool plan renders them."""
    return ChatTemplateOptions(
        tools=tuple(tools),
        chat_template_kwargs=req.chat_template_kwargs,
        add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        continue_final_message=req.continue_final_message,
    )
