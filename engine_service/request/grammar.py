"""Structured output: constraints compiled into grammars once, and one matcher per constrained request.

llguidance does the grammar work (JSON schema, regex, choice, Lark/GBNF grammars); it was chosen over
xgrammar for its lower per-step mask cost at batch 32 on CPU and its dependency-free wheel (README,
"Structured output"). A constraint is compiled once per (constraint, tokenizer fingerprint): the
compiled grammar is a matcher in its initial state kept in an LRU cache, and each request gets a cheap
copy of it. An untrusted constraint is first converted and compiled in the grammar sandbox (child
processes bounded by `max_grammar_compile_s` and `max_grammar_compile_mib`: a crash or stall there costs
only that request); only the grammar text it proved compiles is then compiled here, in request
preparation (a worker thread, never the engine loop). The sampler asks `fill_bitmasks` for the rows'
allowed tokens and the output processor advances each matcher with the token it kept. Plain Python and
numpy: no torch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
from tokenwire.engine.request.grammar_sandbox import GrammarSandbox
from tokenwire.engine.request.sampling_params import Constraint
from tokenwire.serving.errors import InvalidRequestError, bounded

_CACHE_SIZE = 256
COMPILE_PROCESSES = 2  # constraints compiling at once: the grammar sandbox's children


class GrammarError(RuntimeError):
    """A matcher refused a token or gave up mid-generation ("Too many items"): the fault of one request's
    constraint, which fails alone (INVALID_ARGUMENT naming the constraint's field)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class GrammarMatcher:
    """One request's position in its grammar; advanced with each token the request keeps."""

    def __init__(self, matcher: llguidance.LLMatcher, field: str = "grammar"):
        self._matcher = matcher
        self.field = field  # the constraint's request field, which a failure names

    def accept(self, token_id: int) -> None:
        m = self._matcher
        if m.is_error():
            raise GrammarError(f"the constraint's matcher gave up mid-generation: {bounded(m.get_error())}", self.field)
        if m.is_stopped():  # only eos was allowed (ignore_eos keeps generating it): nothing to match
            return
        if not m.consume_token(token_id):
            raise GrammarError(f"grammar matcher rejected token {token_id}: {bounded(m.get_error())}", self.field)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing but eos."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Constraints -> matchers for one tokenizer. Thread-safe; the sandbox's children (each builds the
    tokenizer's grammar view, ~1 s) and this process's view start on the first constrained request, so
    engines that never see one never pay for them."""

    def __init__(
        self,
        tokenizer,
        fingerprint: str,
        vocab_size: int,
        eos_token_ids,
        max_compile_s: float,
        max_compile_mib: int = 1024,
    ):
        self._hf_tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers every column
        self._eos = sorted(eos_token_ids)
        self.max_compile_s = max_compile_s
        self.sandbox = GrammarSandbox(
            tokenizer, vocab_size, self._eos, max_compile_s, max_compile_mib, size=COMPILE_PROCESSES
        )
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0  # cache misses compiled
        self.compile_s = 0.0  # wall time spent compiling them

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher for `constraint`; InvalidRequestError (naming its field) if it does not compile
        within the sandbox's bounds."""
        return GrammarMatcher(self.compiled(constraint).deep_copy(), constraint.kind)

    def compiled(self, constraint: Constraint) -> llguidance.LLMatcher:
        key = (constraint.kind, constraint.spec, self.fingerprint)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        start = time.perf_counter()
        grammar = self.sandbox.vet(constraint)  # converted and compiled in a child: safe to compile here
        template = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(constraint.kind, bounded(template.get_error()))
        with self._lock:
            self.compiles += 1
            self.compile_s += time.perf_counter() - start
            self._cache[key] = template
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def close(self) -> None:
        self.sandbox.close()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._tokenizer


_executor: list[llguidance.LLExecutor] = []  # one, made on the first constrained step


def fill_draft_bitmasks(matcher: GrammarMatcher, drafts: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """fill_bitmasks' rows for a decode and its drafts: row d is the mask after drafts[:d]. The matcher
    consumes the drafts its grammar allows, for the masks, and is rolled back: it ends where it began (the
    tokens kept are accepted later, as any). Rows past the first refused draft repeat the mask before it:
    that draft is then rejected there, so their tokens are never kept."""
    m = matcher._matcher
    allowed = 0 if m.is_stopped() or m.is_error() else m.validate_tokens(list(drafts))
    rows = []
    for d in range(allowed + 1):
        rows.append(fill_bitmasks([matcher], vocab_size)[0])
        if d < allowed and not m.consume_token(drafts[d]):
            raise GrammarError(f"grammar matcher rejected draft {drafts[d]} it had validated", matcher.field)
    m.rollback(allowed)
    rows += [rows[-1]] * (len(drafts) - allowed)
    return np.stack(rows)


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
