"""POST /v1/completions: prompts (a string, strings, ids, or lists of ids) -> jobs."""

from __future__ import annotations

from tokenwire.gateway import sdk_mapping
from tokenwire.gateway.backend import Backend, request_id
from tokenwire.gateway.errors import bad_request
from tokenwire.gateway.generation import jobs_for
from tokenwire.gateway.protocol import CompletionRequest
from tokenwire.gateway.responses import Answer
from tokenwire.gateway.shapes import CompletionShape


async def answer(backend: Backend, req: CompletionRequest) -> Answer:
    model = await backend.check_model(req.model)
    _check(req, backend.config.max_n)
    _check_count(req.prompt, backend.config.max_prompts_per_request)  # before encoding any of them
    texts, prompts = await _prompts(backend, req.prompt)
    echoes = None
    if req.echo:
        echoes = texts if texts is not None else [await backend.decode(ids, False) for ids in prompts]
    default = {len(ids): await backend.default_max_tokens(len(ids)) for ids in prompts}

    echo_logprobs = req.echo and req.logprobs is not None

    def options(ids: list[int]) -> dict:
        options = sdk_mapping.sampling_options(
            req, max_tokens=req.max_tokens, logprobs=req.logprobs, default_max_tokens=default[len(ids)]
        )
        if echo_logprobs or req.max_tokens == 0:  # the engine generates nothing only for a prompt it scores
            options["prompt_logprobs"] = req.logprobs or 0
        return options

    jobs = jobs_for(prompts, req.n, options, echoes)
    shape = CompletionShape(echoes_prompt_logprobs=echo_logprobs)
    return Answer(backend, shape, jobs, request_id(req.user), model, req.return_tokens_as_token_ids)


def _check(req: CompletionRequest, max_n: int) -> None:
    if req.n > max_n:
        raise bad_request("n", f"must be at most {max_n}, got {req.n}")
    if req.suffix:
        raise bad_request("suffix", "is not supported")
    if req.best_of is not None and req.best_of != req.n:  # = n is every sample: nothing to choose
        raise bad_request("best_of", f"is not supported unless it equals n ({req.n}), got {req.best_of}")


def _check_count(prompt, limit: int) -> None:
    count = 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else len(prompt)
    if count > limit:
        raise bad_request("prompt", f"lists {count} prompts; at most {limit} (--max-prompts-per-request)")


async def _prompts(backend: Backend, prompt) -> tuple[list[str] | None, list[list[int]]]:
    """(the prompt texts, or None for ids; the prompt ids): text is encoded here, once."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt", "must not be empty")
    if isinstance(prompt[0], int):
        return None, [list(prompt)]
    if isinstance(prompt[0], list):
        if any(not ids for ids in prompt):
            raise bad_request("prompt", "a prompt of ids must not be empty")
        return None, [list(ids) for ids in prompt]
    return list(prompt), await backend.encode(prompt)
