"""Prompt-lookup (n-gram) drafts for speculative decoding: the tokens that followed the most recent earlier
occurrence of the sequence's last n tokens, for the longest n in [min_n, max_n] that matches.

Each sequence keeps an incremental index, n-gram -> the position after its latest occurrence, extended by
the tokens appended since the last call, so a proposal costs O(max_n) dict lookups, never a scan of the
history. Plain Python: no torch, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenwire.engine.scheduling.sequence import Sequence


@dataclass
class _NgramIndex:
    tokens: list[int] = field(default_factory=list)  # the sequence's ids seen so far
    # n -> n-gram -> position right after its latest occurrence that has a continuation
    latest: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    num_indexed: int = 0  # positions j < num_indexed have had the n-grams ending before j registered


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, num_tokens: int):
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError(
                f"need 1 <= ngram_min <= ngram_max and num_speculative_tokens >= 1, got {min_n}, {max_n}, {num_tokens}"
            )
        self.min_n, self.max_n, self.num_tokens = min_n, max_n, num_tokens
        self._indexes: dict[Sequence, _NgramIndex] = {}

    def propose(self, seq: Sequence, max_tokens: int | None = None) -> list[int]:
        """Up to min(num_tokens, max_tokens) draft ids to follow `seq`'s known tokens; [] when nothing matches."""
        limit = self.num_tokens if max_tokens is None else min(self.num_tokens, max_tokens)
        if limit <= 0:
            return []
        index = self._update(seq)
        tokens = index.tokens
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            after = index.latest[n].get(tuple(tokens[len(tokens) - n :]))
            if after is not None:
                return tokens[after : after + limit]
        return []

    def forget(self, seq: Sequence) -> None:
        self._indexes.pop(seq, None)

    def _update(self, seq: Sequence) -> _NgramIndex:
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = _NgramIndex(latest={n: {} for n in range(self.min_n, self.max_n + 1)})
        tokens = index.tokens
        if len(tokens) < seq.num_tokens:
            tokens += _tail(seq, len(tokens))
        # Register every n-gram that ends right before position j, for the positions j that have a token
        # (so the drafts have something to copy); the last n-gram itself is the lookup key, not registered.
        for j in range(max(index.num_indexed, self.min_n), len(tokens)):
            for n, table in index.latest.items():
                if n <= j:
                    table[tuple(tokens[j - n : j])] = j
        index.num_indexed = max(index.num_indexed, len(tokens))
        return index


def _tail(seq: Sequence, start: int) -> list[int]:
    """seq.all_token_ids[start:], without concatenating the prompt again."""
    n = seq.num_prompt_tokens
    if start >= n:
        return seq.output_token_ids[start - n :]
    return seq.prompt_token_ids[start:] + seq.output_token_ids
