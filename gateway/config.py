"""The gateway's config: the single source of its defaults, flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass


# The fields' trailing comments are their flags' help texts (serving/cli_env.py): kept on one line each.
# fmt: off
@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"              # interface to bind; "0.0.0.0" accepts other machines (containers)
    port: int = 8000                     # HTTP port; 0 picks a free port (logged)
    tokenizer: str = "localhost:50051"   # the tokenizer service's gRPC target
    engine: str = "localhost:50052"      # the engine service's gRPC target, e.g. dns:///engine:50052
    served_model_name: str = ""          # the model name clients use; empty: the engine's --model
    max_n: int = 16                      # the largest `n` (samples per prompt) a request may ask for
    max_prompts_per_request: int = 256   # the most prompts one /v1/completions request may list; more: 400
    max_body_bytes: int = 16 << 20       # the largest request body, refused (413) before it is parsed
    header_timeout_s: float = 10.0       # a connection that has not sent a whole request head within this is closed (silent clients, slowloris)
    keep_alive_timeout_s: float = 5.0    # an idle keep-alive connection is closed after this
    max_connections: int = 1024          # open connections (and requests) past which a request gets 503 instead of the app
    request_timeout_s: float = 600.0     # deadline of one request's calls to the services
    drain_grace_s: float = 30.0          # after SIGTERM, how long in-flight requests may still finish
    tls_cert: str = ""                   # PEM certificate chain: serve HTTPS (with tls_key) instead of HTTP
    tls_key: str = ""                    # PEM private key of tls_cert
    auth_token: str = ""                 # require `Authorization: Bearer <token>` on every route but /health and /metrics
    upstream_tls_ca: str = ""            # PEM CA that signed the services' certificates: talk TLS to them
    upstream_auth_token: str = ""        # bearer token the services require (their --auth-token)
    tool_call_parser: str = "hermes"     # how `tool_choice: auto` reads calls out of the output: hermes (<tool_call>{...}</tool_call>) or llama3_json
    reasoning_parser: str = ""           # split reasoning_content from content: qwen3 or deepseek_r1 (<think>...</think>); empty: no split

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)
# fmt: on
