"""Bearer-token auth of the HTTP side, as the services do it on gRPC: with `--auth-token` set, every route
but /health and /metrics needs `Authorization: Bearer <token>`, else 401 in OpenAI's error shape."""

from __future__ import annotations

import hmac

from tokenwire.gateway.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics"})


class BearerAuth:
    """A pure ASGI middleware; the comparison takes constant time (no timing oracle)."""

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("an empty auth token would let everyone in")
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            refusal = ApiError(
                401,
                "missing or invalid credentials: send 'Authorization: Bearer <token>'",
                "authentication_error",
                code="invalid_api_key",
            ).response()
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False
