"""OpenAI parameters -> the SDK's sampling options, and SDK results -> OpenAI response pieces."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenwire.client.types import GenerationChunk, TokenLogprob, Usage
from tokenwire.gateway.errors import bad_request
from tokenwire.gateway.protocol import ChatCompletionRequest, SamplingFields

_SAME_NAME = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "min_tokens",
)


def sampling_options(
    req: SamplingFields, *, max_tokens: int | None, logprobs: int | None, default_max_tokens: int
) -> dict:
    """The SDK's keyword options of `req`; unset fields stay unset, so the engine's defaults apply.
    `n` is the engine's: its samples share the prompt's prefill, each seeded from `seed` (engine.proto)."""
    options: dict = {k: getattr(req, k) for k in _SAME_NAME if getattr(req, k) is not None}
    options["max_new_tokens"] = max_tokens if max_tokens is not None else default_max_tokens
    if req.top_k is not None:
        options["top_k"] = max(req.top_k, 0)  # vLLM's -1 and 0 both mean "off"
    if req.seed is not None:
        options["seed"] = req.seed
    if req.n > 1:
        options["n"] = req.n
    if req.stop:
        options["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        options["stop_token_ids"] = list(req.stop_token_ids)
    if logprobs is not None:
        options["logprobs"] = logprobs
    if req.logit_bias:
        options["logit_bias"] = logit_bias(req.logit_bias)
    return options | constraint(req)


def constraint(req: SamplingFields) -> dict:
    """response_format / guided_regex / guided_choice / guided_grammar -> the SDK's one constraint option."""
    given = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("response_format", "type json_schema needs json_schema.schema")
        given["response_format"] = {"json_schema": fmt.json_schema.json_schema}
    for param, option in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if getattr(req, param) is not None:
            given[param] = {option: getattr(req, param)}
    if len(given) > 1:
        raise bad_request(
            list(given)[1],
            f"give at most one of response_format, guided_regex, guided_choice, guided_grammar; got {', '.join(given)}",
        )
    return next(iter(given.values()), {})


def logit_bias(bias: Mapping[str, float]) -> dict[int, float]:
    """OpenAI's {"<token id>": bias} -> {id: bias}; the engine checks the count, the ids and the range."""
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not 0 <= token_id < 2**32:  # the proto's map<uint32, double>
            raise bad_request("logit_bias", f"keys must be token ids from 0 to 2^32-1, got {key!r}")
        out[token_id] = value
    return out


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs", "needs logprobs to be true")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


def sum_usage(prompt_usages: Sequence[Usage], completion_usages: Sequence[Usage]) -> dict:
    """Prompts counted once each (n samples share one prompt), completions all counted."""
    return usage(
        sum(u.prompt_tokens for u in prompt_usages),
        sum(u.completion_tokens for u in completion_usages),
        sum(u.cached_prompt_tokens for u in prompt_usages),
    )


def finish_reason(chunk: GenerationChunk) -> str | None:
    return chunk.finish_reason.value if chunk.finish_reason is not None else None


def stop_reason(chunk: GenerationChunk) -> int | str | None:
    """vLLM's `stop_reason`: the stop token id or stop string that ended the choice; None for eos or length."""
    return chunk.stop.matched if chunk.stop is not None else None


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's ids and the SDK's prompt_logprobs for them (None first; () when there were none)."""

    ids: Sequence[int]
    entries: Sequence[TokenLogprob | None]

    def token_ids(self) -> set[int]:
        return set(self.ids) | logprob_ids([e for e in self.entries if e is not None])


def completion_logprob_block(
    lps: Sequence[TokenLogprob], names: Mapping[int, str], offset: int, prompt: PromptLogprobs | None = None
) -> dict:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset. With `prompt`
    (echo), OpenAI's legacy shape: one entry per prompt token first, offsets from 0, the first token's
    logprob and top_logprobs null (nothing precedes it)."""
    block: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token_id: int, lp: TokenLogprob | None, at: int) -> int:
        name = names[token_id]
        block["tokens"].append(name)
        block["token_logprobs"].append(lp.logprob if lp is not None else None)
        block["top_logprobs"].append({names[t]: v for t, v in lp.top} if lp is not None else None)
        block["text_offset"].append(at)
        return at + len(name)

    if prompt is not None:
        at = 0
        for i, token_id in enumerate(prompt.ids):
            at = add(token_id, prompt.entries[i] if i < len(prompt.entries) else None, at)
    at = offset
    for lp in lps:
        at = add(lp.token_id, lp, at)
    return block


def chat_logprob_block(lps: Sequence[TokenLogprob], names: Mapping[int, str]) -> dict:
    """The chat API's `logprobs.content`: token, logprob, bytes, top_logprobs."""

    def entry(token_id: int, logprob: float) -> dict:
        name = names[token_id]
        return {"token": name, "logprob": logprob, "bytes": list(name.encode())}

    return {
        "content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    }


def logprob_ids(lps: Sequence[TokenLogprob]) -> set[int]:
    return {lp.token_id for lp in lps} | {t for lp in lps for t, _ in lp.top}
