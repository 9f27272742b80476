"""Grammar-constrained requests under n-gram speculation: each drafted position is masked by the grammar's
state after the drafts before it, the matcher is rolled back after the masks (a rejected draft never advances
it), and the output equals speculation off (fp32) and matches the constraint, greedy and sampled."""

from __future__ import annotations

import re

from tokenwire.engine.request.sampling_params import Constraint, SamplingParams
from transformers import AutoTokenizer

from tests.reference import EXACT
from tests.test_engine import assert_all_blocks_free
from tests.test_speculative import make_engine

WORDS = ("cat", "dog", "owl")
REGEX = "( (cat|dog|owl))+"


def _prompts(tokenizer) -> list[list[int]]:
    """Word sequences that repeat themselves: what the model writes next was seen, and the grammar allows it."""
    texts = [" cat dog owl cat dog owl cat dog", " owl owl cat owl owl cat owl", " dog cat dog cat dog cat"]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def test_constrained_drafts_match_speculation_off_and_the_grammar(echo_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(echo_llama_dir)
    prompts = _prompts(tokenizer)
    constraint = Constraint("regex", REGEX)
    params = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, constraint=constraint)] * 3
    params += [
        SamplingParams(max_new_tokens=24, temperature=0.8, seed=i, ignore_eos=True, constraint=constraint)
        for i in range(3)
    ]
    prompts = prompts + prompts
    spec, off = make_engine(echo_llama_dir), make_engine(echo_llama_dir, "off")
    got = spec.generate(prompt_token_ids=prompts, params=params)
    stats = spec.stats()
    assert 0 < stats.num_accepted_draft_tokens <= stats.num_draft_tokens
    if EXACT:
        assert got == off.generate(prompt_token_ids=prompts, params=params)
    for ids in got:
        assert len(ids) == 24 and re.fullmatch(REGEX, tokenizer.decode(ids)), tokenizer.decode(ids)
    assert_all_blocks_free(spec)


def test_a_rejected_draft_leaves_the_matcher_where_it_was(echo_llama_dir):
    """A draft the grammar refuses ("!" after a word, the prompt's own continuation) is turned away at its
    position, and generation goes on from the matcher's state before it."""
    tokenizer = AutoTokenizer.from_pretrained(echo_llama_dir)
    prompt = tokenizer.encode(" cat dog! cat dog! cat dog", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, constraint=Constraint("regex", REGEX))
    spec, off = make_engine(echo_llama_dir), make_engine(echo_llama_dir, "off")
    got = spec.generate(prompt_token_ids=[prompt], params=params)[0]
    assert spec.stats().num_draft_tokens > spec.stats().num_accepted_draft_tokens  # some drafts refused
    assert re.fullmatch(REGEX, tokenizer.decode(got)), tokenizer.decode(got)
    if EXACT:
        assert got == off.generate(prompt_token_ids=[prompt], params=params)[0]
    assert_all_blocks_free(spec)
