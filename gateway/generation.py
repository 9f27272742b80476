"""One OpenAI request as engine work: a job per (prompt, sample), their streams merged in arrival order,
and usage that counts each prompt once however many samples share it.

`n` > 1 is a fan-out here, in the gateway: n engine requests with the same prompt ids (their prefill is
shared through the engine's token-id prefix cache once the first one's blocks are cached); choice
`index` = prompt * n + sample, as OpenAI numbers them.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from tokenwire.client.types import GenerationChunk, Usage
from tokenwire.gateway import convert
from tokenwire.gateway.backend import Backend

_DONE = object()


@dataclass
class Job:
    index: int                   # the choice's index in the response
    prompt: int                  # which prompt it samples (usage counts each prompt once)
    ids: list[int]               # the prompt's token ids, made once by the tokenizer service
    options: dict                # SDK sampling options
    echo: str = ""               # text to put before the generated text (completions' `echo`)


@dataclass
class UsageTally:
    prompts: dict[int, Usage] = field(default_factory=dict)
    completions: list[Usage] = field(default_factory=list)

    def add(self, job: Job, chunk: GenerationChunk) -> None:
        if chunk.usage is not None:
            self.prompts.setdefault(job.prompt, chunk.usage)
            self.completions.append(chunk.usage)

    def body(self) -> dict:
        return convert.sum_usage(list(self.prompts.values()), self.completions)


def jobs_for(prompts: Sequence[list[int]], n: int, options_for, echoes: Sequence[str] | None = None) -> list[Job]:
    """`options_for(prompt_ids, sample)` gives each job's sampling options."""
    return [Job(p * n + s, p, ids, options_for(ids, s), echoes[p] if echoes else "")
            for p, ids in enumerate(prompts) for s in range(n)]


async def run(backend: Backend, jobs: Sequence[Job], request_id: str
              ) -> AsyncIterator[tuple[Job, GenerationChunk]]:
    """Every job's chunks, as they arrive. Closing this early (a client gone) cancels every engine
    request still running; the first failure ends it and cancels the rest."""
    if len(jobs) == 1:  # the common case: no tasks, no queue
        async for chunk in backend.generate(jobs[0].ids, jobs[0].options, request_id):
            yield jobs[0], chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async for chunk in backend.generate(job.ids, job.options, f"{request_id}-{job.index}"):
                queue.put_nowait((job, chunk))
        except Exception as error:  # handed to the consumer, which raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
