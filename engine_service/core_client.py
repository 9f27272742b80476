"""The gRPC front's handle on the engine core process (tokenwire.engine.core_proc).

It has the EngineLoop's surface (`submit`, `abort`, `call`, `engine`), so the servicer does not care
where the loop runs; differences: sinks are called on the event loop (the outputs of one step arrive
as one message, read by an event-loop reader, with no thread hop per request), and `stats()` is
awaited. The front validates and encodes (`engine.prepare`, with its own tokenizer); the core only
ever sees token ids.

If the core dies, every request in flight gets a final output whose error is `death`, new requests
are refused, and `on_death` tells the server (which turns NOT_SERVING and exits non-zero).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
from collections.abc import Callable

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.core_proc import CoreInfo, CoreStats, run_core
from tokenwire.engine.outputs import RequestOutput
from tokenwire.engine.grammar import GrammarCompiler
from tokenwire.engine.preparer import RequestPreparer
from tokenwire.engine.sequence import FinishReason, Sequence
from tokenwire.serving.logging_setup import JsonFormatter
from tokenwire.serving.model_resolver import resolve_model

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
_STOP_TIMEOUT_S = 30.0


class EngineFront:
    """What the front knows of the engine: its config, the core's shapes, and request preparation.
    `_states` and `scheduler._by_id` are the core's request tables as of the last `CoreClient.call`."""

    def __init__(self, config: EngineConfig, info: CoreInfo, preparer: RequestPreparer, fingerprint: str):
        self.config, self.info, self.preparer = config, info, preparer
        self.tokenizer_fingerprint = fingerprint
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self._states: dict[str, None] = {}
        self.scheduler = _SchedulerCensus()

    def prepare(self, *args, **kwargs) -> Sequence:
        return self.preparer.prepare(*args, **kwargs)

    def prepare_samples(self, *args, **kwargs) -> list[Sequence]:
        return self.preparer.prepare_samples(*args, **kwargs)

    @property
    def num_prompt_encodes(self) -> int:
        return self.preparer.num_prompt_encodes


class _SchedulerCensus:
    def __init__(self):
        self._by_id: dict[str, None] = {}


