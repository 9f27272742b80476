"""Transport security and caller authentication, shared by both services (both off by default).

TLS: `--tls-cert` and `--tls-key` (PEM files) serve TLS instead of plaintext; adding `--tls-client-ca`
also requires every client to present a certificate signed by that CA (mutual TLS).

Auth: `--auth-token` (better: the `TOKENWIRE_AUTH_TOKEN` environment variable, which `ps` does not show)
makes every RPC require `authorization: Bearer <token>` metadata, else UNAUTHENTICATED. grpc.health.v1
stays open so orchestrators can probe without the secret; reflection requires the token like any
other RPC (it lists the whole API). A bearer token travels in clear over plaintext: pair it with TLS
outside a trusted network.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

AUTH_METADATA_KEY = "authorization"
# Methods callable without a token: health probes (kubelet, docker, load balancers).
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class TlsConfigError(ValueError):
    """TLS flags that cannot work together (e.g. a certificate without its key)."""


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; None when neither cert nor key is given (plaintext)."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise TlsConfigError("--tls-cert and --tls-key go together")
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if not client_ca:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(), require_client_auth=True)


def add_port(server: grpc.aio.Server, address: str, cert: str = "", key: str = "", client_ca: str = "") -> int:
    """Bind `address` with TLS when a certificate is configured, else plaintext; returns the port."""
    credentials = server_credentials(cert, key, client_ca)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def server_interceptors(auth_token: str) -> list[grpc.aio.ServerInterceptor]:
    """The auth interceptor when a token is configured, else none."""
    return [BearerTokenAuth(auth_token)] if auth_token else []


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every RPC outside OPEN_SERVICES without `authorization: Bearer <token>` metadata."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty auth token would let everyone in")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES) or self._authorized(details):
            return handler
        return _refusing(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle
        return False


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED without running the method."""

    async def refuse(request, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid credentials: send 'authorization: Bearer <token>' metadata",
        )

    serde = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serde)
    return grpc.stream_stream_rpc_method_handler(refuse, **serde)
