"""One OpenAI request as engine work: one engine request per prompt, with the request's `n` (the engine
samples n times off one prefill and tags each chunk with its sample `index`), their streams merged in
arrival order, and usage that counts each prompt once however many samples share it. A job is one
choice: `index` = prompt * n + sample, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from tokenwire.client.types import GenerationChunk, Usage
from tokenwire.gateway import sdk_mapping
from tokenwire.gateway.backend import Backend

_DONE = object()


@dataclass
class Job:
    index: int  # the choice's index in the response
    prompt: int  # which prompt it samples (usage counts each prompt once)
    ids: list[int]  # the prompt's token ids, made once by the tokenizer service
    options: dict  # SDK sampling options (the prompt's: `n` included, shared by its samples)
    echo: str = ""  # text to put before the generated text (completions' `echo`)


@dataclass
class UsageTally:
    prompts: dict[int, Usage] = field(default_factory=dict)
    completions: list[Usage] = field(default_factory=list)

    def add(self, job: Job, chunk: GenerationChunk) -> None:
        if chunk.usage is not None:
            self.prompts.setdefault(job.prompt, chunk.usage)
            self.completions.append(chunk.usage)

    def body(self) -> dict:
        return sdk_mapping.sum_usage(list(self.prompts.values()), self.completions)


def jobs_for(prompts: Sequence[list[int]], n: int, options_for, echoes: Sequence[str] | None = None) -> list[Job]:
    """`options_for(prompt_ids)` gives a prompt's sampling options (n included)."""
    jobs = []
    for p, ids in enumerate(prompts):
        options = options_for(ids)
        jobs += [Job(p * n + s, p, ids, options, echoes[p] if echoes else "") for s in range(n)]
    return jobs


def _by_prompt(jobs: Sequence[Job]) -> list[list[Job]]:
    """The jobs of each prompt, in sample order: one engine request each."""
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.prompt, []).append(job)
    return list(groups.values())


async def run(backend: Backend, jobs: Sequence[Job], request_id: str) -> AsyncIterator[tuple[Job, GenerationChunk]]:
    """Every job's chunks, as they arrive. Closing this early (a client gone) cancels every engine
    request still running; the first failure ends it and cancels the rest."""
    groups = _by_prompt(jobs)
    if len(groups) == 1:  # the common case (one prompt, any n): no tasks, no queue
        group = groups[0]
        async for chunk in backend.generate(group[0].ids, group[0].options, request_id):
            yield group[chunk.index], chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(group: list[Job]) -> None:
        try:
            async for chunk in backend.generate(group[0].ids, group[0].options, f"{request_id}-{group[0].prompt}"):
                queue.put_nowait((group[chunk.index], chunk))
        except Exception as error:  # handed to the consumer, which raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(group)) for group in groups]
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
