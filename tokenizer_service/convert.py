"""Wire types <-> plain Python, in one place: the codec and the detokenizer never see a *_pb2 object."""

from __future__ import annotations

import json
from typing import Any

from tokenwire.serving.errors import InvalidRequestError
from tokenwire.tokenizer.codec import ChatTemplateOptions, Encoded, EncodeOptions
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


def chat_messages(messages) -> list[dict[str, Any]]:
    """Proto ChatMessages as the dicts a chat template expects (transformers' convention: a call's
    arguments as a parsed object, and only the keys a message has)."""
    converted = []
    for i, message in enumerate(messages):
        if message.role not in _ROLES:
            name = "CHAT_ROLE_UNSPECIFIED" if message.role == 0 else f"unknown value {message.role}"
            raise InvalidRequestError(f"messages[{i}].role", f"must be set to a known role, got {name}")
        out: dict[str, Any] = {"role": _ROLES[message.role], "content": message.content}
        if message.tool_calls:
            out["tool_calls"] = [
                _tool_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(message.tool_calls)
            ]
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
        converted.append(out)
    return converted


def _tool_call(call: common_pb2.ToolCall, field: str) -> dict[str, Any]:
    arguments = _json(call.arguments or "{}", f"{field}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def chat_template_options(request: tokenizer_pb2.ApplyChatTemplateRequest) -> ChatTemplateOptions:
    tools = tuple(_json(tool, f"tools[{i}]") for i, tool in enumerate(request.tools))
    if any(not isinstance(tool, dict) for tool in tools):
        raise InvalidRequestError("tools", "each tool must be a JSON object")
    kwargs = _json(request.chat_template_kwargs, "chat_template_kwargs") if request.chat_template_kwargs else {}
    if not isinstance(kwargs, dict):
        raise InvalidRequestError("chat_template_kwargs", "must be a JSON object")
    return ChatTemplateOptions(
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        tools=tools,
        kwargs=kwargs,
    )


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise InvalidRequestError(field, f"is not valid JSON: {error}") from None


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
