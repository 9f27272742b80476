"""A server-sent-events response that notices a client leaving.

It streams `data: <json>` events, then `data: [DONE]`, while a second task waits for the client's
`http.disconnect`; whichever ends first cancels the other, and the event source is closed on every path,
so a client that hangs up mid-stream cancels its engine requests at once (the engine aborts them at its
next step and frees their KV blocks), not only when the next chunk fails to send.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]  # proxies (nginx) must not buffer a stream


def event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SseResponse(Response):
    def __init__(self, events: AsyncIterator[dict], close: Callable[[], Awaitable[None]]):
        super().__init__(status_code=200)
        self._events = events
        self._close = close  # closes what feeds `events` (the engine streams)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        streaming = asyncio.create_task(self._stream(send))
        watching = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self._events.aclose()
            await self._close()

    async def _stream(self, send) -> None:
        try:
            async for body in self._events:
                await send({"type": "http.response.body", "body": event(body), "more_body": True})
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        except OSError:  # the connection broke while sending: the same as a disconnect
            pass
        except Exception:  # a bug: the headers are gone, so the client sees the stream end early
            log.exception("stream failed")


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
