"""Answering a generation request: SSE chunks (`data: {...}`, then `data: [DONE]`) or one JSON body.

A stream's first engine message is awaited before the HTTP status is sent, so a refusal (400, 429, 503)
is a proper HTTP error rather than an error event inside a 200 stream; a failure after that ends the
stream with one `data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from fastapi.responses import JSONResponse
from tokenwire.client.errors import TokenwireError
from tokenwire.gateway import sdk_mapping
from tokenwire.gateway.backend import Backend
from tokenwire.gateway.errors import from_sdk
from tokenwire.gateway.generation import Job, UsageTally, run
from tokenwire.gateway.sse import SseResponse


class Answer:
    """One request's answer; `shape` is a CompletionShape or ChatShape."""

    def __init__(
        self,
        backend: Backend,
        shape,
        jobs: Sequence[Job],
        request_id: str,
        model: str,
        token_ids_as_names: bool = False,
    ):
        self.backend, self.shape, self.jobs = backend, shape, jobs
        self.model, self.as_ids = model, token_ids_as_names
        self.id = ("chatcmpl-" if shape.chunk_object.startswith("chat") else "cmpl-") + request_id
        self.created = int(time.time())
        self.request_id = request_id
        self.usage = UsageTally()
        # Each prompt's logprobs (the SDK's, None first), from sample 0's first chunk: echo's logprobs
        # start with them, for every sample of the prompt.
        self.prompt_logprobs: dict[int, tuple] = {}

    async def whole(self) -> JSONResponse:
        texts = {job.index: [job.echo] for job in self.jobs}
        lps: dict[int, list] = {job.index: [] for job in self.jobs}
        finish: dict[int, str | None] = {}
        stops: dict[int, int | str | None] = {}
        try:
            async for job, chunk in run(self.backend, self.jobs, self.request_id):
                texts[job.index].append(chunk.text)
                lps[job.index].extend(chunk.logprobs)
                self._keep_prompt_logprobs(job, chunk)
                finish[job.index] = sdk_mapping.finish_reason(chunk)
                stops[job.index] = sdk_mapping.stop_reason(chunk)
                self.usage.add(job, chunk)
        except TokenwireError as error:
            raise from_sdk(error, self.shape.renamed_params) from None
        choices = []
        for job in self.jobs:
            block = await self._logprobs(job, lps[job.index], len(job.echo), first=True)
            choices.append(
                self.shape.choice(
                    job, "".join(texts[job.index]), block, finish.get(job.index), True, stops.get(job.index)
                )
            )
        return JSONResponse(
            {
                "id": self.id,
                "object": self.shape.whole_object,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": self.usage.body(),
            }
        )

    async def stream(self, include_usage: bool) -> SseResponse:
        chunks = run(self.backend, self.jobs, self.request_id)
        try:
            first = await anext(chunks)
        except TokenwireError as error:
            await chunks.aclose()
            raise from_sdk(error, self.shape.renamed_params) from None
        return SseResponse(self._events(first, chunks, include_usage), close=chunks.aclose)

    async def _events(self, first, chunks: AsyncIterator, include_usage: bool) -> AsyncIterator[dict]:
        offsets = {job.index: 0 for job in self.jobs}  # characters sent so far, per choice
        started: set[int] = set()
        for job in self.jobs:
            opening = self.shape.opening(job)
            if opening is not None:
                yield self._chunk([opening], include_usage)
        try:
            item = first
            while item is not None:
                job, chunk = item
                text = chunk.text
                first = job.index not in started
                if first:
                    started.add(job.index)
                    text = job.echo + text
                self._keep_prompt_logprobs(job, chunk)
                at = offsets[job.index] + len(text) - len(chunk.text)  # where this chunk's tokens start
                with_prompt = first and self.shape.echoes_prompt_logprobs
                block = await self._logprobs(job, chunk.logprobs, at, first) if chunk.logprobs or with_prompt else None
                offsets[job.index] += len(text)
                self.usage.add(job, chunk)
                finish = sdk_mapping.finish_reason(chunk)
                if text or block or finish:
                    choice = self.shape.choice(job, text, block, finish, False, sdk_mapping.stop_reason(chunk))
                    if choice is not None:  # None: a parser holds the text back for now
                        yield self._chunk([choice], include_usage)
                item = await anext(chunks, None)
        except TokenwireError as error:
            yield from_sdk(error, self.shape.renamed_params).body()
            return
        if include_usage:
            yield {
                "id": self.id,
                "object": self.shape.chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage.body(),
            }

    def _chunk(self, choices: list[dict], include_usage: bool) -> dict:
        body = {
            "id": self.id,
            "object": self.shape.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        return body

    def _keep_prompt_logprobs(self, job: Job, chunk) -> None:
        if chunk.prompt_logprobs:
            self.prompt_logprobs[job.prompt] = chunk.prompt_logprobs

    async def _logprobs(self, job: Job, lps, offset: int, first: bool = False) -> dict | None:
        """The choice's logprobs block for `lps`; the first one of an echo with logprobs starts with the
        prompt's tokens (offsets from 0, the first token's logprob null)."""
        if "logprobs" not in job.options:
            return None
        prompt = None
        if first and self.shape.echoes_prompt_logprobs:
            prompt = sdk_mapping.PromptLogprobs(job.ids, self.prompt_logprobs.get(job.prompt, ()))
        ids = sdk_mapping.logprob_ids(lps) | (prompt.token_ids() if prompt is not None else set())
        names = await self.backend.token_names(ids, self.as_ids)
        return self.shape.logprobs(lps, names, offset, prompt)
