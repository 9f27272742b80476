"""One request inside the engine core, as an EngineService handler sees it: its samples' outputs on one
asyncio queue (filled on the event loop by the core client), and their abort when the handler leaves early.
No protobuf here: servicer.py turns the outputs into stream messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from tokenwire.engine.core.outputs import RequestOutput
from tokenwire.engine.scheduling.sequence import Sequence

if TYPE_CHECKING:  # kept out of the import path: the server binds its port before loading torch
    from tokenwire.engine.edge.core_client import CoreClient


class Submitted:
    """One request's sequences (its n samples) inside the engine: one output queue for all of them, and
    their abort if the caller leaves early. `on_start` runs (on the event loop) when the first output
    arrives: the request has left the waiting queue."""

    def __init__(
        self,
        core: CoreClient,
        seqs: Seq[Sequence],
        want_text: bool,
        on_start: Callable[[str], None] = lambda request_id: None,
    ):
        self._core = core
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._on_start: Callable[[str], None] | None = on_start
        self.request_id = seqs[0].request_id
        self.index_of = {seq.request_id: seq.sample_index for seq in seqs}  # engine id -> sample index
        self._unfinished = set(self.index_of)
        self.finished = False
        for seq in seqs:
            core.submit(seq, self._deliver, want_text)

    def _deliver(self, output: RequestOutput) -> None:
        if self._on_start is not None:
            self._on_start(self.request_id)
            self._on_start = None
        self._queue.put_nowait(output)

    async def next_outputs(self) -> list[RequestOutput]:
        """Wait for one output, then take every one already queued (a slow reader gets them merged)."""
        outputs = [await self._queue.get()]
        while not self._queue.empty():
            outputs.append(self._queue.get_nowait())
        self._unfinished.difference_update(out.request_id for out in outputs if out.finished)
        self.finished = not self._unfinished
        return outputs

    async def all_outputs(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while not self.finished:
            outputs += await self.next_outputs()
        return outputs

    def abort_unless_finished(self) -> None:
        """Abort every sample still running (cancel, deadline, a failed sample): all n end together."""
        self._on_start = None  # the handler is leaving: its id may soon name another request
        for sample_id in sorted(self._unfinished):
            self._core.abort(sample_id)
        self._unfinished.clear()
        self.finished = True
