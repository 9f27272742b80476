"""Typed exceptions: every gRPC failure reaches SDK users as one of these, never as a raw RpcError."""
from __future__ import annotations

import re

import grpc

# Trailing metadata the services attach to INVALID_ARGUMENT errors, naming the offending field.
FIELD_METADATA_KEY = "tokenwire-field"
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class TokenwireError(Exception):
    """Base class. `code` is the gRPC status code (None for errors raised by the SDK itself)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidRequestError(TokenwireError):
    """The service refused a request field (INVALID_ARGUMENT / ALREADY_EXISTS); `field` names it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, field: str | None = None):
        super().__init__(message, code)
        self.field = field


class TokenizerMismatchError(TokenwireError):
    """The engine serves a different tokenizer than the one that made the ids (FAILED_PRECONDITION)."""


class OverloadedError(TokenwireError):
    """The service has too much work in flight (RESOURCE_EXHAUSTED); retry later or elsewhere."""


class AuthenticationError(TokenwireError):
    """The service refused the caller's credentials (UNAUTHENTICATED / PERMISSION_DENIED): set
    `auth_token=` (or $TOKENWIRE_AUTH_TOKEN) to the services' token."""


class UnavailableError(TokenwireError):
    """The service is unreachable, loading its model or draining (UNAVAILABLE)."""


class RequestCancelledError(TokenwireError):
    """The call was cancelled (CANCELLED)."""


class DeadlineExceededError(TokenwireError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class ServerError(TokenwireError):
    """Any other failure inside a service (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[TokenwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: TokenizerMismatchError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}
# gRPC's own RESOURCE_EXHAUSTED for a message over the size limit: the request is too big, not the
# service too busy, so retrying it elsewhere cannot help.
_TOO_LARGE = "message larger than max"


def from_rpc_error(error: grpc.RpcError, service: str = "") -> TokenwireError:
    """The typed exception for a failed call; `service` ("engine", "tokenizer") prefixes the message."""
    code = error.code()
    details = error.details() or code.name
    message = f"{service}: {details}" if service else details
    cls = _BY_CODE.get(code, ServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
        return InvalidRequestError(message, code, "request")
    if cls is InvalidRequestError:
        return InvalidRequestError(message, code, _field(error, details))
    return cls(message, code)


def _field(error: grpc.RpcError, details: str) -> str | None:
    """The offending field: from the services' trailing metadata, else the message's `field: ` prefix."""
    for key, value in error.trailing_metadata() or ():
        if key == FIELD_METADATA_KEY:
            return value
    match = _FIELD_PREFIX.match(details)
    return match[1] if match else None
