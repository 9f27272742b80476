"""How the SDK proves who it talks to and who it is: TLS channel credentials and the bearer token."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

AUTH_TOKEN_ENV = "TOKENWIRE_AUTH_TOKEN"  # the same variable the services read their token from
AUTH_METADATA_KEY = "authorization"


def channel_credentials(
    tls_root_cert: str | bytes | None = None, credentials: grpc.ChannelCredentials | None = None
) -> grpc.ChannelCredentials | None:
    """`credentials` as given, else TLS trusting `tls_root_cert` (PEM bytes, or a PEM file's path);
    None for plaintext."""
    if credentials is not None or tls_root_cert is None:
        return credentials
    pem = tls_root_cert if isinstance(tls_root_cert, bytes) else Path(tls_root_cert).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def auth_metadata(auth_token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata carrying the bearer token (None: $TOKENWIRE_AUTH_TOKEN); empty without a token."""
    token = os.environ.get(AUTH_TOKEN_ENV) if auth_token is None else auth_token
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def open_channel(address: str, credentials: grpc.ChannelCredentials | None, **options) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, **options)
    return grpc.aio.secure_channel(address, credentials, **options)
