"""The HTTP routes. Bodies are parsed here (so malformed JSON can be reported with its position) and
checked by body.py (size, depth, Unicode) and
validated with the pydantic models of protocol.py; the work is done by completions.py and chat.py."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from tokenwire.client.errors import TokenwireError
from tokenwire.gateway import body, chat, completions, refused
from tokenwire.gateway.backend import Backend, template_options
from tokenwire.gateway.errors import bad_request, from_sdk, from_validation
from tokenwire.gateway.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter()
log = logging.getLogger(__name__)


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


async def parse(request: Request, model: type[BaseModel]):
    raw = await body.read(request, backend_of(request).config.max_body_bytes)
    parsed = body.parse(raw)
    refused.check(request.url.path, parsed)
    try:
        req = model.model_validate(parsed)
    except ValidationError as error:
        raise from_validation(error) from None
    _warn_unknown(request.url.path, model, parsed)
    return req


def _warn_unknown(path: str, model: type[BaseModel], parsed: dict) -> None:
    """Unknown top-level parameters are ignored, as vLLM does, with one warning per request naming them."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias} | refused.names(path)
    unknown = sorted(set(parsed) - known)
    if unknown:
        log.warning("%s: ignored unknown parameters %s", path, ", ".join(unknown))


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    req = await parse(request, CompletionRequest)
    return await _generate(completions.answer, backend_of(request), req)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    req = await parse(request, ChatCompletionRequest)
    return await _generate(chat.answer, backend_of(request), req)


async def _generate(answer, backend: Backend, req) -> Response:
    try:
        reply = await answer(backend, req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await reply.stream(include_usage)
        return await reply.whole()
    except TokenwireError as error:
        raise from_sdk(error) from None


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    backend = backend_of(request)
    try:
        name, info = await backend.model_name(), await backend.model_info()
    except TokenwireError as error:
        raise from_sdk(error) from None
    card = {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "tokenwire",
        "root": info.model,
        "max_model_len": info.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [card]})


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    """vLLM's shape: {prompt | messages, add_special_tokens} -> {count, max_model_len, tokens}."""
    req = await parse(request, TokenizeRequest)
    backend = backend_of(request)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("prompt", "give exactly one of prompt or messages")
    try:
        await backend.check_model(req.model)
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
            ids = await backend.chat_ids(req.messages, template_options(req, tools))
        else:
            ids = await backend.client.encode(
                req.prompt, add_special_tokens=req.add_special_tokens, timeout=backend.config.request_timeout_s
            )
        info = await backend.model_info()
    except TokenwireError as error:
        raise from_sdk(error) from None
    return JSONResponse({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    req = await parse(request, DetokenizeRequest)
    backend = backend_of(request)
    try:
        await backend.check_model(req.model)
        text = await backend.decode(req.tokens)
    except TokenwireError as error:
        raise from_sdk(error) from None
    return JSONResponse({"prompt": text})


@router.get("/health")
async def health(request: Request) -> Response:
    """200 only when both services report SERVING; 503 naming each one's state otherwise."""
    states = await backend_of(request).client.health()
    ok = all(states.values())
    return JSONResponse(
        {name: "SERVING" if up else "NOT_SERVING" for name, up in states.items()}, status_code=200 if ok else 503
    )
