"""The grammar sandbox's child process: untrusted constraints are converted and compiled here, never in
a serving process (grammar_sandbox.py starts and restarts it).

A constraint can crash llguidance's compile (a GBNF of a few thousand chained rules overflows its stack:
signal 11), hold the GIL for seconds (`gbnf_to_lark` over 32 KB of whitespace) or grow without bound; here
that costs only this process, which its parent kills past `--max-grammar-compile-s` and restarts. The
child answers each constraint with the llguidance grammar text it converted to and proved to compile
against the tokenizer, or with the error naming its field. Run as
`python -m tokenwire.engine.request.grammar_worker READ_FD WRITE_FD MAX_MIB`: the first message on
READ_FD is the HF tokenizer (pickled); EOF on it (the parent is gone) ends the child.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
from multiprocessing.connection import Connection

import llguidance
import llguidance.gbnf_to_lark
import llguidance.hf
from tokenwire.engine.request.sampling_params import Constraint
from tokenwire.serving.errors import InvalidRequestError, bounded

# Compact JSON (no free whitespace): a small model otherwise pads objects with newlines and spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}
_MIB = 1 << 20


def to_grammar(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar; InvalidRequestError (naming its field) for text that cannot
    be one. Untrusted input: call it only in this child (the GBNF conversion can hold the GIL for seconds)."""
    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except (ValueError, RecursionError) as exc:
                raise InvalidRequestError(kind, f"is not valid JSON: {str(exc)[:200]}") from None
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
    except Exception as exc:  # the library's parse errors (ValueError, RecursionError, its own) name the problem
        raise InvalidRequestError(kind, bounded(str(exc) or type(exc).__name__)) from None


def vet(tokenizer: llguidance.LLTokenizer, constraint: Constraint) -> tuple:
    """("ok", grammar text) once it compiled here and gave its first token mask, else ("refused", field,
    message)."""
    try:
        grammar = to_grammar(constraint)
        matcher = _compile_on_a_thread(tokenizer, grammar)
    except InvalidRequestError as exc:
        return ("refused", exc.field, str(exc).removeprefix(f"{exc.field}: "))
    except MemoryError:
        return ("refused", constraint.kind, "needs more memory than --max-grammar-compile-mib allows")
    if not matcher.is_error():
        matcher.compute_bitmask()  # the first mask: some grammars fail only here (a $ref that never ends)
    if matcher.is_error():
        return ("refused", constraint.kind, bounded(matcher.get_error().split("\n")[0]))
    return ("ok", grammar)


def _compile_on_a_thread(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """Compiled on a thread of the default stack size, as the serving process compiles it (GrammarCompiler's
    pool), so a grammar that overflows that stack crashes here first."""
    result: list = []

    def compile_it() -> None:
        try:
            result.append(llguidance.LLMatcher(tokenizer, grammar, log_level=0))
        except BaseException as exc:  # re-raised on the caller's thread
            result.append(exc)

    thread = threading.Thread(target=compile_it, name="grammar-compile")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _limit_memory(max_mib: int) -> None:
    """The address space may grow by `max_mib` past what the loaded child holds: an allocation beyond
    fails (MemoryError, or an abort in native code), not the machine."""
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * resource.getpagesize()
    limit = held + max_mib * _MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(read_fd: int, write_fd: int, max_mib: int) -> None:
    commands, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        hf_tokenizer, vocab_size, eos = commands.recv()
        tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
        if max_mib > 0 and sys.platform.startswith("linux"):
            _limit_memory(max_mib)
        replies.send(("ready",))
        while True:
            replies.send(vet(tokenizer, commands.recv()))
    except (EOFError, OSError):  # the parent is gone or closed us
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
