"""The benchmark's `online` mode: requests through the real gRPC services with the SDK (AsyncClient),
streamed, at a seeded Poisson rate and/or under a concurrency bound. Both services are started here as
subprocesses by the shared launcher (exactly as a deployment runs them) unless their addresses are given.
`--endpoint openai` / `sse` send the same requests through the OpenAI-compatible gateway instead
(http_endpoints.py), started here the same way over those services unless `--gateway-url` is given;
several endpoints in one `--endpoint` list run one after the other on the same services.

The path is the user's: a text prompt is encoded by the tokenizer service, the engine gets the ids (so
tokenization is inside TTFT and the engine encodes nothing), and the text streams back through the
tokenizer service's DecodeStream. With --pretok the ids were made before the timed region and go
straight to the engine.

The `online_ids` mode isolates the engine service: ids in (made before the timed region), ids out, no
text and no SDK, raw grpc.aio stubs, one stream per request. Every online run also records the CPU
seconds each process spent in it (engine core, engine front, tokenizer service, this client), from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from dataclasses import asdict

import grpc
from tokenwire.bench.http_endpoints import HTTP_ENDPOINTS, SERVED_MODEL
from tokenwire.bench.metrics import RequestRecord, RunRecord
from tokenwire.bench.proc_cpu import CpuMeter, engine_core_pid, openmp_placement, per_1k_tokens
from tokenwire.bench.workloads import BenchRequest, arrival_offsets
from tokenwire.client import AsyncClient, TokenwireError
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.launcher import ENGINE, GATEWAY, TOKENIZER, start_service
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

_START_TIMEOUT_S = 600.0  # model load and warm-up on a busy 2-core machine
ENDPOINTS = ("grpc", *HTTP_ENDPOINTS)


def mode_name(endpoint: str) -> str:
    """The mode a run on this endpoint is reported as: `online` (the SDK), `online_openai`, `online_sse`."""
    return "online" if endpoint == "grpc" else f"online_{endpoint}"


class OnlineClient:
    """Addresses of the services; an AsyncClient is opened per run, inside that run's event loop.
    `engine_addr` may be a multi-replica target (`ipv4:a:p,b:p`), balanced by `routing`; no tokenizer
    (None) means the prompts go as ids. `gateway_url`: the OpenAI-compatible gateway, for the HTTP endpoints."""

    def __init__(
        self,
        engine_addr: str,
        tokenizer_addr: str | None,
        routing: str = "round_robin",
        gateway_url: str | None = None,
        pids: dict[str, int] | None = None,
    ):
        self.engine_addr, self.tokenizer_addr, self.routing = engine_addr, tokenizer_addr, routing
        self.gateway_url = gateway_url
        self.pids = {**(pids or {}), "bench client": os.getpid()}  # processes whose CPU time is reported

    def connect(self, text_from: str = "tokenizer") -> AsyncClient:
        return AsyncClient(
            tokenizer=self.tokenizer_addr, engine=self.engine_addr, routing=self.routing, text_from=text_from
        )

    def describe(self) -> dict:
        async def info():
            async with self.connect() as client:
                return await client.model_info()

        info = asyncio.run(info())
        return {
            "engine_addr": self.engine_addr,
            "tokenizer_addr": self.tokenizer_addr,
            "gateway_url": self.gateway_url,
            "architecture": info.architecture,
            **asdict(info.config),
            "openmp": {name: openmp_placement(pid) for name, pid in self.pids.items() if name != "bench client"},
        }


@contextlib.contextmanager
def services(args, model_dir: str, endpoints: tuple[str, ...] = ("grpc",)):
    """An OnlineClient for the given addresses, or for the services started here and stopped after (the
    gateway too when an endpoint is HTTP and no --gateway-url is given)."""
    with contextlib.ExitStack() as stack:
        pids: dict[str, int] = {}
        tok_addr = args.tokenizer_addr or _started(stack, TOKENIZER, ["--model", model_dir], pids, "tokenizer")
        eng_addr = args.engine_addr or _started(stack, ENGINE, _engine_flags(args, model_dir), pids, "engine front")
        core = engine_core_pid(pids["engine front"]) if "engine front" in pids else None
        if core is not None:  # the engine core process
            pids["engine core"] = core
        url = getattr(args, "gateway_url", None)
        if url is None and any(e in HTTP_ENDPOINTS for e in endpoints):
            url = _started_gateway(stack, tok_addr, eng_addr, pids)
        yield OnlineClient(eng_addr, tok_addr, gateway_url=url, pids=pids)


def _started(stack: contextlib.ExitStack, script: str, flags: list[str], pids: dict[str, int], name: str) -> str:
    service = stack.enter_context(start_service(script, flags))
    service.wait_serving()
    pids[name] = service.process.pid
    return service.address


def _started_gateway(stack: contextlib.ExitStack, tokenizer: str, engine: str, pids: dict[str, int]) -> str:
    gateway = stack.enter_context(
        start_service(
            GATEWAY,
            [
                "--tokenizer",
                tokenizer,
                "--engine",
                engine,
                "--served-model-name",
                SERVED_MODEL,
                "--log-level",
                "WARNING",
            ],
        )
    )
    gateway.wait_http_ok("/health", _START_TIMEOUT_S)
    pids["gateway"] = gateway.process.pid
    return f"http://{gateway.address}"


def _engine_flags(args, model_dir: str) -> list[str]:
    return [
        "--model",
        model_dir,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--no-enable-prefix-cache" if args.no_prefix_cache else "--enable-prefix-cache",
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--kv-cache-memory-gb",
        str(args.kv_cache_memory_gb),
        "--kv-cache-dtype",
        args.kv_cache_dtype,
        "--few-row-gemv" if args.few_row_gemv else "--no-few-row-gemv",
        "--quantization",
        args.quantization,
        "--quantized-dense-copy" if args.quantized_dense_copy else "--no-quantized-dense-copy",
        "--model-impl",
        args.model_impl,
        "--speculative",
        args.speculative,
        "--num-speculative-tokens",
        str(args.num_speculative_tokens),
        "--log-level",
        "WARNING",
    ]


def run(
    client: OnlineClient,
    requests: list[BenchRequest],
    params: list[SamplingParams],
    rate: float,
    concurrency: int | None,
    seed: int,
    progress=None,
    endpoint: str = "grpc",
    text_from: str = "tokenizer",
) -> RunRecord:
    """online (the SDK; text_from="tokenizer": DecodeStream per chunk), online_etext (the SDK taking the
    engine's text), or online_openai / online_sse (the gateway)."""
    return asyncio.run(_run(client, requests, params, rate, concurrency, seed, progress, endpoint, text_from))


async def _run(
    online: OnlineClient, requests, params, rate, concurrency, seed, progress, endpoint, text_from
) -> RunRecord:
    offsets = arrival_offsets(len(requests), rate, seed)
    limit = asyncio.Semaphore(concurrency or len(requests))
    meter = CpuMeter(online.pids)
    async with online.connect(text_from) as client:
        encodes = (await client.model_info()).stats.num_prompt_encodes
        if online.tokenizer_addr is not None:
            await client.tokenizer_info()  # the fingerprint is fetched once, outside the timed region
        http = HTTP_ENDPOINTS[endpoint](online.gateway_url) if endpoint != "grpc" else None
        stream_one = http.stream_one if http is not None else functools.partial(_stream_one, client)
        meter.start()
        start = time.perf_counter()

        async def one(req: BenchRequest, p: SamplingParams, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))  # the arrival schedule
            async with limit:
                rec = await stream_one(req, p)
            if progress is not None:
                progress.update(1)
            return rec

        try:
            records = await asyncio.gather(*(one(r, p, o) for r, p, o in zip(requests, params, offsets)))
        finally:
            if http is not None:
                await http.close()
        end = max([r.finish_time for r in records if r.finish_time is not None], default=time.perf_counter())
        cpu_s = meter.delta()
        encodes = (await client.model_info()).stats.num_prompt_encodes - encodes
    mode = mode_name(endpoint) if text_from == "tokenizer" else "online_etext"
    return RunRecord(
        mode,
        start,
        end,
        list(records),
        prompt_encodes=encodes,
        reports_cached_tokens=True,
        extra={**_extra(rate, concurrency, cpu_s, records), "endpoint": endpoint},
    )


