"""The one field error of both services, and the names of the metadata that carry errors and ids on the wire.

Light on purpose (no grpc, no torch): the SDK imports the wire names from here too, so a service and its
clients can never disagree on them.
"""

from __future__ import annotations

# Trailing metadata of an INVALID_ARGUMENT error: the path of the offending request field.
FIELD_METADATA_KEY = "tokenwire-field"
# Trailing metadata of a FAILED_PRECONDITION error: which precondition failed (one of the REASON_* values),
# so a client can tell a tokenizer mismatch from a model without a chat template.
REASON_METADATA_KEY = "tokenwire-reason"
REASON_TOKENIZER_MISMATCH = "tokenizer-mismatch"
REASON_NO_CHAT_TEMPLATE = "no-chat-template"
# Request metadata: one id per SDK call, the same on every RPC of that call, so both services' logs share it.
REQUEST_ID_METADATA = "x-request-id"

NO_CHAT_TEMPLATE_MESSAGE = "this model has no chat template; send text or ids"
# What an error message or trailer may echo: a message quoting a 20,000-character regex must not outgrow
# gRPC's metadata limit (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit") or a log line.
MAX_ERROR_CHARS = 512


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class InvalidRequestError(ValueError):
    """A request a service refuses; `field` names the offending request field (e.g. `max_new_tokens`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
