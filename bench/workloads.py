"""Benchmark workloads: the standard named ones (P1, longprompt, sharedprefix, multiprefix, online) and
custom ones built from flags (`--prompt`, `--prompts FILE`, `--input-len`, `--input-len-range`,
`--shared-prefix-len`, `--num-prefixes`).

A workload is a list of prompts, each given either as token ids (P1 is *defined* in ids: random ids are
not text) or as text. Text prompts are tokenized before the timed region only with `--pretok`; the
benchmark driver decides that, the workload only says what each prompt is.

Synthetic text is made of random lowercase words taken from the model's own vocabulary (each one
token with its leading space), so N words are about N tokens and every prompt starts differently:
no accidental prefix sharing.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

# Named workloads: their defaults, which explicit flags override.
STANDARD: dict[str, dict] = {
    # ../shared/BASELINES.md: 32 prompts of 32-255 random ids, 64 new tokens, greedy, EOS ignored.
    "P1": dict(num_requests=32, max_new_tokens=64, ignore_eos=True, input_len_range=(32, 255), as_ids=True),
    # Structured output: P1 with one JSON schema per request (bench/structured.py), against P1 unconstrained.
    "json": dict(num_requests=32, max_new_tokens=64, ignore_eos=True, input_len_range=(32, 255), as_ids=True),
    # Tokenization and prefill in isolation: 64 prompts of ~2,000 words, one new token each.
    "longprompt": dict(num_requests=64, max_new_tokens=1, ignore_eos=True, words=2000),
    # Prefix-cache benefit: one 512-token system prompt shared by all, short unique questions after it.
    "sharedprefix": dict(
        num_requests=32, max_new_tokens=16, ignore_eos=True, shared_prefix_len=512, input_len_range=(16, 48)
    ),
    # Replicas: 8 distinct 512-token system prompts, 16 requests each (interleaved), short completions; run
    # by the `replicas` mode under round robin, prefix affinity and one replica (bench/replicas.py).
    "multiprefix": dict(
        num_requests=128,
        max_new_tokens=16,
        ignore_eos=True,
        shared_prefix_len=512,
        num_prefixes=8,
        input_len_range=(16, 48),
    ),
    # Speculative decoding: each prompt asks to repeat a ~300-word passage and starts the copy, so the answer
    # is seen before (n-gram drafts pay); run with speculation off and on, one stream (bench/speculative.py).
    "copy": dict(num_requests=8, max_new_tokens=128, ignore_eos=True, copy_words=300),
    # Serving: 200 requests arriving faster than the engine completes them on a 2-core CPU.
    "online": dict(num_requests=200, max_new_tokens=64, ignore_eos=True, input_len_range=(32, 255), request_rate=4.0),
}


@dataclass(frozen=True)
class BenchRequest:
    text: str | None  # the prompt as text (None for id-defined prompts)
    token_ids: list[int] | None  # the prompt as ids (id-defined, or tokenized by --pretok)
    max_new_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    name: str  # a key of STANDARD, or "custom"
    num_requests: int = 32
    max_new_tokens: int = 64
    ignore_eos: bool = False
    input_len: int | None = None  # fixed synthetic prompt length, tokens
    input_len_range: tuple[int, int] | None = None  # synthetic lengths drawn uniformly, inclusive
    shared_prefix_len: int = 0  # tokens of a system prompt shared by every request
    num_prefixes: int = 1  # distinct system prompts; request i gets prefix i % num_prefixes
    words: int | None = None  # synthetic prompts of this many words (longprompt)
    copy_words: int = 0  # > 0: each prompt asks to repeat a passage of this many words (copy)
    as_ids: bool = False  # synthetic prompts as random token ids instead of text
    prompt: str | None = None  # one prompt, repeated num_requests times
    prompts_file: str | None = None  # one prompt per line, or JSONL with a "prompt" field
    request_rate: float = math.inf  # online mode: Poisson arrivals per second (inf: all at once)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def make_spec(name: str | None, **overrides) -> WorkloadSpec:
    """The named workload's defaults with every non-None override applied."""
    given = {k: v for k, v in overrides.items() if v is not None}
    custom = any(k in given for k in ("prompt", "prompts_file", "input_len", "input_len_range"))
    name = name or ("custom" if custom else "P1")
    if name not in STANDARD and name != "custom":
        raise ValueError(f"workload: unknown {name!r}; choose from {', '.join([*STANDARD, 'custom'])}")
    base = dict(STANDARD.get(name, {}))
    if "input_len" in given:
        base.pop("input_len_range", None)
    if given.get("prompt") is not None and "num_requests" not in given:
        base["num_requests"] = 1
    return WorkloadSpec(name=name, **{**base, **given})


