"""grpc.health.v1 with a budget of its own: health is open without a token (orchestrators probe it), so an
unauthenticated caller must not be able to hold the server's RPC slots with Watch streams.

Open Watch streams are capped (`--max-health-watches`); one past the cap gets RESOURCE_EXHAUSTED at once.
The server adds the cap to its own RPC limit (serving/server.py), so however many watchers are open, the
service's RPCs keep every slot of `--max-concurrent-rpcs`.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health


class BoundedHealthServicer(health.aio.HealthServicer):
    """The reference asyncio health servicer, refusing Watch streams past `max_watches`."""

    def __init__(self, max_watches: int):
        super().__init__()
        self.max_watches = max_watches
        self.num_watches = 0  # Watch streams open now

    async def Watch(self, request, context) -> None:
        if self.num_watches >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.max_watches} health Watch streams are open at once; use Check, or retry later",
            )
        self.num_watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.num_watches -= 1
