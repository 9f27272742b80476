"""How the core loop hears its front and answers it: one transport per place the front can be.

- `PipeTransport`: the core in a child process, typed messages pickled over two one-way pipes, read by a
  thread that moves commands into the loop's inbox (the pipe never fills while a step runs);
- `InMemoryTransport`: the core on a thread of its front's process, commands straight into the inbox,
  replies to a callback.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

from tokenwire.engine.core.messages import Command, Reply, Stop

Admit = Callable[[Command], object]  # a command as the loop's inbox takes it (AddRequest: matcher attached)


class CoreTransport(Protocol):
    def connect(self, inbox: queue.SimpleQueue, admit: Admit) -> None:
        """Start putting the front's commands, each passed through `admit`, into `inbox`; a Stop once the
        front is gone."""

    def send(self, reply: Reply) -> None: ...


class PipeTransport:
    """The core in a child process: commands and replies pickled over two one-way pipes."""

    def __init__(self, commands: Connection, replies: Connection):
        self._commands, self._replies = commands, replies

    def connect(self, inbox: queue.SimpleQueue, admit: Admit) -> None:
        # A reader thread, so the pipe never fills while a step runs (and grammars compile off the loop).
        threading.Thread(target=self._read, args=(inbox, admit), name="tokenwire-core-inbox", daemon=True).start()

    def _read(self, inbox: queue.SimpleQueue, admit: Admit) -> None:
        try:
            while True:
                inbox.put(admit(self._commands.recv()))
        except (EOFError, OSError):  # the front died or closed
            inbox.put(Stop())

    def send(self, reply: Reply) -> None:
        self._replies.send(reply)


class InMemoryTransport:
    """The core on a thread of its front's process: `put` hands a command to the loop's inbox at once
    (in the caller's thread), and replies go to `deliver` on the core's thread (a front on an event loop
    passes a `loop.call_soon_threadsafe` partial)."""

    def __init__(self, deliver: Callable[[Reply], None]):
        self._deliver = deliver
        self._inbox: queue.SimpleQueue | None = None
        self._admit: Admit | None = None
        self._early: list[Command] = []  # commands put before the loop connected
        self._lock = threading.Lock()

    def connect(self, inbox: queue.SimpleQueue, admit: Admit) -> None:
        with self._lock:
            self._inbox, self._admit = inbox, admit
            for command in self._early:
                inbox.put(admit(command))
            self._early.clear()

    def put(self, command: Command) -> None:
        with self._lock:
            if self._inbox is None:
                self._early.append(command)
                return
        self._inbox.put(self._admit(command))

    def send(self, reply: Reply) -> None:
        self._deliver(reply)
