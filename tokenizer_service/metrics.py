"""The tokenizer service's own Prometheus metrics (RPC metrics and the endpoint are tokenwire.serving.metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter


class TokenizerMetrics:
    """What the tokenizer did: prompt encodes (one per text tokenized) and the tokens they made."""

    def __init__(self, registry: CollectorRegistry):
        self.prompt_encodes = Counter(
            "tokenwire_tokenizer_prompt_encodes",
            "Texts tokenized: 1 per Encode and ApplyChatTemplate, 1 per text of a BatchEncode",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tokenwire_tokenizer_prompt_tokens", "Token ids produced by those encodes", registry=registry
        )
        self.decoded_tokens = Counter(
            "tokenwire_tokenizer_decoded_tokens", "Token ids turned into text by Decode", registry=registry
        )

    def on_response(self, rpc: str, request: Any, response: Any, gap_s: float | None) -> None:
        """RpcObserver hook: called once per successful response message."""
        if rpc in ("Encode", "ApplyChatTemplate"):
            self._encoded([len(response.ids)])
        elif rpc == "BatchEncode":
            self._encoded([len(e.ids) for e in response.encodings])
        elif rpc == "Decode":
            self.decoded_tokens.inc(len(request.ids))

    def _encoded(self, lengths: list[int]) -> None:
        self.prompt_encodes.inc(len(lengths))
        self.prompt_tokens.inc(sum(lengths))
