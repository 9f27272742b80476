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
    grace_period_s: float = 5.0          # on shutdown, in-flight RPCs get this long to finish
    trust_remote_code: bool = False      # never run code shipped with a checkpoint unless asked

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"  # IPv6 literals need brackets

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]
