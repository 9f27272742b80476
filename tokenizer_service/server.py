"""The tokenizer's gRPC server: TokenizerService on the shared server lifecycle (tokenwire.serving.server).

`start()` binds and answers health (NOT_SERVING) while `load()` reads the tokenizer in a thread; health
turns SERVING when the codec is attached. `serve()` runs it for the CLI until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from tokenwire.serving.server import GrpcServer, serve_until_signal
from tokenwire.tokenizer.chat_templates import apply_override
from tokenwire.tokenizer.codec import TokenCodec
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.metrics import TokenizerMetrics
from tokenwire.tokenizer.servicer import TokenizerServicer
from tokenwire.tokenizer.tokenizer import TokenizerInfo, load_tokenizer
from tokenwire.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


class TokenizerServer(GrpcServer):
    """TokenizerService + grpc.health.v1 + server reflection on one port, and /metrics."""

    service_name = SERVICE_NAME
    display_name = "tokenwire-tokenizer"

    def __init__(self, config: TokenizerServiceConfig):
        super().__init__(config, max_concurrent_rpcs=config.max_concurrent_rpcs)
        self.servicer = TokenizerServicer(config)
        self.metrics = TokenizerMetrics(self.registry)
        self.observe_responses(self.metrics.on_response)

    def add_servicer(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self.servicer, server)

    async def load(self, tokenizer: Any = None) -> TokenizerInfo:
        """Loads the tokenizer (or takes a loaded one) off the event loop, then reports SERVING."""
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(
                load_tokenizer, self.config.model, self.config.trust_remote_code, self.config.chat_template
            )
        else:
            apply_override(tokenizer, self.config.chat_template)
        codec = await asyncio.to_thread(TokenCodec, tokenizer, self.config.model)  # fingerprinting: ~0.3 s
        self.servicer.attach(codec)
        await self.set_serving()
        log.info("tokenizer ready: vocab %d, fingerprint %s", codec.info.vocab_size, codec.info.fingerprint)
        return codec.info


async def serve(config: TokenizerServiceConfig) -> None:
    """Runs until SIGINT/SIGTERM, then stops gracefully; a failed load stops it with that error."""
    await serve_until_signal(TokenizerServer(config))
