"""Connection hygiene for the gateway's HTTP server: a connection that does not finish its request's headers
in time is closed, so silent or slowloris clients cannot hold file descriptors forever.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) only after a response; a connection that
never sends a whole request head has no timer at all (issue 33: 0 of 200 silent connections closed within
30 s). `header_timeout_protocol` arms one when a connection opens and again after each response."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request's head has the same time to arrive

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        request_in_flight = self.cycle is not None and not self.cycle.response_complete
        if not request_in_flight and not self.transport.is_closing():
            self.transport.close()  # no head in time: nothing to answer, so no 408 either


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not in within `header_timeout_s`."""
    return type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
