"""Protobuf <-> engine dataclasses. With servicer.py, the only engine module that touches `*_pb2`:
wire types are turned into plain Python here and never travel into the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.core.messages import CoreInfo
from tokenwire.engine.core.outputs import EngineStats, RequestOutput, RequestTimings, StopDetail, StopKind, TokenLogprob
from tokenwire.engine.request.sampling_params import Constraint, SamplingParams
from tokenwire.engine.scheduling.sequence import FinishReason
from tokenwire.v1 import engine_pb2 as pb

_REPEATED_PARAMS = ("stop_token_ids", "stop")
_FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
_FINISH_REASON_NAMES = {value: reason.value for reason, value in _FINISH_REASONS.items()}


def finish_reason_name(value: int) -> str:
    """A tokenwire.v1.FinishReason value as a metrics label: "stop", "length", or "other"."""
    return _FINISH_REASON_NAMES.get(value, "other")


_PROMPT_FIELDS = ("prompt", "prompt_token_ids")  # the engine's names for either form of the prompt
_STOP_KINDS = {
    StopKind.EOS: pb.STOP_KIND_EOS,
    StopKind.TOKEN_ID: pb.STOP_KIND_TOKEN_ID,
    StopKind.STRING: pb.STOP_KIND_STRING,
}


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Unset proto fields keep the dataclass defaults, so the engine stays the one source of defaults."""
    kwargs: dict = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name == "constraint":
            kwargs[f.name] = constraint(msg)
        elif f.name in _REPEATED_PARAMS:
            kwargs[f.name] = tuple(getattr(msg, f.name))
        elif f.name == "n":  # no presence: 0 (unset) and 1 both mean one sample
            kwargs[f.name] = msg.n or 1
        elif f.name == "logit_bias":  # a map: no presence, empty is none
            kwargs[f.name] = tuple(sorted(msg.logit_bias.items()))
        elif msg.HasField(f.name):
            kwargs[f.name] = getattr(msg, f.name)
    return SamplingParams(**kwargs)


def constraint(msg: pb.SamplingParams) -> Constraint | None:
    """The `constraint` oneof as a Constraint (None when unset, or json_object is false)."""
    kind = msg.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        return Constraint(kind, tuple(msg.choice.values))
    return Constraint(kind, "" if kind == "json_object" else getattr(msg, kind))


def prompt_kwargs(request: pb.GenerateRequest) -> dict:
    """`prompt=` or `prompt_token_ids=` for LLMEngine.prepare; neither when the oneof is unset."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return {"prompt": request.text}
    if which == "token_ids":
        return {"prompt_token_ids": list(request.token_ids.ids)}
    return {}


def request_field_path(engine_field: str, request: pb.GenerateRequest) -> str:
    """Where the engine's offending field (InvalidRequestError.field) sits in the request,
    e.g. 'sampling.temperature', or 'token_ids.ids' for a prompt given as ids."""
    if engine_field in _PROMPT_FIELDS:
        return "token_ids.ids" if request.WhichOneof("prompt") == "token_ids" else "text"
    if engine_field in pb.SamplingParams.DESCRIPTOR.fields_by_name:
        return f"sampling.{engine_field}"
    return engine_field


def generate_response(request_id: str, outputs: Seq[RequestOutput], index: int = 0) -> pb.GenerateResponse:
    """Merge consecutive deltas of one sample of a request (one or more engine steps) into one message."""
    msg = pb.GenerateResponse(request_id=request_id, index=index)
    texts = []
    for out in outputs:
        msg.token_ids.extend(out.new_token_ids)
        texts.append(out.text_delta)
        if out.new_logprobs:
            msg.logprobs.extend(token_logprob(lp) for lp in out.new_logprobs)
        if out.prompt_logprobs:
            msg.prompt_logprobs.extend(token_logprob(lp) for lp in out.prompt_logprobs)
    msg.text = "".join(texts)
    last = outputs[-1]
    if last.finished:
        msg.finish_reason = _FINISH_REASONS[last.finish_reason]
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=last.num_prompt_tokens,
                completion_tokens=last.num_output_tokens,
                cached_prompt_tokens=last.num_cached_prompt_tokens,
            )
        )
        if last.timings is not None:
            msg.timings.CopyFrom(timings(last.timings))
        if last.stop_detail is not None:
            msg.stop_detail.CopyFrom(stop_detail(last.stop_detail))
    return msg


def stop_detail(detail: StopDetail) -> pb.StopDetail:
    msg = pb.StopDetail(kind=_STOP_KINDS[detail.kind])
    if detail.token_id is not None:
        msg.token_id = detail.token_id
    if detail.text is not None:
        msg.stop_string = detail.text
    return msg


def token_logprob(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
    )


def timings(t: RequestTimings) -> pb.Timings:
    msg = pb.Timings(total_s=(t.finish_time or t.arrival_time) - t.arrival_time)
    if t.queue_wait is not None:
        msg.queue_wait_s = t.queue_wait
    if t.time_to_first_token is not None:
        msg.time_to_first_token_s = t.time_to_first_token
    return msg


def engine_config_info(config: EngineConfig, info: CoreInfo) -> pb.EngineConfigInfo:
    return pb.EngineConfigInfo(
        device=info.device,
        dtype=info.dtype,
        kv_cache_dtype=info.kv_cache_dtype,
        quantization=info.quantization,
        model_impl=info.model_impl,
        block_size=info.block_size,
        num_kv_blocks=info.num_blocks,
        enable_prefix_cache=config.cache.enable_prefix_cache,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        enable_chunked_prefill=config.scheduler.enable_chunked_prefill,
        max_new_tokens_cap=config.max_new_tokens_cap,
        max_logprobs=config.max_logprobs,
    )


def engine_stats(stats: EngineStats, num_active_requests: int) -> pb.EngineStats:
    return pb.EngineStats(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_kv_blocks=stats.num_kv_blocks,
        num_free_kv_blocks=stats.num_free_kv_blocks,
        num_prompt_encodes=stats.num_prompt_encodes,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        num_preemptions=stats.num_preemptions,
        num_active_requests=num_active_requests,
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_draft_tokens=stats.num_accepted_draft_tokens,
        draft_acceptance_rate=stats.draft_acceptance_rate,
    )