class CoreClient:
    def __init__(self, config: EngineConfig, on_death: Callable[[str], None] = lambda reason: None):
        self.config = config
        self.engine: EngineFront | None = None
        self.death: str | None = None                 # why the core died, once it has
        self.latest: CoreStats | None = None          # the stats that came with the last step
        self._on_death = on_death
        self._sinks: dict[str, Sink] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._next_query = 0
        self._stopping = False
        self._process = None
        self._commands = self._outputs = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----

    async def start(self) -> CoreClient:
        """Spawn the core and wait until its model is loaded and warmed up, loading the front's tokenizer
        meanwhile. Spawned from the event-loop thread: PR_SET_PDEATHSIG follows the spawning thread."""
        self._loop = asyncio.get_running_loop()
        model_dir = await asyncio.to_thread(resolve_model, self.config.model)   # converted once, here
        core_config = dataclasses.replace(self.config, model=model_dir)
        ctx = multiprocessing.get_context("spawn")   # never fork a process that runs gRPC threads
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_core, name="tokenwire-engine-core", daemon=True,
            args=(commands_r, outputs_w, core_config, *_log_settings(), os.getpid()))
        self._process.start()
        commands_r.close()   # ours closed, so the core's death is EOF here and ours is EOF there
        outputs_w.close()
        tokenizer = asyncio.to_thread(_load_tokenizer, core_config)
        first = asyncio.to_thread(self._first_message)
        (tokenizer, fingerprint), info = await asyncio.gather(tokenizer, first)
        if fingerprint != info.tokenizer_fingerprint:
            raise RuntimeError(f"the front's tokenizer {fingerprint[:16]}... differs from the core's "
                               f"{info.tokenizer_fingerprint[:16]}...")
        # The front compiles constraints too: a bad one is refused here, before admission (the core
        # rebuilds the matcher from its own cache, since a matcher does not cross a pipe).
        grammars = GrammarCompiler(tokenizer, fingerprint, info.vocab_size, info.eos_token_ids,
                                   self.config.max_grammar_compile_s)
        preparer = RequestPreparer(tokenizer, info.vocab_size, info.max_model_len, self.config.max_new_tokens_cap,
                                   self.config.max_logprobs, self.config.seed, grammars)
        self.engine = EngineFront(self.config, info, preparer, fingerprint)
        self._loop.add_reader(self._outputs.fileno(), self._on_readable)
        log.info("engine core running as pid %d", self._process.pid)
        return self

    def _first_message(self) -> CoreInfo:
        try:
            message = self._outputs.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine core exited while loading (exit code {self._process.exitcode})") from None
        if message[0] != "ready":
            raise RuntimeError(f"the engine core failed to load: {message[1]}")
        return message[1]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Abort what is still in flight (each gets its terminal output) and end the core process."""
        if self._process is None:
            return
        self._stopping = True
        if self.death is None:
            try:
                self._commands.send(("stop",))
            except OSError:
                pass
        # The reader stays on: the aborts of the requests in flight come back before EOF.
        await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            log.warning("the engine core did not stop within %.0fs; killing it", timeout)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        self._close_reader()
        self._commands.close()

    # ---- the EngineLoop surface ----

    def submit(self, seq: Sequence, sink: Sink, want_text: bool = False) -> None:
        """Queue a prepared sequence; `sink` gets its outputs, on the event loop."""
        if self.death is not None:
            sink(self._death_output(seq.request_id))
            return
        self._sinks[seq.request_id] = sink
        self._send(("add", seq, want_text))

    def abort(self, request_id: str) -> None:
        """Ends the request at the core's next step boundary (freeing its KV blocks)."""
        if self.death is None:
            self._send(("abort", request_id))

    async def stats(self) -> CoreStats:
        """Fresh stats, ordered after every command sent before (a round trip between two steps)."""
        stats, _ = await self._query()
        return self._with_front_counts(stats)

    def latest_stats(self) -> CoreStats | None:
        """The stats of the last step, without asking the core (Prometheus scrapes)."""
        return None if self.latest is None else self._with_front_counts(self.latest)

    def call(self, fn: Callable[[], object], timeout: float | None = None) -> object:
        """From another thread (tests, admin): refresh `engine`'s view of the core's request tables, then
        return fn(). `_sinks` here are the front's own."""
        if self._loop is None or self.engine is None:
            raise RuntimeError("the engine core is not running")
        _, census = asyncio.run_coroutine_threadsafe(self._query(), self._loop).result(timeout)
        self.engine._states = dict.fromkeys(census["states"])
        self.engine.scheduler._by_id = dict.fromkeys(census["by_id"])
        return fn()

    # ---- plumbing ----

    def _send(self, command: tuple) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the core is gone; its EOF reaches the reader and fails everything in flight
            pass

    async def _query(self) -> tuple[CoreStats, dict]:
        if self.death is not None:
            raise RuntimeError(self.death)
        token, self._next_query = self._next_query, self._next_query + 1
        future = self._loop.create_future()
        self._queries[token] = future
        self._send(("query", token))
        return await future

    def _with_front_counts(self, stats: CoreStats) -> CoreStats:
        encodes = self.engine.num_prompt_encodes if self.engine is not None else 0
        return dataclasses.replace(stats, engine=dataclasses.replace(stats.engine, num_prompt_encodes=encodes))

    def _on_readable(self) -> None:
        """Event loop: every complete message waiting on the pipe, then back to the loop."""
        try:
            while self._outputs.poll():
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            self._close_reader()
            if not self._stopping:
                self._died()

    def _handle(self, message: tuple) -> None:
        if message[0] == "out":
            _, outputs, self.latest = message
            for output in outputs:
                self._emit(output)
        elif message[0] == "reply":
            _, token, stats, census = message
            self.latest = stats
            future = self._queries.pop(token, None)
            if future is not None and not future.done():
                future.set_result((stats, census))

    def _emit(self, output: RequestOutput) -> None:
        rid = output.request_id
        sink = self._sinks.pop(rid, None) if output.finished else self._sinks.get(rid)
        if sink is None:
            return
        try:
            sink(output)
        except Exception:  # a consumer's bug must not stop the reader
            log.exception("output sink for %s failed", rid)

    def _died(self) -> None:
        self._process.join(0.5)   # EOF came as it exited; its status follows at once
        self.death = f"the engine core died (exit code {self._process.exitcode})"
        log.error("%s; failing %d requests in flight", self.death, len(self._sinks))
        for rid in list(self._sinks):
            self._emit(self._death_output(rid))
        for future in self._queries.values():
            if not future.done():
                future.set_exception(RuntimeError(self.death))
        self._queries.clear()
        self._on_death(self.death)

    def _death_output(self, request_id: str) -> RequestOutput:
        return RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT, error=self.death)

    def _close_reader(self) -> None:
        if self._outputs is not None and not self._outputs.closed:
            self._loop.remove_reader(self._outputs.fileno())
            self._outputs.close()


def _log_settings() -> tuple[str, str]:
    """The front's log level and format (text or json), for the core to log the same way."""
    root = logging.getLogger()
    json_format = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.getEffectiveLevel()), "json" if json_format else "text"


def _load_tokenizer(config: EngineConfig):
    from transformers import AutoTokenizer

    from tokenwire.tokenizer.tokenizer import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    return tokenizer, tokenizer_fingerprint(tokenizer)
