"""Where untrusted constraints are compiled: a small pool of child processes (grammar_worker.py), each
restartable, each constraint bounded in time (`--max-grammar-compile-s`: past it the child is killed) and
memory (`--max-grammar-compile-mib`: its address space). A child that crashes on a constraint (llguidance's
stack overflow on a few thousand chained GBNF rules) or runs out of time or memory costs that request an
INVALID_ARGUMENT naming its field; the serving process, its GIL and its neighbours are untouched.

Children are plain subprocesses (the engine core is a daemonic multiprocessing child, which may not have
multiprocessing children of its own), started on the first constrained request, and they exit on EOF
when their parent closes or dies.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from tokenwire.engine.request.sampling_params import Constraint
from tokenwire.serving.errors import InvalidRequestError

_START_TIMEOUT_S = 120.0  # importing llguidance and building the tokenizer's grammar view (~1-3 s)


class _Worker:
    """One child process and its two pipes."""

    def __init__(self, tokenizer_args: tuple, max_mib: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenwire.engine.request.grammar_worker", str(to_child_r), str(from_child_w)]
            + [str(max_mib)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._commands = Connection(to_child_w, readable=False)
        self._replies = Connection(from_child_r, writable=False)
        self._commands.send(tokenizer_args)
        if self._reply(_START_TIMEOUT_S) != ("ready",):
            self.kill()
            raise RuntimeError(f"the grammar compiler did not start (exit code {self.process.poll()})")

    def vet(self, constraint: Constraint, timeout_s: float) -> tuple:
        self._commands.send(constraint)
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float) -> tuple | None:
        """The child's answer, or None if it died or gave none within `timeout_s`."""
        try:
            if self._replies.poll(timeout_s):
                return self._replies.recv()
        except (EOFError, OSError):
            pass
        return None

    def kill(self) -> int | None:
        """Ends the child; its exit code (negative: the signal that ended it)."""
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait()
        self._commands.close()
        self._replies.close()
        return code


class GrammarSandbox:
    """Thread-safe: each `vet` takes an idle child (or waits for one), so at most `size` compile at once."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids, max_compile_s: float, max_mib: int, size: int):
        self._tokenizer_args = (hf_tokenizer, vocab_size, list(eos_token_ids))
        self.max_compile_s = max_compile_s
        self.max_mib = max_mib
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self._idle.put(None)  # a slot whose child starts when first needed
        self._lock = threading.Lock()
        self.restarts = 0  # children killed or crashed, replaced by fresh ones

    def vet(self, constraint: Constraint) -> str:
        """The constraint's llguidance grammar text, proved to compile in a child within the bounds;
        InvalidRequestError naming its field otherwise. Waiting for a free child counts towards the limit,
        a child's start does not."""
        waited = time.monotonic()
        try:
            worker = self._idle.get(timeout=self.max_compile_s)
        except queue.Empty:
            raise self._too_slow(constraint) from None
        left = max(0.0, self.max_compile_s - (time.monotonic() - waited))
        try:
            worker = worker or _Worker(self._tokenizer_args, self.max_mib)  # its start is not the constraint's
            reply = worker.vet(constraint, left)
        except BaseException:
            self._idle.put(None)
            raise
        if reply is None:  # too slow, crashed, or out of memory: this child is done
            code = worker.kill()
            self._idle.put(None)
            with self._lock:
                self.restarts += 1
            if code is not None and code < 0 and code != -9:
                raise InvalidRequestError(
                    constraint.kind,
                    f"crashed the grammar compiler (signal {-code}): too large or too deeply nested to compile"
                    f" within {self.max_mib} MiB (--max-grammar-compile-mib)",
                )
            raise self._too_slow(constraint)
        self._idle.put(worker)
        if reply[0] == "refused":
            raise InvalidRequestError(reply[1], reply[2])
        return reply[1]

    def _too_slow(self, constraint: Constraint) -> InvalidRequestError:
        return InvalidRequestError(
            constraint.kind, f"took longer than {self.max_compile_s:g} s to compile (--max-grammar-compile-s)"
        )

    def close(self) -> None:
        """Ends the idle children (a busy one ends at its caller's next kill, or on our exit's EOF)."""
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            if worker is not None:
                worker.kill()
