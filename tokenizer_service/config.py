"""The tokenizer service's single source of defaults: the CLI reads its flags from this dataclass."""
from __future__ import annotations

from dataclasses import dataclass

from tokenwire.tokenizer.model_resolver import DEFAULT_MODEL


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model: str = DEFAULT_MODEL           # resolver name, local folder or hub id
    host: str = "127.0.0.1"              # "0.0.0.0" to accept other machines (containers)
    port: int = 50051                    # 0 picks a free port; the bound one is logged and returned
    max_message_bytes: int = 64 << 20    # gRPC send/receive limit (a BatchEncode can be large)
    max_batch_size: int = 4096           # texts per BatchEncode
    inline_work_limit: int = 16384       # requests up to this many chars/ids run on the event loop;
                                         # bigger ones go to a worker thread so the loop stays responsive
    drain_grace_s: float = 5.0           # on SIGTERM, in-flight RPCs get this long to finish
    metrics_port: int = -1               # Prometheus /metrics port on `host`; 0 picks a free one, -1 is off
    trust_remote_code: bool = False      # never run code shipped with a checkpoint unless asked
    tls_cert: str = ""                   # PEM certificate chain: serve TLS (with tls_key) instead of plaintext
    tls_key: str = ""                    # PEM private key of tls_cert
    tls_client_ca: str = ""              # PEM CA bundle: also require client certificates it signed (mTLS)
    auth_token: str = ""                 # require `authorization: Bearer <token>` on every RPC but health

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"  # IPv6 literals need brackets

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]
