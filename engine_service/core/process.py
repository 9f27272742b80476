"""The engine core: LLMEngine.step in a loop, apart from the gRPC front (its own GIL).

The engine service starts it as a child process (`CoreClient.start`, tokenwire.engine.edge.core_client)
and owns it; in-process use (embedding, tests) runs the same `CoreLoop` on a thread. The loop talks to
its front only through a transport of typed messages (core/messages.py):
- `PipeTransport`: two one-way multiprocessing pipes (pickle) to a front in another process, read by a
  thread that moves commands into the loop's inbox, so the pipe never fills while a step runs;
- `InMemoryTransport`: commands straight into the inbox, replies to a callback, for a front in the
  same process.
The loop applies commands between steps (an abort frees its KV blocks before the next step). After every step or
command that produced outputs the loop sends one StepOutputs for every request, with a stats snapshot so
that gauges never stop the loop. The child dies with its front: PR_SET_PDEATHSIG on Linux, and EOF on the
command pipe everywhere.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.core.messages import (
    AbortRequest,
    AddRequest,
    Command,
    CoreInfo,
    CoreStats,
    Kind,
    LoadFailed,
    QueryStats,
    Ready,
    StatsReply,
    StepOutputs,
    Stop,
)
from tokenwire.engine.core.outputs import RequestOutput
from tokenwire.engine.core.transport import CoreTransport, InMemoryTransport, PipeTransport
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.errors import InvalidRequestError
from tokenwire.serving.logging_setup import configure_logging

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def run_core(
    commands: Connection, replies: Connection, config: EngineConfig, log_level: str, log_format: str, parent_pid: int
) -> None:
    """The child's entry point (multiprocessing, spawn); it logs as the front does (level, text or json)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the front drains, then stops us
    configure_logging(log_level, log_format)
    transport = PipeTransport(commands, replies)
    engine = load_or_report(config, transport)
    if engine is None:
        return
    freeze_startup_heap()
    transport.send(Ready(core_info(engine)))
    try:
        CoreLoop(engine, transport).run()
    except (BrokenPipeError, ConnectionResetError):  # the front is gone: nobody to serve
        pass


def run_core_in_thread(config: EngineConfig, transport: InMemoryTransport) -> threading.Thread:
    """The same core loop on a thread of this process (embedding, tests): Ready or LoadFailed first."""

    def run() -> None:
        engine = load_or_report(config, transport)
        if engine is not None:
            transport.send(Ready(core_info(engine), preparer=engine.preparer))
            CoreLoop(engine, transport).run()

    thread = threading.Thread(target=run, name="tokenwire-engine-core", daemon=True)
    thread.start()
    return thread


def load_or_report(config: EngineConfig, transport: CoreTransport):
    """The engine, loaded and warmed up; None, after sending LoadFailed, if it could not be loaded."""
    try:
        engine = load_engine(config)
    except BaseException as exc:  # the front reports it and fails its load
        log.exception("the engine core failed to load")
        transport.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return None
    return engine


def load_engine(config: EngineConfig):
    from tokenwire.engine.core.engine import LLMEngine  # torch: the core's import, not the front's

    engine = LLMEngine(config)
    # One tiny generation (prefill + decode) so the first real request does not pay one-time costs.
    engine.generate(prompt_token_ids=[[1] * 8], params=SamplingParams(max_new_tokens=2, temperature=0.0))
    return engine


def core_info(engine) -> CoreInfo:
    from tokenwire.engine.worker.device import dtype_name

    runner = engine.runner
    return CoreInfo(
        architecture=runner.architecture,
        model_impl=runner.model_impl,
        device=str(runner.device),
        dtype=dtype_name(runner.dtype),
        kv_cache_dtype=dtype_name(runner.kv_dtype),
        quantization=runner.quantization,
        num_blocks=runner.num_blocks,
        block_size=runner.block_size,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        tokenizer_fingerprint=engine.tokenizer_fingerprint,
        eos_token_ids=tuple(sorted(runner.eos_token_ids)),
    )


