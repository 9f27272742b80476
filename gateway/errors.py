"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
mapped from the gRPC status the SDK reports. Nothing internal (no stack trace) reaches the body."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import grpc
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from tokenwire.client import errors as sdk
from tokenwire.serving.errors import bounded

log = logging.getLogger(__name__)

# The engine's SamplingParams field -> the OpenAI parameter a caller set it with.
_PARAM_NAMES = {
    "max_new_tokens": "max_tokens",
    "prompt_logprobs": "logprobs",  # completions' echo with logprobs
    "token_ids.ids": "prompt",
    "text": "prompt",
    "json_schema": "response_format",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class ApiError(Exception):
    """An error the gateway answers with: HTTP status, OpenAI error type, the offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        message, param = bounded(message), bounded(param) if param else param  # both may quote the input
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def from_sdk(error: sdk.TokenwireError, renamed: Mapping[str, str] = {}) -> ApiError:
    """A typed SDK error -> the HTTP answer; a bad field is named as the OpenAI parameter (`renamed`: a
    request's own names, e.g. a forced tool call's grammar is its `tools`)."""
    if error.code is None:  # raised by the SDK itself, before any RPC (e.g. an unknown chat role)
        return ApiError(400, error.message, param=getattr(error, "field", None))
    status, type_ = _BY_CODE.get(error.code, (500, "internal_error"))
    if status == 500:
        log.error("service error: %s", error.message)
        return ApiError(500, "the service failed this request", "internal_error")
    message = error.message
    param = None
    if isinstance(error, sdk.InvalidRequestError) and error.field:
        param = openai_param(error.field)
        param = renamed.get(param, param)
        # "engine: sampling.max_new_tokens: must be ..." -> "max_tokens: must be ..."
        _, _, rest = message.partition(f"{error.field}: ")
        message = f"{param}: {rest}" if rest else message
    return ApiError(status, message, type_, param, error.code.name.lower())


def openai_param(field: str) -> str:
    """'sampling.max_new_tokens' -> 'max_tokens'; 'messages[1].role' stays as it is."""
    name = field.removeprefix("sampling.")
    return _PARAM_NAMES.get(name, name)


def from_validation(error: ValidationError) -> ApiError:
    """The first failing field of a request body, as `a.b[0].c`."""
    first = error.errors(include_url=False)[0]
    param = _path(first["loc"])
    return bad_request(param or None, first["msg"])


def from_json_error(error: json.JSONDecodeError) -> ApiError:
    return ApiError(
        400,
        f"malformed JSON at line {error.lineno} column {error.colno} (char {error.pos}): {error.msg}",
        code="json_invalid",
    )


def _path(loc: tuple) -> str:
    # Union members show up in the path as type names ("str", "list[int]"): drop them.
    parts = [p for p in loc if isinstance(p, int) or not _is_type_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _is_type_tag(part: str) -> bool:
    return (
        "[" in part
        or part in {"str", "int", "float", "bool", "dict", "list", "none", "function-after"}
        or part.startswith(("list[", "dict[", "function-", "literal["))
    )
