"""What the SDK hands out: typed, frozen dataclasses (never protobuf), and the sampling options."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments of generate()/chat()/complete(); anything left out takes the engine's default."""

    max_new_tokens: int  # default 16
    temperature: float  # 0 is greedy; default 1
    top_k: int  # 0 disables
    top_p: float  # in (0, 1]; 1 disables
    min_p: float  # in [0, 1]; 0 disables
    repetition_penalty: float  # 1 disables
    presence_penalty: float  # in [-2, 2]
    frequency_penalty: float  # in [-2, 2]
    seed: int  # same seed, same tokens (sample i of n: a seed derived from it)
    n: int  # parallel samples of the prompt, 1 to 16; its prefill is computed once
    stop_token_ids: list[int]  # extra ids that end generation
    stop: list[str]  # stop strings (the text is cut before them)
    ignore_eos: bool  # keep going past eos
    logprobs: int  # 0: the chosen token's logprob; n: plus the top-n alternatives
    # Each prompt token's logprob (0) plus the top-n there (n), vLLM's name; with it max_new_tokens may be 0
    prompt_logprobs: int
    min_tokens: int  # eos, stop ids and stop strings cannot end the output before this many tokens
    skip_special_tokens: bool  # leave special tokens out of the text; default True
    logit_bias: Mapping[int, float]  # token id -> added to its logit; <= 300 entries, values in [-100, 100]
    # Structured output, at most one (README "Structured output"):
    json_schema: Mapping | str  # the output is JSON valid against this schema (a dict or its JSON text)
    json_object: bool  # the output is a JSON object
    regex: str  # the whole output matches this regular expression
    choice: list[str]  # the output is exactly one of these strings
    grammar: str  # the output follows this Lark-style EBNF or GBNF grammar


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens, or the model's context is full


class StopKind(str, enum.Enum):
    EOS = "eos"  # one of the model's eos ids
    TOKEN_ID = "stop_token_id"  # an id of the `stop_token_ids` option
    STRING = "stop_string"  # a string of the `stop` option


@dataclass(frozen=True)
class StopDetail:
    """What ended a generation whose finish_reason is STOP."""

    kind: StopKind
    token_id: int | None = None  # EOS, TOKEN_ID: the id
    stop_string: str | None = None  # STRING: the stop string, as given

    @property
    def matched(self) -> int | str | None:
        """vLLM's `stop_reason`: the stop token id or stop string, None for eos."""
        return {StopKind.TOKEN_ID: self.token_id, StopKind.STRING: self.stop_string}.get(self.kind)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens served by the engine's prefix cache


@dataclass(frozen=True)
class Timings:
    """Server-side latencies in seconds, from the request's arrival at the engine."""

    queue_wait_s: float | None
    time_to_first_token_s: float | None
    total_s: float


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of a streamed generation. The last chunk has `finish_reason`, `usage` and `timings`."""

    text: str  # text delta (may be "" while a character is incomplete)
    token_ids: tuple[int, ...]  # newly generated ids
    logprobs: tuple[TokenLogprob, ...] = ()  # one per id, when logprobs were asked for
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    stop: StopDetail | None = None  # the last chunk of a STOP generation: which stop ended it
    index: int = 0  # which of the n samples (n > 1: chunks interleave; each
    # sample has its own last chunk)
    # The `prompt_logprobs` option: one per prompt token, None for the first (nothing precedes it); only
    # on sample 0's first chunk, () elsewhere (and for a one-token prompt).
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole generation."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings | None
    logprobs: tuple[TokenLogprob, ...] = ()
    stop: StopDetail | None = None  # when finish_reason is STOP: which stop ended it
    index: int = 0  # which of the n samples this is
    # n > 1: every sample, in index order; this completion's own fields are sample 0's, except `usage`,
    # which is the request's: the prompt once, the samples' completion tokens summed.
    samples: tuple[Completion, ...] = ()
    # The `prompt_logprobs` option: one per prompt token, None for the first; on sample 0 (and, with
    # n > 1, on this request-level result, which is sample 0's).
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    @property
    def choices(self) -> tuple[Completion, ...]:
        """The n samples in index order: `(self,)` when n = 1."""
        return self.samples or (self,)

    @classmethod
    def of_samples(cls, samples: Sequence[Completion]) -> Completion:
        """One request's completions (index order) as one: itself when n = 1."""
        if len(samples) == 1:
            return samples[0]
        first = samples[0]
        usage = Usage(
            first.usage.prompt_tokens, sum(s.usage.completion_tokens for s in samples), first.usage.cached_prompt_tokens
        )
        return dataclasses.replace(first, usage=usage, samples=tuple(samples))

    def json(self):
        """The text parsed as JSON (for json_schema / json_object requests); ValueError if it is not."""
        return json.loads(self.text)


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made, as a later turn quotes it back."""

    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)

    @classmethod
    def of(cls, call: ToolCall | Mapping[str, Any]) -> ToolCall:
        """Accepts OpenAI's {"id", "type": "function", "function": {"name", "arguments"}} (arguments as
        text or as an object)."""
        if isinstance(call, ToolCall):
            return call
        function = call.get("function", call)
        arguments = function.get("arguments", "{}")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls(id=call.get("id") or "", name=function["name"], arguments=text)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # the call a tool turn answers
    name: str = ""

    @classmethod
    def of(cls, message: ChatMessage | Mapping[str, Any]) -> ChatMessage:
        """Accepts OpenAI-style dicts ({"role": ..., "content": ..., "tool_calls": ...}) as well."""
        if isinstance(message, ChatMessage):
            return message
        return cls(
            role=message["role"],
            content=message.get("content") or "",
            tool_calls=tuple(ToolCall.of(c) for c in message.get("tool_calls") or ()),
            tool_call_id=message.get("tool_call_id") or "",
            name=message.get("name") or "",
        )


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How the tokenizer service renders a conversation (ApplyChatTemplate's options)."""

    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool objects, passed to the template as `tools`
    chat_template_kwargs: Mapping[str, Any] | None = None  # extra template variables, e.g. enable_thinking
    add_generation_prompt: bool = True  # open the assistant's turn after the last message
    continue_final_message: bool = False  # or leave the last (assistant) message open


@dataclass(frozen=True)
class TokenizerInfo:
    model: str
    vocab_size: int
    fingerprint: str  # the engine refuses ids from a tokenizer with another fingerprint
    bos_token_id: int | None
    eos_token_id: int | None
    has_chat_template: bool
    max_model_length: int  # 0 when unknown


@dataclass(frozen=True)
class EngineConfigInfo:
    device: str
    dtype: str
    block_size: int
    num_kv_blocks: int
    enable_prefix_cache: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    max_new_tokens_cap: int
    max_logprobs: int
    kv_cache_dtype: str
    quantization: str  # "none" (dense weights), or the blocks kept, e.g. "gguf (210 x Q4_1)"
    model_impl: str  # the forward serving the model: "native" or "transformers" (the fallback)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_prompt_encodes: int  # prompts the engine tokenized itself: 0 while everything sends ids
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_active_requests: int
    num_draft_tokens: int  # speculative drafts verified (0 with --speculative off)
    num_accepted_draft_tokens: int  # ...and accepted
    draft_acceptance_rate: float  # accepted / drafted; 0 before any draft


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    max_model_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: tuple[int, ...]
    config: EngineConfigInfo
    stats: EngineStats
