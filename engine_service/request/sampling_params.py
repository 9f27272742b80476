"""Per-request sampling parameters, validated once at submission (never inside the step loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenwire.serving.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's bound
MAX_LOGIT_BIAS = 100.0  # each value in [-100, 100]
# Below this temperature, scaling would overflow float32 logits: the request is greedy (an argmax).
GREEDY_TEMPERATURE = 1e-5
MAX_CONSTRAINT_BYTES = 64 * 1024  # a json_schema, regex or grammar; all choices together
MAX_CHOICES = 1024
MAX_N = 16  # parallel samples of one prompt (SamplingParams.n)
_SAMPLE_SEED_STEP = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads the derived seeds apart
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """A structured-output constraint; `kind` is also the request field it came from."""

    kind: str  # one of CONSTRAINT_KINDS
    spec: str | tuple[str, ...] = ""  # the schema / regex / grammar text, or the choices

    def validate(self) -> None:
        _check(self.kind in CONSTRAINT_KINDS, "constraint", f"unknown kind {self.kind!r}")
        if self.kind == "choice":
            _check(
                isinstance(self.spec, tuple) and all(isinstance(c, str) for c in self.spec),
                "choice",
                "must be a list of strings",
            )
            _check(
                0 < len(self.spec) <= MAX_CHOICES,
                "choice",
                f"must list 1 to {MAX_CHOICES} strings, got {len(self.spec)}",
            )
            size = sum(len(c.encode()) for c in self.spec)
        else:
            _check(isinstance(self.spec, str), self.kind, "must be a string")
            _check(bool(self.spec) or self.kind == "json_object", self.kind, "must not be empty")
            size = len(self.spec.encode())
        _check(size <= MAX_CONSTRAINT_BYTES, self.kind, f"is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 (below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # in (0, 1]; 1 disables
    min_p: float = 0.0  # in [0, 1]; 0 disables
    repetition_penalty: float = 1.0  # > 0; 1 disables (CTRL-style, on prompt and output tokens)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation (the eos id always does)
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized output text
    ignore_eos: bool = False  # keep going past eos (benchmarks)
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: plus top-n alternatives
    skip_special_tokens: bool = True  # for the detokenized text used by stop strings
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted by id
    constraint: Constraint | None = None  # structured output (JSON schema, regex, choice, grammar)
    n: int = 1  # parallel samples of the prompt, sharing its prefill; 1 to MAX_N
    # None: none; 0: each prompt token's logprob; n: plus the top-n alternatives (vLLM's name). The first
    # prompt token has none. Computed during prefill; with it, max_new_tokens may be 0 (scoring only).
    prompt_logprobs: int | None = None
    min_tokens: int = 0  # eos and stop ids are masked, stop strings unchecked, until this many are out

    @property
    def greedy(self) -> bool:
        """Greedy decoding: the one definition the sampler and everyone else use."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, max_new_tokens_cap: int, max_logprobs: int, vocab_size: int) -> None:
        least = 0 if self.prompt_logprobs is not None else 1  # 0: a prompt scored, nothing generated
        _check(
            isinstance(self.max_new_tokens, int) and least <= self.max_new_tokens <= max_new_tokens_cap,
            "max_new_tokens",
            f"must be an integer in [{least}, {max_new_tokens_cap}], got {self.max_new_tokens!r}"
            + ("" if least == 0 else " (0 only with prompt_logprobs)"),
        )
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_new_tokens,
            "min_tokens",
            f"must be an integer in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens!r}",
        )
        _check(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            "seed",
            f"must be in [0, 2^63), got {self.seed!r}",
        )
        _check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
        )
        bad_ids = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        _check(not bad_ids, "stop_token_ids", f"ids outside the vocabulary [0, {vocab_size}): {bad_ids[:5]}")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
        )
        _check(
            all(0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
            "stop",
            f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
            "logprobs",
            f"must be in [0, {max_logprobs}], got {self.logprobs!r}",
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= max_logprobs,
            "prompt_logprobs",
            f"must be in [0, {max_logprobs}], got {self.prompt_logprobs!r}",
        )
        _check(
            isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}], got {self.n!r}"
        )
        self._validate_logit_bias(vocab_size)
        if self.constraint is not None:
            self.constraint.validate()

    def _validate_logit_bias(self, vocab_size: int) -> None:
        bias = self.logit_bias
        _check(
            len(bias) <= MAX_LOGIT_BIAS_ENTRIES,
            "logit_bias",
            f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}",
        )
        ids = [t for t, _ in bias]
        _check(len(set(ids)) == len(ids), "logit_bias", "each token id at most once")
        bad_ids = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
        _check(not bad_ids, "logit_bias", f"token ids outside the vocabulary [0, {vocab_size}): {bad_ids[:5]}")
        bad = [(t, v) for t, v in bias if not (_finite(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS)]
        _check(not bad, "logit_bias", f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bad[:5]}")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: sample 0 uses the seed itself (so n=1
    is unchanged), sample i uses (seed + i * 0x9E3779B97F4A7C15) mod 2^63. Same seed and n, same samples."""
    return (seed + index * _SAMPLE_SEED_STEP) % 2**63


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field_name, message)
