"""The online mode through the OpenAI-compatible gateway (`--endpoint openai` or `--endpoint sse`).

The same requests as the SDK path (`--endpoint grpc`), sent as streamed `POST /v1/completions` with
`stream_options.include_usage`: the prompt as ids (P1, --pretok) or text, the same sampling parameters
(vLLM's extension names for top_k, min_p, repetition_penalty, ignore_eos), one connection per request.
- `openai`: the official `openai` package's AsyncOpenAI client, as an application would use it.
- `sse`: raw server-sent events read with httpx, no client-side models: the gateway's own cost.

A stream carries text, not ids, so each chunk with text (or the finish) is one arrival, and the
completion token count is the engine's own, from the usage chunk (never re-tokenized text).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
from tokenwire.bench.metrics import RequestRecord
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.request.sampling_params import SamplingParams

SERVED_MODEL = "bench"  # the gateway started by the benchmark serves the model under this name
_TIMEOUT = httpx.Timeout(600.0, connect=30.0)
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # the bench sets concurrency


def extension_fields(p: SamplingParams) -> dict:
    """The engine parameters OpenAI's API has no name for, by vLLM's names."""
    return {"top_k": p.top_k, "min_p": p.min_p, "repetition_penalty": p.repetition_penalty, "ignore_eos": p.ignore_eos}


def completion_body(req: BenchRequest, p: SamplingParams, model: str = SERVED_MODEL) -> dict:
    body = {
        "model": model,
        "prompt": req.token_ids if req.token_ids is not None else req.text,
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extension_fields(p),
    }
    return body if p.seed is None else {**body, "seed": p.seed}


def _record_chunk(rec: RequestRecord, now: float, chunk: dict) -> None:
    """One parsed chunk (a dict): a choice with text or a finish is an arrival; usage gives the counts."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or choice.get("finish_reason"):
            rec.add_arrival(now)
    usage = chunk.get("usage")
    if usage:
        rec.prompt_tokens = usage["prompt_tokens"]
        rec.reported_completion_tokens = usage["completion_tokens"]
        rec.cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


class OpenAIEndpoint:
    """The official client; one AsyncOpenAI per run, opened inside the run's event loop."""

    name = "openai"

    def __init__(self, base_url: str):
        self.client = openai.AsyncOpenAI(
            base_url=f"{base_url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=_TIMEOUT,
            http_client=httpx.AsyncClient(limits=_LIMITS),
        )

    async def stream_one(self, req: BenchRequest, p: SamplingParams) -> RequestRecord:
        rec = RequestRecord(submit_time=time.perf_counter())
        body = completion_body(req, p)
        standard = {k: v for k, v in body.items() if k not in extension_fields(p)}
        try:
            stream = await self.client.completions.create(**standard, extra_body=extension_fields(p))
            async for chunk in stream:
                _record_chunk(rec, time.perf_counter(), chunk.model_dump(exclude_unset=True))
        except openai.OpenAIError as error:
            rec.error = f"{type(error).__name__}: {error}"
        rec.finish_time = time.perf_counter()
        return rec

    async def close(self) -> None:
        await self.client.close()


class SseEndpoint:
    """Raw SSE lines through httpx: `data: {...}` events until `data: [DONE]`."""

    name = "sse"

    def __init__(self, base_url: str):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=_TIMEOUT, limits=_LIMITS)

    async def stream_one(self, req: BenchRequest, p: SamplingParams) -> RequestRecord:
        rec = RequestRecord(submit_time=time.perf_counter())
        try:
            async with self.http.stream("POST", "/v1/completions", json=completion_body(req, p)) as response:
                if response.status_code != 200:
                    rec.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                else:
                    await self._read(response, rec)
        except httpx.HTTPError as error:
            rec.error = f"{type(error).__name__}: {error}"
        rec.finish_time = time.perf_counter()
        return rec

    @staticmethod
    async def _read(response: httpx.Response, rec: RequestRecord) -> None:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error = f"stream error: {chunk['error'].get('message')}"
                return
            _record_chunk(rec, time.perf_counter(), chunk)
        rec.error = "the stream ended without data: [DONE]"

    async def close(self) -> None:
        await self.http.aclose()


HTTP_ENDPOINTS = {"openai": OpenAIEndpoint, "sse": SseEndpoint}
