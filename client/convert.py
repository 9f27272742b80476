"""Protobuf <-> SDK dataclasses: the only client module besides the two clients that touches `*_pb2`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

from tokenwire.client.errors import InvalidRequestError
from tokenwire.client.types import (
    ChatMessage,
    ChatTemplateOptions,
    Completion,
    EngineConfigInfo,
    EngineStats,
    FinishReason,
    GenerationChunk,
    ModelInfo,
    StopDetail,
    StopKind,
    Timings,
    TokenizerInfo,
    TokenLogprob,
    Usage,
)
from tokenwire.v1 import common_pb2, engine_pb2, tokenizer_pb2

_FINISH = {engine_pb2.FINISH_REASON_STOP: FinishReason.STOP, engine_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH}
_STOP_KINDS = {
    engine_pb2.STOP_KIND_EOS: StopKind.EOS,
    engine_pb2.STOP_KIND_TOKEN_ID: StopKind.TOKEN_ID,
    engine_pb2.STOP_KIND_STRING: StopKind.STRING,
}
_ROLES = {
    "system": common_pb2.CHAT_ROLE_SYSTEM,
    "user": common_pb2.CHAT_ROLE_USER,
    "assistant": common_pb2.CHAT_ROLE_ASSISTANT,
    "tool": common_pb2.CHAT_ROLE_TOOL,
}
_SAMPLING_FIELDS = frozenset(engine_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
_CONSTRAINTS = tuple(f.name for f in engine_pb2.SamplingParams.DESCRIPTOR.oneofs_by_name["constraint"].fields)


def sampling_params(options: Mapping[str, object]) -> engine_pb2.SamplingParams:
    """Keyword options -> SamplingParams; only the options given are set (the engine fills the rest)."""
    unknown = sorted(set(options) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    given = {k: _wire_value(k, v) for k, v in options.items() if v is not None}
    constraints = [k for k in _CONSTRAINTS if k in given]
    if len(constraints) > 1:
        raise InvalidRequestError(
            f"sampling.{constraints[1]}",
            f"give at most one of {', '.join(_CONSTRAINTS)}; got {', '.join(constraints)}",
        )
    if not isinstance(given.get("json_schema", ""), str):  # a schema as a dict (or true / false)
        given["json_schema"] = json.dumps(given["json_schema"])
    if "choice" in given:
        given["choice"] = engine_pb2.Choice(values=list(given["choice"]))
    return engine_pb2.SamplingParams(**given)


def _wire_value(name: str, value):
    if name == "logit_bias":  # ids as ints (OpenAI-style string keys too), values as floats
        try:
            return {int(k): float(v) for k, v in dict(value).items()}
        except (TypeError, ValueError) as error:
            raise InvalidRequestError("logit_bias", f"logit_bias: {error}") from None
    return value


def ids_request(ids, sampling: Mapping[str, object], fingerprint: str, return_text: bool) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        token_ids=engine_pb2.TokenIds(ids=ids),
        tokenizer_fingerprint=fingerprint,
        sampling=sampling_params(sampling),
        return_text=return_text,
    )


def text_request(text: str, sampling: Mapping[str, object]) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(text=text, sampling=sampling_params(sampling), return_text=True)


def skip_special_tokens(request: engine_pb2.GenerateRequest) -> bool:
    """The request's skip_special_tokens, with the engine's default (True) when unset."""
    sampling = request.sampling
    return sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True


def chat_messages(messages: Iterable[ChatMessage | Mapping[str, str]]) -> list[common_pb2.ChatMessage]:
    out = []
    for i, message in enumerate(messages):
        message = ChatMessage.of(message)
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequestError(
                f"messages[{i}].role", f"messages[{i}].role: {message.role!r} is not one of {sorted(_ROLES)}"
            )
        calls = [common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in message.tool_calls]
        out.append(
            common_pb2.ChatMessage(
                role=role,
                content=message.content,
                tool_calls=calls,
                tool_call_id=message.tool_call_id,
                name=message.name,
            )
        )
    return out


def chat_template_request(
    messages: Iterable[ChatMessage | Mapping[str, str]], options: ChatTemplateOptions
) -> tokenizer_pb2.ApplyChatTemplateRequest:
    kwargs = options.chat_template_kwargs
    return tokenizer_pb2.ApplyChatTemplateRequest(
        messages=chat_messages(messages),
        add_generation_prompt=options.add_generation_prompt,
        continue_final_message=options.continue_final_message,
        tools=[json.dumps(tool, ensure_ascii=False) for tool in options.tools],
        chat_template_kwargs=json.dumps(dict(kwargs), ensure_ascii=False) if kwargs else "",
    )


def chunk(msg: engine_pb2.GenerateResponse, text: str) -> GenerationChunk:
    finished = msg.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED
    return GenerationChunk(
        text=text,
        token_ids=tuple(msg.token_ids),
        logprobs=logprobs(msg.logprobs),
        finish_reason=_FINISH[msg.finish_reason] if finished else None,
        usage=usage(msg.usage) if finished else None,
        timings=timings(msg.timings) if finished and msg.HasField("timings") else None,
        stop=stop_detail(msg) if finished else None,
        index=msg.index,
        prompt_logprobs=prompt_logprobs(msg),
    )


def completion(msg: engine_pb2.GenerateResponse, text: str) -> Completion:
    return Completion(
        text=text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH[msg.finish_reason],
        usage=usage(msg.usage),
        logprobs=logprobs(msg.logprobs),
        timings=timings(msg.timings) if msg.HasField("timings") else None,
        stop=stop_detail(msg),
        index=msg.index,
        prompt_logprobs=prompt_logprobs(msg),
    )


def stop_detail(msg: engine_pb2.GenerateResponse) -> StopDetail | None:
    if not msg.HasField("stop_detail") or msg.stop_detail.kind not in _STOP_KINDS:
        return None
    kind = _STOP_KINDS[msg.stop_detail.kind]
    return StopDetail(
        kind,
        token_id=msg.stop_detail.token_id if kind is not StopKind.STRING else None,
        stop_string=msg.stop_detail.stop_string if kind is StopKind.STRING else None,
    )


def logprobs(msgs: Iterable[engine_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top)) for m in msgs)


def prompt_logprobs(msg: engine_pb2.GenerateResponse) -> tuple[TokenLogprob | None, ...]:
    """The wire's entries (prompt tokens 1..) with vLLM's None in front for the first prompt token."""
    return (None, *logprobs(msg.prompt_logprobs)) if msg.prompt_logprobs else ()


def usage(msg: engine_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


def timings(msg: engine_pb2.Timings) -> Timings:
    return Timings(
        queue_wait_s=msg.queue_wait_s if msg.HasField("queue_wait_s") else None,
        time_to_first_token_s=(msg.time_to_first_token_s if msg.HasField("time_to_first_token_s") else None),
        total_s=msg.total_s,
    )


def model_info(msg: engine_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=msg.model,
        architecture=msg.architecture,
        max_model_len=msg.max_model_len,
        vocab_size=msg.vocab_size,
        tokenizer_fingerprint=msg.tokenizer_fingerprint,
        eos_token_ids=tuple(msg.eos_token_ids),
        config=_same_fields(EngineConfigInfo, msg.config),
        stats=_same_fields(EngineStats, msg.stats),
    )


def tokenizer_info(msg: tokenizer_pb2.GetInfoResponse) -> TokenizerInfo:
    return TokenizerInfo(
        model=msg.model,
        vocab_size=msg.vocab_size,
        fingerprint=msg.fingerprint,
        bos_token_id=msg.bos_token_id if msg.HasField("bos_token_id") else None,
        eos_token_id=msg.eos_token_id if msg.HasField("eos_token_id") else None,
        has_chat_template=msg.has_chat_template,
        max_model_length=msg.max_model_length,
    )


def _same_fields(cls, msg):
    """A dataclass whose fields mirror a message's fields one for one."""
    return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


def merged_results(messages: Iterable[engine_pb2.GenerateResponse]) -> list[engine_pb2.GenerateResponse]:
    """A generation's stream messages as one whole result per sample, in sample index order."""
    results: dict[int, engine_pb2.GenerateResponse] = {}
    texts: dict[int, list[str]] = {}
    for message in messages:
        merge_message(results.setdefault(message.index, engine_pb2.GenerateResponse(index=message.index)), message)
        texts.setdefault(message.index, []).append(message.text)
    for index, result in results.items():
        result.text = "".join(texts[index])
    return [results[i] for i in sorted(results)]


def merge_message(result: engine_pb2.GenerateResponse, message: engine_pb2.GenerateResponse) -> None:
    """Fold one stream message of a sample into that sample's whole result (text aside)."""
    result.token_ids.extend(message.token_ids)
    result.logprobs.extend(message.logprobs)
    result.prompt_logprobs.extend(message.prompt_logprobs)
    if message.finish_reason:
        result.finish_reason = message.finish_reason
        result.usage.CopyFrom(message.usage)
        if message.HasField("timings"):
            result.timings.CopyFrom(message.timings)
        if message.HasField("stop_detail"):
            result.stop_detail.CopyFrom(message.stop_detail)
