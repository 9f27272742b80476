"""Runs an LLMEngine on its own thread. Other threads talk to it only through a thread-safe inbox, and
hear back through per-request sinks called on the engine thread (a sink must be cheap and non-blocking,
e.g. `loop.call_soon_threadsafe(queue.put_nowait, output)`).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.core.outputs import RequestOutput
from tokenwire.engine.scheduling.sequence import Sequence

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="tokenwire-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever is still in flight (each gets its terminal output) and end the thread."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def submit(self, seq: Sequence, sink: Sink, want_text: bool = False) -> None:
        """Queue a prepared sequence (see LLMEngine.prepare); its outputs go to `sink`."""
        self._inbox.put(lambda: self._add(seq, sink, want_text))

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step boundary; its sink gets a final ABORT output."""
        self._inbox.put(lambda: self._emit(self.engine.abort(request_id)))

    def call(self, fn: Callable[[], object], timeout: float | None = None) -> object:
        """Run `fn` on the engine thread between steps and return its result, or raise its exception
        (tests, admin). Raises RuntimeError rather than wait forever on a loop that has stopped."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._inbox.put(run)
        return future.result(timeout)

    # ---- engine thread ----

    def _run(self) -> None:
        while self._drain_inbox(block=not self.engine.has_unfinished()):
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step must not strand its requests
                log.exception("engine step failed; failing the requests in flight")
                outputs = self._fail_all(f"engine step failed: {exc!r}")
            for output in outputs:
                self._emit(output)
        for output in self._fail_all(None):
            self._emit(output)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; wait for one when the engine is idle. False once told to stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            try:
                item()
            except Exception:  # one bad command (an abort, an add) must not end the engine thread
                log.exception("engine loop command failed")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, seq: Sequence, sink: Sink, want_text: bool) -> None:
        try:
            self.engine.add(seq, want_text)  # refuses a request id already in flight
        except Exception as exc:
            sink(RequestOutput(seq.request_id, [], finished=True, error=str(exc)))
            return
        self._sinks[seq.request_id] = sink

    def _fail_all(self, error: str | None) -> list[RequestOutput]:
        ids = list(self._sinks)
        ends = [self.engine.fail(rid, error) if error else self.engine.abort(rid) for rid in ids]
        return [end for end in ends if end is not None]

    def _emit(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        sink = self._sinks.pop(output.request_id) if output.finished else self._sinks.get(output.request_id)
        if sink is None:
            return
        try:
            sink(output)
        except Exception:  # a consumer's bug must not kill the engine thread
            log.exception("output sink for %s failed", output.request_id)
