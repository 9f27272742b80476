"""The tokenizer service's config, the single source of its defaults, flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.serving.config import GrpcServerConfig
from tokenwire.serving.model_resolver import DEFAULT_MODEL


# The fields' trailing comments are their flags' help texts (serving/cli_env.py): kept on one line each.
# fmt: off
@dataclass(frozen=True)
class TokenizerServiceConfig(GrpcServerConfig):
    port: int = 50051                    # 0 picks a free port (logged)
    model: str = DEFAULT_MODEL           # resolver name (smollm2-135m), local folder or hub id
    max_batch_size: int = 4096           # texts per BatchEncode
    max_concurrent_rpcs: int = 1024      # RPCs in flight (open streams included, health apart) before new ones get RESOURCE_EXHAUSTED
    max_stream_push_ids: int = 65536     # ids in one DecodeStream message; more get INVALID_ARGUMENT (split them over several)
    inline_work_limit: int = 16384       # requests up to this many chars/ids run on the event loop, bigger in a thread
    trust_remote_code: bool = False      # never run code shipped with a checkpoint unless asked
    chat_template: str = ""              # a Jinja chat template file, or a shipped one's name (chatml-tools), replacing the model's; the engine needs the same (fingerprint)
# fmt: on
