"""Structured output: constraints compiled into grammars once, and one matcher per constrained request.

llguidance does the grammar work (JSON schema, regex, choice, Lark/GBNF grammars); it was chosen over
xgrammar for its lower per-step mask cost at batch 32 on CPU and its dependency-free wheel (README,
"Structured output"). A constraint is compiled once per (constraint, tokenizer fingerprint): the
compiled grammar is a matcher in its initial state kept in an LRU cache, and each request gets a cheap
copy of it. Compilation runs in request preparation (a worker thread, never the engine loop), bounded
by `max_grammar_compile_s`. The sampler asks `fill_bitmasks` for the rows' allowed tokens and the
output processor advances each matcher with the token it kept. Plain Python and numpy: no torch.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance
import llguidance.gbnf_to_lark
import llguidance.hf
import numpy as np
from tokenwire.engine.request.sampling_params import Constraint
from tokenwire.serving.errors import InvalidRequestError

# Compact JSON (no free whitespace): a small model otherwise pads objects with newlines and spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_SIZE = 256
COMPILE_THREADS = 2  # constraints compiling at once, off the caller's thread (bounded by max_compile_s)


class GrammarError(RuntimeError):
    """A matcher refused a token or broke: the fault of one request, which fails alone (INTERNAL)."""


class GrammarMatcher:
    """One request's position in its grammar; advanced with each token the request keeps."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> None:
        m = self._matcher
        if m.is_error():
            raise GrammarError(f"grammar matcher failed: {m.get_error()}")
        if m.is_stopped():  # only eos was allowed (ignore_eos keeps generating it): nothing to match
            return
        if not m.consume_token(token_id):
            raise GrammarError(f"grammar matcher rejected token {token_id}: {m.get_error()}")

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing but eos."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Constraints -> matchers for one tokenizer. Thread-safe; the tokenizer's grammar view (~1 s to
    build) is made on the first constrained request, so engines that never see one never pay for it."""

    def __init__(self, tokenizer, fingerprint: str, vocab_size: int, eos_token_ids, max_compile_s: float):
        self._hf_tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers every column
        self._eos = sorted(eos_token_ids)
        self.max_compile_s = max_compile_s
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self.compiles = 0  # cache misses compiled
        self.compile_s = 0.0  # wall time spent compiling them

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher for `constraint`; InvalidRequestError (naming its field) if it does not compile
        or takes longer than max_compile_s."""
        return GrammarMatcher(self.compiled(constraint).deep_copy())

    def compiled(self, constraint: Constraint) -> llguidance.LLMatcher:
        key = (constraint.kind, constraint.spec, self.fingerprint)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        tokenizer = self._llg_tokenizer()
        grammar = _grammar(constraint)
        start = time.perf_counter()
        future = self._pool.submit(llguidance.LLMatcher, tokenizer, grammar, log_level=0)
        try:
            template = future.result(timeout=self.max_compile_s)
        except FutureTimeout:
            raise InvalidRequestError(
                constraint.kind, f"took longer than {self.max_compile_s:g} s to compile (--max-grammar-compile-s)"
            ) from None
        if template.is_error():
            raise InvalidRequestError(constraint.kind, template.get_error())
        with self._lock:
            self.compiles += 1
            self.compile_s += time.perf_counter() - start
            self._cache[key] = template
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._tokenizer


_executor: list[llguidance.LLExecutor] = []  # one, made on the first constrained step


def fill_bitmasks(matchers: list[GrammarMatcher], vocab_size: int) -> np.ndarray:
    """int32 [len(matchers), ceil(vocab_size / 32)]: bit j of row i set iff matchers[i] allows token j
    (`vocab_size` is the logits' width, so the mask covers every column). Engine loop only."""
    mask = np.empty((len(matchers), (vocab_size + 31) // 32), dtype=np.int32)
    if not _executor:
        _executor.append(llguidance.LLExecutor(1))
    _executor[0].unsafe_compute_mask_ptr(
        [(m._matcher, i) for i, m in enumerate(matchers)], mask.ctypes.data, mask.shape[1] * 4, mask.shape[0]
    )
    return mask


def check_parses(constraint: Constraint) -> None:
    """InvalidRequestError (naming the constraint's field) unless it converts to an llguidance grammar; the
    compile against the tokenizer, which can still refuse it, is left to whoever builds its matcher."""
    _grammar(constraint)


def _grammar(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar; InvalidRequestError for text that cannot be one."""
    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except ValueError as exc:
                raise InvalidRequestError(kind, f"is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(kind, "must be a JSON object (a JSON schema)")
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.any_to_lark(spec))
    except InvalidRequestError:
        raise
    except Exception as exc:  # the library's parse errors (ValueError and its own) name the problem
        raise InvalidRequestError(kind, str(exc)) from None
