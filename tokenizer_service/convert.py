"""Wire types <-> plain Python, in one place: the codec and the detokenizer never see a *_pb2 object."""

from __future__ import annotations

from tokenwire.serving.errors import InvalidRequestError
from tokenwire.tokenizer.codec import Encoded, EncodeOptions
from tokenwire.tokenizer.tokenizer import TokenizerInfo
from tokenwire.v1 import common_pb2, tokenizer_pb2

_SIDES = {
    tokenizer_pb2.TRUNCATION_SIDE_UNSPECIFIED: None,
    tokenizer_pb2.TRUNCATION_SIDE_RIGHT: "right",
    tokenizer_pb2.TRUNCATION_SIDE_LEFT: "left",
}
_ROLES = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    common_pb2.CHAT_ROLE_TOOL: "tool",
}


def encode_options(request: tokenizer_pb2.EncodeRequest | tokenizer_pb2.BatchEncodeRequest) -> EncodeOptions:
    """The encode options of an Encode or BatchEncode request (unset add_special_tokens means true)."""
    if request.truncation_side not in _SIDES:  # proto3 enums are open: any int can arrive
        raise InvalidRequestError("truncation_side", f"unknown value {request.truncation_side}")
    return EncodeOptions(
        add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
        max_length=request.max_length if request.HasField("max_length") else None,
        truncation_side=_SIDES[request.truncation_side],
    )


def chat_messages(messages) -> list[dict[str, str]]:
    """Proto ChatMessages as the dicts a chat template expects."""
    converted = []
    for i, message in enumerate(messages):
        if message.role not in _ROLES:
            name = "CHAT_ROLE_UNSPECIFIED" if message.role == 0 else f"unknown value {message.role}"
            raise InvalidRequestError(f"messages[{i}].role", f"must be set to a known role, got {name}")
        converted.append({"role": _ROLES[message.role], "content": message.content})
    return converted


def token_sequence(encoded: Encoded) -> tokenizer_pb2.TokenSequence:
    return tokenizer_pb2.TokenSequence(ids=encoded.ids, truncated=encoded.truncated)


def info_response(info: TokenizerInfo) -> tokenizer_pb2.GetInfoResponse:
    return tokenizer_pb2.GetInfoResponse(
        model=info.model,
        vocab_size=info.vocab_size,
        bos_token_id=info.bos_token_id,
        eos_token_id=info.eos_token_id,
        pad_token_id=info.pad_token_id,
        special_tokens=[tokenizer_pb2.SpecialToken(content=c, id=i) for c, i in info.special_tokens],
        max_model_length=info.max_model_length,
        fingerprint=info.fingerprint,
        has_chat_template=info.has_chat_template,
    )