def run_ids(
    client: OnlineClient,
    requests: list[BenchRequest],
    params: list[SamplingParams],
    rate: float,
    concurrency: int | None,
    seed: int,
    progress=None,
) -> RunRecord:
    """online_ids: the engine service alone, raw stubs, ids in and out (requests must carry ids)."""
    return asyncio.run(_run_ids(client, requests, params, rate, concurrency, seed, progress))


async def _run_ids(online: OnlineClient, requests, params, rate, concurrency, seed, progress) -> RunRecord:
    offsets = arrival_offsets(len(requests), rate, seed)
    limit = asyncio.Semaphore(concurrency or len(requests))
    meter = CpuMeter({k: v for k, v in online.pids.items() if k != "tokenizer"})
    async with grpc.aio.insecure_channel(online.engine_addr) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        await stub.GetModelInfo(engine_pb2.GetModelInfoRequest())  # connected before the timed region
        meter.start()
        start = time.perf_counter()

        async def one(req: BenchRequest, p: SamplingParams, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with limit:
                rec = await _stream_ids(stub, req, p)
            if progress is not None:
                progress.update(1)
            return rec

        records = await asyncio.gather(*(one(r, p, o) for r, p, o in zip(requests, params, offsets)))
        end = max([r.finish_time for r in records if r.finish_time is not None], default=time.perf_counter())
        cpu_s = meter.delta()
    return RunRecord(
        "online_ids",
        start,
        end,
        list(records),
        reports_cached_tokens=True,
        extra=_extra(rate, concurrency, cpu_s, records),
    )


def _extra(rate, concurrency, cpu_s: dict[str, float], records: list[RequestRecord]) -> dict:
    tokens = sum(r.completion_tokens for r in records)
    return {
        "request_rate": rate,
        "concurrency": concurrency,
        "cpu_s": cpu_s,
        "cpu_s_per_1k_tokens": per_1k_tokens(cpu_s, tokens),
    }


def ids_request(req: BenchRequest, p: SamplingParams) -> engine_pb2.GenerateRequest:
    """The engine's GenerateRequest for an id prompt (the raw-stub modes: online_ids, the soak)."""
    sampling = engine_pb2.SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        ignore_eos=p.ignore_eos,
        **({} if p.seed is None else {"seed": p.seed}),
    )
    return engine_pb2.GenerateRequest(token_ids=engine_pb2.TokenIds(ids=req.token_ids), sampling=sampling)


