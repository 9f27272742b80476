"""Typed exceptions: every gRPC failure reaches SDK users as one of these, never as a raw RpcError."""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
from tokenwire.serving.errors import (
    FIELD_METADATA_KEY,
    NO_CHAT_TEMPLATE_MESSAGE,
    REASON_METADATA_KEY,
    REASON_NO_CHAT_TEMPLATE,
    REASON_TOKENIZER_MISMATCH,
)

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class TokenwireError(Exception):
    """Base class. `code` is the gRPC status code (None for errors raised by the SDK itself)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidRequestError(TokenwireError):
    """The service refused a request field (INVALID_ARGUMENT / ALREADY_EXISTS); `field` names it.

    Field first, as in the services' `tokenwire.serving.errors.InvalidRequestError(field, message)`."""

    def __init__(self, field: str | None, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message, code)
        self.field = field


class TokenizerMismatchError(TokenwireError):
    """The engine serves a different tokenizer than the one that made the ids (FAILED_PRECONDITION)."""


class NoChatTemplateError(TokenwireError):
    """The model has no chat template, so chat() cannot work: send text or ids (FAILED_PRECONDITION)."""


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
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}
# FAILED_PRECONDITION says which precondition failed in trailing metadata.
_BY_REASON: dict[str, type[TokenwireError]] = {
    REASON_TOKENIZER_MISMATCH: TokenizerMismatchError,
    REASON_NO_CHAT_TEMPLATE: NoChatTemplateError,
}
# What gRPC says when nothing listens at the address (refused, unresolvable, unroutable).
_UNREACHABLE = ("failed to connect", "connection refused", "dns resolution failed", "name resolution", "no address")


@dataclass(frozen=True)
class Endpoint:
    """A service the SDK talks to, as error messages name it."""

    name: str  # "tokenizer" or "engine"
    address: str

    def __str__(self) -> str:
        return self.name

    def unreachable(self) -> str:
        return (
            f"cannot reach the {self.name} service at {self.address}: is it running? "
            f"(`tokenwire-{self.name}` starts it)"
        )


# gRPC's own RESOURCE_EXHAUSTED for a message over the size limit: the request is too big, not the
# service too busy, so retrying it elsewhere cannot help.
_TOO_LARGE = "message larger than max"


def from_rpc_error(error: grpc.RpcError, service: Endpoint | str = "") -> TokenwireError:
    """The typed exception for a failed call; `service` (an Endpoint, or "engine", "tokenizer") prefixes
    the message."""
    code = error.code()
    details = error.details() or code.name
    message = f"{service}: {details}" if service else details
    cls = _BY_CODE.get(code, ServerError)
    if code == grpc.StatusCode.UNAVAILABLE and isinstance(service, Endpoint) and _unreachable(details):
        return UnavailableError(service.unreachable(), code)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        cls = _BY_REASON.get(_trailer(error, REASON_METADATA_KEY) or "", ServerError)
        if cls is NoChatTemplateError:
            return cls(f"{service}: {NO_CHAT_TEMPLATE_MESSAGE}" if service else NO_CHAT_TEMPLATE_MESSAGE, code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
        return InvalidRequestError("request", message, code)
    if cls is InvalidRequestError:
        return InvalidRequestError(_field(error, details), message, code)
    return cls(message, code)


def _field(error: grpc.RpcError, details: str) -> str | None:
    """The offending field: from the services' trailing metadata, else the message's `field: ` prefix."""
    field = _trailer(error, FIELD_METADATA_KEY)
    if field is not None:
        return field
    match = _FIELD_PREFIX.match(details)
    return match[1] if match else None


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    for name, value in error.trailing_metadata() or ():
        if name == key:
            return value
    return None


def _unreachable(details: str) -> bool:
    lowered = details.lower()
    return any(sign in lowered for sign in _UNREACHABLE)
