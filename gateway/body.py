"""A request body from bytes to a checked JSON object, before pydantic sees it: capped in size while it is
read (413), parsed with its position reported, and walked once for what no field's type can refuse: nesting
deeper than MAX_JSON_DEPTH, strings that are not Unicode text (lone surrogates such as "\\ud800", which
JSON allows and neither protobuf nor UTF-8 can carry) and the non-standard NaN / Infinity."""

from __future__ import annotations

import json

from fastapi import Request
from tokenwire.gateway.errors import ApiError, bad_request, from_json_error

# Deep enough for chat messages and any realistic JSON schema; deep nesting only costs (recursion in the
# parser, the schema compiler and the grammar).
MAX_JSON_DEPTH = 64


async def read(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (by its header, or while
    it streams in), so an oversized upload is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> dict:
    """The body as a JSON object whose every string is valid Unicode, no deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise from_json_error(error) from None
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 JSON", code="json_invalid") from None
    except RecursionError:  # nesting far past MAX_JSON_DEPTH
        raise _too_deep(None) from None
    except ValueError:  # an integer of more than 4,300 digits (Python's int-from-string cap)
        raise ApiError(400, "malformed JSON: a number of more than 4300 digits", code="json_invalid") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"the body must be a JSON object, got {type(body).__name__}")
    check(body)
    return body


def check(body: dict) -> None:
    """One iterative walk (no recursion, whatever the depth): the first bad string or too-deep value is
    refused, naming its path as the validation errors do (`messages[0].content`)."""
    stack: list[tuple[object, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if len(path) >= MAX_JSON_DEPTH:
            raise _too_deep(path)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            stack.append((item, (*path, key)))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise bad_request(
            _render(path) or None, f"is not valid Unicode text (a lone surrogate at character {error.start})"
        ) from None


def _render(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _no_constant(name: str) -> float:
    raise ApiError(400, f"malformed JSON: {name} is not a JSON number", code="json_invalid")


def _too_deep(path: tuple | None) -> ApiError:
    if not path:
        return bad_request(None, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return bad_request(_render(path[:1]), f"nests deeper than {MAX_JSON_DEPTH} levels")  # the full path is as deep


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes (the gateway's --max-body-bytes)", code="too_large")