def build_requests(spec: WorkloadSpec, tokenizer, variant: int = 0) -> list[BenchRequest]:
    """The workload's prompts. `tokenizer` gives the vocabulary and calibrates text lengths.

    Lengths depend on the seed only; content on (seed, variant), so every run of a benchmark can get
    prompts of identical shape that share no prefix with another run's (warm-up runs included)."""
    if spec.prompt is not None:
        return [BenchRequest(spec.prompt, None, spec.max_new_tokens)] * spec.num_requests
    if spec.prompts_file is not None:
        texts = read_prompts(spec.prompts_file)
        return [BenchRequest(texts[i % len(texts)], None, spec.max_new_tokens) for i in range(spec.num_requests)]
    if spec.num_prefixes < 1:
        raise ValueError(f"num_prefixes: must be >= 1, got {spec.num_prefixes}")
    lengths = prompt_lengths(spec, random.Random(spec.seed))
    rng = random.Random(f"{spec.seed}:{variant}")
    # Every prefix is drawn before any body, so one prefix draws exactly what sharedprefix always drew.
    if spec.as_ids:
        pool = usable_ids(tokenizer)
        prefixes = [[rng.choice(pool) for _ in range(spec.shared_prefix_len)] for _ in range(spec.num_prefixes)]
        return [
            BenchRequest(
                None, prefixes[i % spec.num_prefixes] + [rng.choice(pool) for _ in range(n)], spec.max_new_tokens
            )
            for i, n in enumerate(lengths)
        ]
    words = word_pool(tokenizer)
    if spec.copy_words > 0:
        return [
            BenchRequest(copy_prompt(spec.copy_words, words, rng), None, spec.max_new_tokens)
            for _ in range(spec.num_requests)
        ]
    prefixes = [shared_prefix_text(spec.shared_prefix_len, tokenizer, words, rng) for _ in range(spec.num_prefixes)]
    texts = []
    for i, n in enumerate(lengths):
        prefix = prefixes[i % spec.num_prefixes]
        body = " ".join(rng.choice(words) for _ in range(n))
        texts.append(f"{prefix}\n\nRequest {i}: {body}" if prefix else body.capitalize())
    return [BenchRequest(t, None, spec.max_new_tokens) for t in texts]


def prompt_lengths(spec: WorkloadSpec, rng: random.Random) -> list[int]:
    """Per-request lengths drawn first, so P1's equal ../shared/tools/p1_ceiling.py's p1_prompt_lengths."""
    if spec.words is not None:
        return [spec.words] * spec.num_requests
    if spec.input_len is not None:
        return [spec.input_len] * spec.num_requests
    lo, hi = spec.input_len_range or (32, 255)
    if not 1 <= lo <= hi:
        raise ValueError(f"input_len_range: need 1 <= lo <= hi, got {lo}, {hi}")
    return [rng.randint(lo, hi) for _ in range(spec.num_requests)]


def p1_prompt_lengths(n: int = 32, lo: int = 32, hi: int = 255, seed: int = 0) -> list[int]:
    """Exactly p1_ceiling.py's P1 prompt lengths (the ceiling is measured for these)."""
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def usable_ids(tokenizer) -> list[int]:
    """Every id of the vocabulary but special and added tokens (so random prompts stay ordinary)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [i for i in range(len(tokenizer)) if i not in special]


def word_pool(tokenizer) -> list[str]:
    """Lowercase words that are single tokens with a leading space (byte-level BPE or SentencePiece)."""
    words = sorted(
        {
            tok[1:]
            for tok in tokenizer.get_vocab()
            if tok[:1] in ("Ġ", "▁") and tok[1:].isalpha() and tok[1:].islower() and 3 <= len(tok) - 1 <= 10
        }
    )
    if len(words) < 100:  # an odd vocabulary: fall back to plain words (a few tokens each)
        words = [
            f"{a}{b}"
            for a in ("data", "model", "token", "cache", "batch")
            for b in ("set", "run", "way", "list", "map", "line", "time", "work", "base", "flow")
        ] * 2
    return words


def shared_prefix_text(num_tokens: int, tokenizer, words: list[str], rng: random.Random) -> str:
    """A system prompt of `num_tokens` tokens: random words, cut at a token boundary."""
    if num_tokens <= 0:
        return ""
    text = "You are a helpful assistant. " + " ".join(rng.choice(words) for _ in range(num_tokens))
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    return tokenizer.decode(ids)


def copy_prompt(num_words: int, words: list[str], rng: random.Random) -> str:
    """A request to repeat a passage of random words, with the copy's first words already given: what the
    model should write next was seen in the prompt (quoting, rewrites, RAG answers)."""
    passage = [rng.choice(words) for _ in range(num_words)]
    start = " ".join(passage[:8])
    return f"Repeat the following text exactly, word for word.\n\nText: {' '.join(passage)}\n\nRepeated: {start}"


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL objects with a "prompt" field, or one plain-text prompt per line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts: {path} holds no prompt")
    if all(line.lstrip().startswith("{") for line in lines):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def pretokenize(requests: list[BenchRequest], tokenizer) -> list[BenchRequest]:
    """--pretok: text prompts become ids before the timed region, encoded as the engine would."""
    return [r if r.token_ids is not None else replace(r, token_ids=tokenizer.encode(r.text)) for r in requests]


def warmup_requests(
    requests: list[BenchRequest], max_requests: int, max_prompt_tokens: int, max_new_tokens: int
) -> list[BenchRequest]:
    """A smaller copy of a run for warm-up: enough to allocate and pick every kernel shape the timed
    runs meet (prefill chunks, the decode batch), without repeating a long workload in full."""

    def trim(r: BenchRequest) -> BenchRequest:
        return replace(
            r,
            text=None if r.text is None else " ".join(r.text.split(" ")[:max_prompt_tokens]),
            token_ids=None if r.token_ids is None else r.token_ids[:max_prompt_tokens],
            max_new_tokens=min(r.max_new_tokens, max_new_tokens),
        )

    return [trim(r) for r in requests[:max_requests]]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: Poisson arrivals (inf: all at once)."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"request_rate: must be > 0, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
