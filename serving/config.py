"""The settings every tokenwire gRPC server shares; each service's config dataclass extends it, and the CLIs
generate their flags from the fields (tokenwire.serving.cli_env), taking each flag's help from the field's comment."""

from __future__ import annotations

from dataclasses import dataclass


# The fields' trailing comments are their flags' help texts (serving/cli_env.py): kept on one line each.
# fmt: off
@dataclass(frozen=True)
class GrpcServerConfig:
    """What every tokenwire gRPC server shares: where it listens, message limit, drain, metrics, TLS, auth."""
    host: str = "127.0.0.1"              # interface to bind; "0.0.0.0" accepts other machines (containers)
    port: int = 0                        # 0 picks a free port (logged)
    max_message_bytes: int = 64 << 20    # gRPC send/receive limit; a bigger message gets RESOURCE_EXHAUSTED
    drain_grace_s: float = 5.0           # after SIGTERM, how long in-flight requests may still finish
    metrics_port: int = -1               # Prometheus /metrics port on `host`; 0 picks a free one, -1 is off
    tls_cert: str = ""                   # PEM certificate chain: serve TLS (with tls_key) instead of plaintext
    tls_key: str = ""                    # PEM private key of tls_cert
    tls_client_ca: str = ""              # PEM CA bundle: also require client certificates it signed (mTLS)
    auth_token: str = ""                 # require `authorization: Bearer <token>` on every RPC but health
    max_health_watches: int = 64         # open grpc.health Watch streams (they need no token); more get RESOURCE_EXHAUSTED, and they take none of the service's RPC slots

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"  # IPv6 literals need brackets

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]
# fmt: on