def freeze_startup_heap() -> int:
    """Moves every object alive after startup (torch, transformers, the model's modules: ~365,000 for the
    default model) out of the collector's reach. A full collection walked them all, a 170 ms stall of the
    loop on 2 Xeon cores, whenever enough newer objects had survived; now it walks only those. What is
    frozen is never freed, so this runs once the model is loaded and warmed up. Returns the count."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's full collections", frozen)
    return frozen


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class _Refused:
    """An AddRequest whose constraint did not compile (the reader thread's verdict): never scheduled."""

    request_id: str
    error: str
    field: str | None


class CoreLoop:
    """Commands between steps, one step while anything is unfinished, every step's outputs in one reply."""

    def __init__(self, engine, transport: CoreTransport):
        self.engine = engine
        self._transport = transport
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: set[str] = set()  # request ids in flight: each gets exactly one finished output
        self._apply_by_kind = {Kind.ADD: self._add, Kind.ABORT: self._abort, Kind.QUERY_STATS: self._reply_stats}

    def run(self) -> None:
        self._transport.connect(self._inbox, self._admit)
        running = True
        while running:
            outs: list[RequestOutput] = []
            running = self._apply_commands(outs, block=not self.engine.has_unfinished())
            if running and self.engine.has_unfinished():
                outs += self._step()
            if outs:
                self._send_outputs(outs)
        self._send_outputs(self._end_all(None))

    # ---- admission (the transport's thread) ----

    def _admit(self, command: Command) -> Command | _Refused:
        return self._with_grammar(command) if command.kind is Kind.ADD else command

    def _with_grammar(self, command: AddRequest) -> AddRequest | _Refused:
        """A constrained sequence gets its matcher here, off the step loop, unless its front compiled it
        already (in process): the one compile of its constraint on this request's path."""
        seq = command.seq
        if seq.params.constraint is None or seq.grammar is not None:
            return command
        try:
            seq.grammar = self.engine.grammars.matcher(seq.params.constraint)
        except InvalidRequestError as exc:
            return _Refused(seq.request_id, str(exc), exc.field)
        except Exception as exc:
            return _Refused(seq.request_id, f"structured output: {exc}", None)
        return command

    # ---- the loop ----

    def _apply_commands(self, outs: list[RequestOutput], block: bool) -> bool:
        """Apply every queued command (waiting for one when idle). False once told to stop."""
        try:
            command = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(command, Stop):
                return False
            try:
                self._apply(command, outs)
            except Exception:  # one bad command must not end the core
                log.exception("engine core command %r failed", command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: Command | _Refused, outs: list[RequestOutput]) -> None:
        if isinstance(command, _Refused):
            outs.append(
                RequestOutput(command.request_id, [], finished=True, error=command.error, error_field=command.field)
            )
            return
        self._apply_by_kind[command.kind](command, outs)

    def _add(self, command: AddRequest, outs: list[RequestOutput]) -> None:
        seq = command.seq
        try:
            self.engine.add(seq, command.want_text)  # refuses a request id already in flight
        except Exception as exc:
            outs.append(RequestOutput(seq.request_id, [], finished=True, error=str(exc)))
            return
        self._live.add(seq.request_id)

    def _abort(self, command: AbortRequest, outs: list[RequestOutput]) -> None:
        self._collect(self.engine.abort(command.request_id), outs)

    def _reply_stats(self, command: QueryStats, outs: list[RequestOutput]) -> None:
        if outs:  # outputs decided before the query travel before its reply
            self._send_outputs(outs)
            outs.clear()
        self._transport.send(StatsReply(command.token, self._stats()))

    def _step(self) -> list[RequestOutput]:
        try:
            outs = self.engine.step()
        except Exception as exc:  # a broken step must not strand its requests
            log.exception("engine step failed; failing the requests in flight")
            outs = self._end_all(f"engine step failed: {exc!r}")
        for out in outs:
            if out.finished:
                self._live.discard(out.request_id)
        return outs

    def _collect(self, out: RequestOutput | None, outs: list[RequestOutput]) -> None:
        if out is not None:
            self._live.discard(out.request_id)
            outs.append(out)

    def _end_all(self, error: str | None) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        for rid in list(self._live):
            self._collect(self.engine.fail(rid, error) if error else self.engine.abort(rid), outs)
        self._live.clear()
        return outs

    def _send_outputs(self, outs: list[RequestOutput]) -> None:
        self._transport.send(StepOutputs(outs, self._stats()))

    def _stats(self) -> CoreStats:
        cache = self.engine.block_manager.prefix_cache_stats
        return CoreStats(self.engine.stats(), cache.queried_tokens, cache.hit_tokens, len(self._live))
