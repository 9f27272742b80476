"""POST /v1/chat/completions: messages -> the tokenizer service's chat template -> jobs."""

from __future__ import annotations

from tokenwire.gateway import sdk_mapping
from tokenwire.gateway.backend import Backend, request_id
from tokenwire.gateway.errors import bad_request
from tokenwire.gateway.generation import jobs_for
from tokenwire.gateway.protocol import ChatCompletionRequest
from tokenwire.gateway.responses import Answer
from tokenwire.gateway.shapes import ChatShape


async def answer(backend: Backend, req: ChatCompletionRequest) -> Answer:
    model = await backend.check_model(req.model)
    if req.n > backend.config.max_n:
        raise bad_request("n", f"must be at most {backend.config.max_n}, got {req.n}")
    logprobs = sdk_mapping.chat_logprobs(req)
    ids = await backend.chat_ids(req.messages)
    default = await backend.default_max_tokens(len(ids))
    max_tokens = sdk_mapping.chat_max_tokens(req)

    def options(prompt: list[int]) -> dict:
        return sdk_mapping.sampling_options(req, max_tokens=max_tokens, logprobs=logprobs, default_max_tokens=default)

    jobs = jobs_for([ids], req.n, options)
    return Answer(backend, ChatShape(), jobs, request_id(req.user), model, req.return_tokens_as_token_ids)
