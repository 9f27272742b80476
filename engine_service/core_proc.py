"""The engine core process: LLMEngine.step in a loop, apart from the gRPC front (its own GIL).

The engine service starts it (`CoreClient.start`, tokenwire.engine.core_client) and owns it. Two
one-way pipes (multiprocessing connections, pickle) join them:
- front -> core, commands: ("add", Sequence, want_text), ("abort", request_id), ("query", token),
  ("stop",). A reader thread moves them into an inbox, so the pipe never fills while a step runs;
  the loop applies them between steps (an abort frees its KV blocks before the next step).
- core -> front: ("ready", CoreInfo) or ("failed", message) once; then ("out", [RequestOutput...],
  CoreStats) after every step or command that produced outputs: one message per step for every
  request, with a stats snapshot so that gauges never stop the loop; ("reply", token, CoreStats,
  census) answers a query in order with the commands before it.
The core dies with its front: PR_SET_PDEATHSIG on Linux, and EOF on the command pipe everywhere.
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
from tokenwire.engine.outputs import EngineStats, RequestOutput
from tokenwire.engine.sampling_params import SamplingParams
from tokenwire.serving.logging_setup import configure_logging

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CoreInfo:
    """What the front needs from the loaded model to validate requests and answer GetModelInfo."""
    architecture: str
    device: str
    dtype: str                      # "float32", "bfloat16", ...
    kv_cache_dtype: str             # dtype, or a narrower one under a float32 model
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class CoreStats:
    """Engine state after a step; the front reads the latest one without asking the core."""
    engine: EngineStats
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int


def run_core(commands: Connection, outputs: Connection, config: EngineConfig, log_level: str, log_format: str,
             parent_pid: int) -> None:
    """The child's entry point (multiprocessing, spawn); it logs as the front does (level, text or json)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the group: the front drains, then stops us
    configure_logging(log_level, log_format)
    try:
        engine = load_engine(config)
    except BaseException as exc:  # the front reports it and fails its load
        log.exception("the engine core failed to load")
        outputs.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    from tokenwire.engine.device import dtype_name  # torch: the core's import, not the front's

    freeze_startup_heap()
    runner = engine.runner
    outputs.send(("ready", CoreInfo(
        architecture=runner.architecture, device=str(runner.device), dtype=dtype_name(runner.dtype),
        kv_cache_dtype=dtype_name(runner.kv_dtype),
        num_blocks=runner.num_blocks, block_size=runner.block_size, max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size, tokenizer_fingerprint=engine.tokenizer_fingerprint,
        eos_token_ids=tuple(sorted(runner.eos_token_ids)))))
    try:
        CoreLoop(engine, commands, outputs).run()
    except (BrokenPipeError, ConnectionResetError):  # the front is gone: nobody to serve
        pass


def load_engine(config: EngineConfig):
    from tokenwire.engine.engine import LLMEngine

    engine = LLMEngine(config)
    # One tiny generation (prefill + decode) so the first real request does not pay one-time costs.
    engine.generate(prompt_token_ids=[[1] * 8], params=SamplingParams(max_new_tokens=2, temperature=0.0))
    return engine


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


class CoreLoop:
    def __init__(self, engine, commands: Connection, outputs: Connection):
        self.engine = engine
        self._commands = commands
        self._outputs = outputs
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: set[str] = set()   # request ids in flight: each gets exactly one finished output

    def run(self) -> None:
        threading.Thread(target=self._read, name="tokenwire-core-inbox", daemon=True).start()
        running = True
        while running:
            outs: list[RequestOutput] = []
            running = self._apply_commands(outs, block=not self.engine.has_unfinished())
            if running and self.engine.has_unfinished():
                outs += self._step()
            if outs:
                self._send_outputs(outs)
        self._send_outputs(self._end_all(None))

    def _read(self) -> None:
        """Reader thread: commands into the inbox; EOF (the front died or closed) means stop."""
        try:
            while True:
                command = self._commands.recv()
                if command[0] == "add":
                    command = (*command, self._attach_grammar(command[1]))
                self._inbox.put(command)
        except (EOFError, OSError):
            self._inbox.put(("stop",))

    def _attach_grammar(self, seq) -> str | None:
        """A constrained sequence gets its matcher here, off the step loop (matchers do not cross the
        pipe; the front already compiled and checked the constraint). Returns an error, or None."""
        if seq.params.constraint is None:
            return None
        try:
            seq.grammar = self.engine.grammars.matcher(seq.params.constraint)
        except Exception as exc:
            return f"structured output: {exc}"
        return None

    def _apply_commands(self, outs: list[RequestOutput], block: bool) -> bool:
        """Apply every queued command (waiting for one when idle). False once told to stop."""
        try:
            command = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            try:
                self._apply(command, outs)
            except Exception:  # one bad command must not end the core
                log.exception("engine core command %r failed", command[0])
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple, outs: list[RequestOutput]) -> None:
        kind = command[0]
        if kind == "add":
            _, seq, want_text, error = command
            if error is not None:
                outs.append(RequestOutput(seq.request_id, [], finished=True, error=error))
                return
            try:
                self.engine.add(seq, want_text)   # refuses a request id already in flight
            except Exception as exc:
                outs.append(RequestOutput(seq.request_id, [], finished=True, error=str(exc)))
                return
            self._live.add(seq.request_id)
        elif kind == "abort":
            self._collect(self.engine.abort(command[1]), outs)
        elif kind == "query":
            if outs:  # outputs decided before the query travel before its reply
                self._send_outputs(outs)
                outs.clear()
            census = {"states": list(self.engine._states), "by_id": list(self.engine.scheduler._by_id),
                      "live": list(self._live)}
            self._outputs.send(("reply", command[1], self._stats(), census))
        else:
            raise ValueError(f"unknown command {kind!r}")

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
        self._outputs.send(("out", outs, self._stats()))

    def _stats(self) -> CoreStats:
        cache = self.engine.block_manager.prefix_cache_stats
        return CoreStats(self.engine.stats(), cache.queried_tokens, cache.hit_tokens)
