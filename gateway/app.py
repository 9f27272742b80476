"""The FastAPI application: routes, OpenAI-shaped errors, auth and metrics middleware, and the SDK client
whose lifetime is the app's (opened on the server's event loop, closed at shutdown)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenwire.client import AsyncClient
from tokenwire.gateway.auth import BearerAuth
from tokenwire.gateway.backend import Backend
from tokenwire.gateway.config import GatewayConfig
from tokenwire.gateway.errors import ApiError
from tokenwire.gateway.metrics import HttpMetrics, metrics_response
from tokenwire.gateway.routes import router

log = logging.getLogger(__name__)
ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics"}
)


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = AsyncClient(
            config.tokenizer,
            config.engine,
            tls_root_cert=config.upstream_tls_ca or None,
            auth_token=config.upstream_auth_token,
        )
        app.state.backend = Backend(config, client)
        log.info("gateway over tokenizer %s and engine %s", config.tokenizer, config.engine)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="tokenwire gateway", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)
    registry = CollectorRegistry()
    app.add_api_route("/metrics", lambda: metrics_response(registry), methods=["GET"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal error", "internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # unknown route, wrong method
        return ApiError(error.status_code, str(error.detail), "invalid_request_error").response()

    if config.auth_token:
        app.add_middleware(BearerAuth, token=config.auth_token)
    # Added last, so outermost: refusals by auth are counted too.
    app.add_middleware(HttpMetrics, registry=registry, routes=ROUTES)
    return app
