"""The gRPC front's side of the engine core boundary (core/process.py, core/messages.py).

`CoreClient` starts the core (a child process, or a thread with `in_process=True`), prepares requests
with its own tokenizer (validation and text encoding: the core only ever sees token ids), sends typed
commands, and hands each request's outputs to its sink on the event loop: the outputs of one step
arrive as one message, read by an event-loop reader, with no thread hop per request.

If the core dies, every request in flight gets a final output whose error is `death`, new requests
are refused, and `on_death` tells the server (which turns NOT_SERVING and exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.core.messages import (
    AbortRequest,
    AddRequest,
    Command,
    CoreInfo,
    CoreStats,
    LoadFailed,
    QueryStats,
    Ready,
    Reply,
    StatsReply,
    StepOutputs,
    Stop,
)
from tokenwire.engine.core.outputs import RequestOutput
from tokenwire.engine.core.process import run_core, run_core_in_thread
from tokenwire.engine.core.transport import InMemoryTransport
from tokenwire.engine.request.preparer import RequestPreparer
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence
from tokenwire.serving.logging_setup import JsonFormatter
from tokenwire.serving.model_resolver import resolve_model

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
_STOP_TIMEOUT_S = 30.0
# Commands waiting for the core to read them. Admission bounds the requests in flight far below this, so
# it fills only when the core has stopped reading; a full queue then refuses instead of blocking the loop.
_MAX_QUEUED_COMMANDS = 1 << 16


class CoreNotReading(RuntimeError):
    """The core has stopped reading commands: new work is refused rather than queued without bound."""


class CoreClient:
    def __init__(
        self, config: EngineConfig, on_death: Callable[[str], None] = lambda reason: None, in_process: bool = False
    ):
        self.config = config
        self.in_process = in_process
        self.info: CoreInfo | None = None  # the loaded model's shapes, once started
        self.preparer: RequestPreparer | None = None  # validation and encoding, in the caller's thread
        self.death: str | None = None  # why the core died, once it has
        self.latest: CoreStats | None = None  # the stats that came with the last step
        self._on_death = on_death
        self._sinks: dict[str, Sink] = {}
        # Aborted, their sinks detached, until the core's final output for them comes back: an ABORT
        # still in the pipe must not reach a later request that reuses the id.
        self._ending: set[str] = set()
        self._queries: dict[int, asyncio.Future] = {}
        self._next_query = 0
        self._stopping = False
        self._ready: asyncio.Future | None = None
        self._process = None  # the core's process, or its thread in process
        self._commands = self._replies = None
        self._inbox: InMemoryTransport | None = None
        self._outbox: queue.Queue | None = None  # commands for the writer thread (a core process)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_reply_at = time.monotonic()

    # ---- lifecycle ----

    async def start(self) -> CoreClient:
        """Start the core and wait until its model is loaded and warmed up. A core process's front loads its
        own tokenizer meanwhile; an in-process front shares the core's. Spawned from the event-loop
        thread: PR_SET_PDEATHSIG follows the spawning thread."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        # A GGUF name is converted once, here; the core keeps the name, since it reads the file's blocks.
        await asyncio.to_thread(resolve_model, self.config.model)
        core_config = self.config
        if self.in_process:  # one tokenizer, one grammar compiler: the core's own, shared
            self._start_thread(core_config)
            ready = await self._ready
            self.info, self.preparer = ready.info, ready.preparer
        else:
            self._start_process(core_config)
            (tokenizer, fingerprint), ready = await asyncio.gather(
                asyncio.to_thread(_load_tokenizer, core_config), self._ready
            )
            self.info = ready.info
            self.preparer = self._front_preparer(tokenizer, fingerprint)
        log.info("engine core running %s", "in this process" if self.in_process else f"as pid {self._process.pid}")
        return self

    def _front_preparer(self, tokenizer, fingerprint: str) -> RequestPreparer:
        """Validation and encoding in the front. The core compiles each constraint (a matcher does not
        pickle), so this preparer only checks that a constraint parses."""
        if fingerprint != self.info.tokenizer_fingerprint:
            raise RuntimeError(
                f"the front's tokenizer {fingerprint[:16]}... differs from the core's "
                f"{self.info.tokenizer_fingerprint[:16]}..."
            )
        return RequestPreparer(
            tokenizer,
            self.info.vocab_size,
            self.info.max_model_len,
            self.config.max_new_tokens_cap,
            self.config.max_logprobs,
            self.config.seed,
        )

    def _start_process(self, core_config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._replies, replies_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_core,
            name="tokenwire-engine-core",
            daemon=True,
            args=(commands_r, replies_w, core_config, *_log_settings(), os.getpid()),
        )
        self._process.start()
        commands_r.close()  # ours closed, so the core's death is EOF here and ours is EOF there
        replies_w.close()
        self._loop.add_reader(self._replies.fileno(), self._on_readable)
        # A pipe write blocks once the core stops reading (a stuck or SIGSTOPped core); on its own thread
        # it blocks nothing else, so health and every other handler keep answering.
        self._outbox = queue.Queue(_MAX_QUEUED_COMMANDS)
        threading.Thread(target=self._write_commands, name="tokenwire-core-writer", daemon=True).start()

    def _write_commands(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._commands.send(command)
            except OSError:  # the core is gone; its EOF reaches the reader and fails everything in flight
                return

    def _start_thread(self, core_config: EngineConfig) -> None:
        self._inbox = InMemoryTransport(functools.partial(self._loop.call_soon_threadsafe, self._handle))
        self._process = run_core_in_thread(core_config, self._inbox)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and not self.in_process else None

    @property
    def num_in_flight(self) -> int:
        """Requests the core still holds: running ones, and aborted ones it has not ended yet."""
        return len(self._sinks) + len(self._ending)

    def is_ending(self, request_id: str) -> bool:
        """Whether this id, or one of its samples (`id #i`), was aborted and the core has not ended it yet."""
        return any(rid == request_id or rid.startswith(f"{request_id} #") for rid in self._ending)

    async def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Abort what is still in flight (each gets its terminal output) and end the core."""
        if self._process is None:
            return
        self._stopping = True
        if self.death is None:
            self._send(Stop())
        # The reader stays on: the aborts of the requests in flight come back before EOF.
        await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive() and not self.in_process:
            log.warning("the engine core did not stop within %.0fs; killing it", timeout)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        await asyncio.sleep(0)  # an in-process core's last replies were scheduled on the loop
        self._close_reader()
        if self._outbox is not None:
            with contextlib.suppress(queue.Full):
                self._outbox.put_nowait(None)  # the writer ends (it is a daemon if the queue was full)
        if self._commands is not None:
            self._commands.close()

    # ---- requests ----

    def submit(self, seq: Sequence, sink: Sink, want_text: bool = False) -> None:
        """Queue a prepared sequence; `sink` gets its outputs, on the event loop."""
        if self.death is not None:
            sink(self._death_output(seq.request_id))
            return
        self._send(AddRequest(seq, want_text), refuse_when_full=True)
        self._sinks[seq.request_id] = sink  # on the loop, as replies are: none can come before this

    def abort(self, request_id: str) -> None:
        """Ends the request at the core's next step boundary (freeing its KV blocks). Its sink gets
        nothing more: the caller has left."""
        if self._sinks.pop(request_id, None) is not None and self.death is None:
            self._ending.add(request_id)
            self._send(AbortRequest(request_id))

    async def stats(self) -> CoreStats:
        """Fresh stats, ordered after every command sent before (a round trip between two steps)."""
        if self.death is not None:
            raise RuntimeError(self.death)
        token, self._next_query = self._next_query, self._next_query + 1
        future = self._loop.create_future()
        self._queries[token] = future
        self._send(QueryStats(token))
        return self._with_front_counts(await future)

    def latest_stats(self) -> CoreStats | None:
        """The stats of the last step, without asking the core (Prometheus scrapes)."""
        return None if self.latest is None else self._with_front_counts(self.latest)

    # ---- plumbing ----

    def stalled_for(self) -> float:
        """Seconds since the core last replied while work waits on it (0 when there is none): a core that
        stopped stepping (stuck, SIGSTOPped) shows here, before any request times out."""
        if not (self._sinks or self._queries):
            return 0.0
        return time.monotonic() - self._last_reply_at

    def _send(self, command: Command, refuse_when_full: bool = False) -> None:
        if not (self._sinks or self._queries):
            self._last_reply_at = time.monotonic()  # idle until now: the wait for a reply starts here
        if self._inbox is not None:
            self._inbox.put(command)
            return
        try:
            self._outbox.put_nowait(command)
        except queue.Full:
            message = f"the engine core has not read its last {_MAX_QUEUED_COMMANDS} commands"
            if refuse_when_full:
                raise CoreNotReading(message) from None
            log.warning("%s; dropped %s", message, type(command).__name__)  # stop() kills a core that hangs

    def _with_front_counts(self, stats: CoreStats) -> CoreStats:
        encodes = self.preparer.num_prompt_encodes if self.preparer is not None else 0
        return dataclasses.replace(stats, engine=dataclasses.replace(stats.engine, num_prompt_encodes=encodes))

    def _on_readable(self) -> None:
        """Event loop: every complete message waiting on the pipe, then back to the loop."""
        try:
            while self._replies.poll():
                self._handle(self._replies.recv())
        except (EOFError, OSError):
            self._close_reader()
            if not self._stopping:
                self._died()

    def _handle(self, reply: Reply) -> None:
        self._last_reply_at = time.monotonic()
        if isinstance(reply, StepOutputs):
            self.latest = reply.stats
            for output in reply.outputs:
                self._emit(output)
        elif isinstance(reply, StatsReply):
            self.latest = reply.stats
            future = self._queries.pop(reply.token, None)
            if future is not None and not future.done():
                future.set_result(reply.stats)
        elif isinstance(reply, Ready):
            self._settle_ready(reply)
        elif isinstance(reply, LoadFailed):
            self._settle_ready(RuntimeError(f"the engine core failed to load: {reply.message}"))

    def _settle_ready(self, outcome: Ready | Exception) -> None:
        # A stop while loading cancels the waiter first: a late Ready or exit must not raise InvalidStateError.
        if self._ready.done():
            return
        if isinstance(outcome, Exception):
            self._ready.set_exception(outcome)
        else:
            self._ready.set_result(outcome)

    def _emit(self, output: RequestOutput) -> None:
        rid = output.request_id
        if output.finished and rid in self._ending:
            self._ending.discard(rid)  # the end of an aborted request, whose caller has left
            return
        sink = self._sinks.pop(rid, None) if output.finished else self._sinks.get(rid)
        if sink is None:
            return
        try:
            sink(output)
        except Exception:  # a consumer's bug must not stop the reader
            log.exception("output sink for %s failed", rid)

    def _died(self) -> None:
        self._process.join(0.5)  # EOF came as it exited; its status follows at once
        self.death = f"the engine core died (exit code {self._process.exitcode})"
        if not self._ready.done():
            self._settle_ready(
                RuntimeError(f"the engine core exited while loading (exit code {self._process.exitcode})")
            )
            return
        log.error("%s; failing %d requests in flight", self.death, len(self._sinks))
        self._ending.clear()
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
        if self._replies is not None and not self._replies.closed:
            self._loop.remove_reader(self._replies.fileno())
            self._replies.close()


def _log_settings() -> tuple[str, str]:
    """The front's log level and format (text or json), for the core to log the same way."""
    root = logging.getLogger()
    json_format = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.getEffectiveLevel()), "json" if json_format else "text"


def _load_tokenizer(config: EngineConfig):
    from tokenwire.tokenizer.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(config.model, config.trust_remote_code, config.chat_template)
    return tokenizer, tokenizer_fingerprint(tokenizer)
