"""Structured output on the real SmolLM2: JSON schema, regex, choice and grammar constraints hold on every
sample, leave unconstrained neighbours untouched, survive preemption, and bad constraints are refused
naming their field."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.request.grammar import GrammarCompiler, GrammarError
from tokenwire.engine.request.sampling_params import MAX_CHOICES, MAX_CONSTRAINT_BYTES, Constraint, SamplingParams
from tokenwire.serving.errors import InvalidRequestError

from tests.reference import ENGINE_DTYPE, EXACT

_WORD = {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"}
# Nested object, enum, integer range, array with minItems, required fields; strings bounded so that
# every sample completes well within max_new_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": _WORD,
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": _WORD, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": _WORD, "minItems": 2, "maxItems": 2},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
ISO_DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
LABELS = ("positive", "negative", "neutral")


def make_engine(model_dir, num_blocks=256, prefix=True):
    return LLMEngine(
        EngineConfig(
            model=model_dir,
            device="cpu",
            dtype=ENGINE_DTYPE,
            cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_cache=prefix),
            scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
        )
    )


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return make_engine(smollm2_dir)


def text_of(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_json_schema_samples_all_validate(smol):
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(max_new_tokens=80, temperature=1.0, seed=i, constraint=constraint) for i in range(30)]
    outputs = smol.generate(["A user record as JSON:"] * 30, params=params)
    for ids in outputs:
        assert ids[-1] in smol.runner.eos_token_ids  # the grammar completed, then only eos was allowed
        jsonschema.validate(json.loads(text_of(smol, ids)), SCHEMA)


def test_regex_choice_and_unconstrained_neighbours(smol):
    """One batch mixing unconstrained, regex and choice requests. ignore_eos keeps every request to the
    same length with or without constraints, so both runs have the same batch at every step."""
    plain = [
        SamplingParams(max_new_tokens=16, temperature=t, seed=i, ignore_eos=True)
        for i, t in enumerate((0.0, 0.0, 1.0, 1.0))
    ]
    regex = [
        SamplingParams(
            max_new_tokens=16, temperature=1.0, seed=10 + i, ignore_eos=True, constraint=Constraint("regex", ISO_DATE)
        )
        for i in range(6)
    ]
    choice = [
        SamplingParams(
            max_new_tokens=16, temperature=1.0, seed=20 + i, ignore_eos=True, constraint=Constraint("choice", LABELS)
        )
        for i in range(6)
    ]
    unconstrained = [
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=p.seed, ignore_eos=True) for p in regex + choice
    ]
    prompts = ["The date today is", "Review: great phone, love it. Sentiment:"] * 8
    mixed = smol.generate(prompts, params=plain + regex + choice)
    reference = smol.generate(prompts, params=plain + unconstrained)
    assert mixed[:4] == reference[:4]
    eos = smol.runner.eos_token_ids
    for ids in mixed[4:]:
        end = next(i for i, t in enumerate(ids) if t in eos)
        assert all(t in eos for t in ids[end:])  # a finished grammar permits only eos
    assert all(re.fullmatch(ISO_DATE, text_of(smol, ids)) for ids in mixed[4:10])
    assert all(text_of(smol, ids) in LABELS for ids in mixed[10:])


def test_json_object_and_grammar(smol):
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "x=" NUMBER\nNUMBER: /[0-9]{1,3}/'
    params = [
        SamplingParams(max_new_tokens=48, temperature=1.0, seed=1, constraint=Constraint("json_object")),
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=2, constraint=Constraint("grammar", gbnf)),
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, constraint=Constraint("grammar", lark)),
    ]
    obj, answer, number = (text_of(smol, ids) for ids in smol.generate(["Some JSON:"] * 3, params=params))
    assert isinstance(json.loads(obj), dict)
    assert answer in ("The answer is yes.", "The answer is no.")
    assert re.fullmatch(r"x=[0-9]{1,3}", number)


def test_preempted_constrained_request_matches_unpreempted(smollm2_dir, smol):
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(max_new_tokens=40, temperature=0.0, constraint=constraint)
    prompts = [f"User number {i} as JSON:" for i in range(6)]
    tight = make_engine(smollm2_dir, num_blocks=12, prefix=False)  # 192 token slots for ~6 x 45
    preempted, unpreempted = tight.generate(prompts, params=params), smol.generate(prompts, params=params)
    assert tight.stats().num_preemptions > 0
    if EXACT:
        assert preempted == unpreempted
    else:  # bf16 rounds differently at each batch shape: the grammar state must still survive recompute
        for ids in preempted:
            if ids[-1] in tight.runner.eos_token_ids:  # completed (else cut at max_new_tokens)
                jsonschema.validate(json.loads(text_of(tight, ids)), SCHEMA)
            else:
                assert len(ids) == params.max_new_tokens


def test_compiled_once_per_constraint(smol):
    grammars = smol.grammars
    constraint = Constraint("regex", "[a-z]{3}-compile-once")
    before = grammars.compiles
    first = grammars.compiled(constraint)
    assert grammars.compiled(constraint) is first and grammars.compiles == before + 1
    assert smol.prepare("x", params=SamplingParams(constraint=constraint)).grammar is not None
    assert grammars.compiles == before + 1


@pytest.mark.parametrize(
    "constraint, field, message",
    [
        (Constraint("json_schema", "{not json"), "json_schema", "not valid JSON"),
        (Constraint("json_schema", '{"type": "no-such-type"}'), "json_schema", "no-such-type"),
        (Constraint("json_schema", "[1, 2]"), "json_schema", "JSON object"),
        (Constraint("regex", "(unclosed"), "regex", ""),
        (Constraint("choice", ()), "choice", "1 to 1024"),
        (Constraint("choice", tuple(f"c{i}" for i in range(MAX_CHOICES + 1))), "choice", "1 to 1024"),
        (Constraint("grammar", 'root ::= "a" (('), "grammar", ""),
        (Constraint("grammar", "start: undefined_rule"), "grammar", "undefined_rule"),
        (Constraint("json_schema", json.dumps({"description": "x" * 70_000})), "json_schema", "65536"),
        (Constraint("regex", ""), "regex", "empty"),
    ],
)
def test_bad_constraints_name_their_field(smol, constraint, field, message):
    with pytest.raises(InvalidRequestError) as info:
        smol.prepare("x", params=SamplingParams(constraint=constraint))
    assert info.value.field == field and message in str(info.value)


def chained_rules(count: int, gbnf: bool) -> str:
    """A grammar of `count` rules, each the next one's prefix: at 3,000 (48-58 KB) llguidance's compile
    overflows its stack (signal 11), and converting the GBNF form to Lark holds the GIL ~12 s."""
    define = "::=" if gbnf else ":"
    head = "root ::= r0\n" if gbnf else "start: r0\n"
    return head + "".join(f'r{i} {define} "a" r{i + 1}\n' for i in range(count)) + f'r{count} {define} "b"\n'


@pytest.fixture(scope="module")
def quick_compiler(smol):
    """A compiler with a 1 s limit (the engine's own allows 10 s)."""
    compiler = GrammarCompiler(
        smol.tokenizer, smol.tokenizer_fingerprint, smol.vocab_size, smol.runner.eos_token_ids, max_compile_s=1.0
    )
    yield compiler
    compiler.close()


def test_grammar_that_crashes_the_compiler_is_refused_and_the_compiler_restarts(quick_compiler):
    grammar = chained_rules(3000, gbnf=False)
    assert len(grammar.encode()) < MAX_CONSTRAINT_BYTES
    restarts = quick_compiler.sandbox.restarts
    with pytest.raises(InvalidRequestError) as info:
        quick_compiler.matcher(Constraint("grammar", grammar))
    assert info.value.field == "grammar" and "crashed the grammar compiler (signal 11)" in str(info.value)
    assert quick_compiler.sandbox.restarts == restarts + 1
    assert quick_compiler.matcher(Constraint("regex", "[0-9]{3}-after-a-crash")) is not None


def test_slow_grammar_is_refused_while_a_neighbour_keeps_generating(smol, quick_compiler):
    """The GBNF conversion that held the serving process's GIL for seconds runs in a sandbox child, killed
    past the limit; meanwhile a neighbour's steps go on in this process."""
    grammar = chained_rules(3000, gbnf=True)
    verdict: list[BaseException] = []

    def compile_it() -> None:
        try:
            quick_compiler.matcher(Constraint("grammar", grammar))
        except BaseException as exc:
            verdict.append(exc)

    neighbour = smol.prepare("Count:", params=SamplingParams(max_new_tokens=4, temperature=0.0))
    smol.add(neighbour)
    compiling = threading.Thread(target=compile_it)
    compiling.start()
    tokens_while_compiling = 0
    while smol.has_unfinished():
        outs = smol.step()
        if compiling.is_alive():
            tokens_while_compiling += sum(len(out.new_token_ids) for out in outs)
    compiling.join(30)
    assert tokens_while_compiling == 4  # the whole neighbour ran while the grammar was compiling
    (error,) = verdict
    assert isinstance(error, InvalidRequestError) and error.field == "grammar"
    assert "max-grammar-compile-s" in str(error)


def test_grammar_failing_its_first_mask_is_refused_at_compile_time(smol):
    """A $ref that can never terminate compiles, then fails on the first mask: in the sandbox, not mid-step."""
    never_ends = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    with pytest.raises(InvalidRequestError) as info:
        smol.prepare("x", params=SamplingParams(constraint=Constraint("json_schema", json.dumps(never_ends))))
    assert info.value.field == "json_schema"


def test_matcher_error_fails_only_its_request(smol):
    constraint = Constraint("regex", "[0-9]+")
    broken = smol.prepare("Count:", params=SamplingParams(max_new_tokens=8, temperature=0.0, constraint=constraint))
    letter = smol.tokenizer.encode("a")[0]
    with pytest.raises(GrammarError):
        broken.grammar.accept(letter)
    healthy = smol.prepare("Count:", params=SamplingParams(max_new_tokens=8, temperature=0.0, constraint=constraint))
    smol.add(broken)
    smol.add(healthy)
    outputs = []
    while smol.has_unfinished():
        outputs += smol.step()
    ends = {out.request_id: out for out in outputs if out.finished}
    assert ends[broken.request_id].error is not None and "grammar" in ends[broken.request_id].error
    assert ends[broken.request_id].error_field == "regex"  # INVALID_ARGUMENT naming it, not INTERNAL
    assert ends[healthy.request_id].error is None
    assert re.fullmatch("[0-9]+", text_of(smol, healthy.output_token_ids))
