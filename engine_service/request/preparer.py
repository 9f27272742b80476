"""Validation and encoding of a request into a Sequence: the edge's work, never the step loop's.

The in-process engine owns one; the engine service's gRPC front owns another (built from the shapes the
engine core reports), so text is encoded once, in the front, and the core only ever sees token ids.
A structured-output constraint is compiled once on a request's path: here when a GrammarCompiler is
given (the in-process engine), else in the engine core (the front leaves it alone).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
import uuid
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from tokenwire.engine.request.sampling_params import Constraint, SamplingParams, sample_seed
from tokenwire.engine.scheduling.sequence import Sequence
from tokenwire.serving.errors import InvalidRequestError

if TYPE_CHECKING:  # llguidance is loaded by whoever builds the compiler
    from tokenwire.engine.request.grammar import GrammarCompiler, GrammarMatcher


class RequestPreparer:
    """Thread-safe: gRPC handlers call `prepare` from worker threads."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        max_new_tokens_cap: int,
        max_logprobs: int,
        seed: int,
        grammars: GrammarCompiler | None = None,
    ):
        self.tokenizer = tokenizer
        self.grammars = grammars  # compiles constraints here (None: the engine core compiles them)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_logprobs = max_logprobs
        self._lock = threading.Lock()
        self._encodes = 0
        self._encode_s = 0.0  # wall time spent in those encodes
        self._seed_rng = random.Random(seed)
        self._ids = itertools.count()

    @property
    def num_prompt_encodes(self) -> int:
        """Prompts tokenized here: 0 for every request that arrived as token ids."""
        return self._encodes

    @property
    def prompt_encode_s(self) -> float:
        return self._encode_s

    def encode_prompt(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("prompt", "must be a non-empty string")
        start = time.perf_counter()
        ids = self.tokenizer.encode(text)
        with self._lock:
            self._encodes += 1
            self._encode_s += time.perf_counter() - start
        if not ids:  # e.g. only control characters the vocabulary has no token for
            raise InvalidRequestError("prompt", "encodes to no tokens")
        return ids

    def prepare(
        self,
        prompt: str | None = None,
        prompt_token_ids: Seq[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Sequence:
        """Validate a request and build its Sequence."""
        params = params or SamplingParams()
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt text or prompt_token_ids")
        params.validate(self.max_new_tokens_cap, self.max_logprobs, self.vocab_size)
        ids = self.encode_prompt(prompt) if prompt is not None else self._checked_ids(prompt_token_ids)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"is {len(ids)} tokens; the context holds {self.max_model_len} and at least one new token must fit",
            )
        grammar = self._matcher(params.constraint)
        with self._lock:
            seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
            number = next(self._ids)
        return Sequence(
            request_id or f"req-{number}-{uuid.uuid4().hex[:8]}",
            ids,
            params,
            arrival_time=arrival_time or time.monotonic(),
            seed=seed,
            grammar=grammar,
        )

    def prepare_samples(self, *args, **kwargs) -> list[Sequence]:
        """`prepare`, then one Sequence per sample (params.n of them): sample 0 keeps the request id; sample i
        is `"<id> #i"` (a space: no client id can collide), seeded with `sample_seed(seed, i)`, with its own
        grammar matcher, and forks off sample 0's prefill in the scheduler."""
        first = self.prepare(*args, **kwargs)
        return [first] + [self._sample(first, i) for i in range(1, first.params.n)]

    def _sample(self, first: Sequence, index: int) -> Sequence:
        return dataclasses.replace(
            first,
            request_id=f"{first.request_id} #{index}",
            prompt_token_ids=list(first.prompt_token_ids),
            output_token_ids=[],
            block_table=[],
            seed=sample_seed(first.seed, index),
            grammar=self._matcher(first.params.constraint),
            sample_index=index,
            fork_of=first.request_id,
        )

    def _matcher(self, constraint: Constraint | None) -> GrammarMatcher | None:
        """The constraint compiled (cached per constraint and tokenizer, bounded by the grammar sandbox), or,
        without a compiler, None: the core compiles it and refuses a bad one naming its field. Nothing
        here parses untrusted grammar text (its conversion alone can hold the GIL for seconds)."""
        if constraint is None or self.grammars is None:
            return None
        return self.grammars.matcher(constraint)

    def _checked_ids(self, ids: Seq[int]) -> list[int]:
        ids = list(ids)
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids", f"ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        return ids