async def _stream_ids(stub, req: BenchRequest, p: SamplingParams) -> RequestRecord:
    rec = RequestRecord(submit_time=time.perf_counter())
    try:
        async for message in stub.Generate(ids_request(req, p)):
            rec.add_chunk(time.perf_counter(), list(message.token_ids))
            if message.HasField("usage"):
                rec.prompt_tokens = message.usage.prompt_tokens
                rec.cached_prompt_tokens = message.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as error:
        rec.error = f"{error.code().name}: {error.details()}"
    rec.finish_time = time.perf_counter()
    return rec


async def _stream_one(client: AsyncClient, req: BenchRequest, p: SamplingParams) -> RequestRecord:
    rec = RequestRecord(submit_time=time.perf_counter())
    prompt = {"token_ids": req.token_ids} if req.token_ids is not None else {"prompt": req.text}
    try:
        async for chunk in client.generate(**prompt, **sampling_options(p)):
            rec.add_chunk(time.perf_counter(), list(chunk.token_ids))
            if chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.cached_prompt_tokens = chunk.usage.cached_prompt_tokens
    except TokenwireError as error:
        rec.error = f"{type(error).__name__}: {error}"
    rec.finish_time = time.perf_counter()
    return rec


def sampling_options(p: SamplingParams) -> dict:
    """The engine's parameters as the SDK's keyword arguments (SamplingOptions)."""
    options = dict(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        ignore_eos=p.ignore_eos,
    )
    return options if p.seed is None else {**options, "seed": p.seed}
