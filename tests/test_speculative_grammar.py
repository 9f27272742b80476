"""Grammar-constrained requests under n-gram speculation: each drafted position is masked by the grammar's
state after the drafts before it, the matcher is rolled back after the masks (a rejected draft never advances
it), and the output equals speculation off (fp32) and matches the constraint, greedy and sampled."""

from __future__ import annotations

from tokenwire.engine.request.grammar import fill_bitmasks, fill_draft_bitmasks
from tokenwire.engine.request.sampling_params import Constraint, SamplingParams
from transformers import AutoTokenizer

from tests.reference import EXACT
from tests.test_engine import assert_all_blocks_free
from tests.test_speculative import make_engine

WORDS = ("cat", "dog", "owl")
REGEX = "( (cat|dog|owl))+"


def _within_grammar(text: str) -> bool:
    """`text` is a prefix of a REGEX match: words of WORDS, each after a space, the last possibly cut short
    by max_new_tokens (eos, which ignore_eos repeats once the grammar may end, is skipped)."""
    words = text.split(" ")
    return words[0] == "" and all(w in WORDS for w in words[1:-1]) and any(w.startswith(words[-1]) for w in WORDS)


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
        assert len(ids) == 24 and _within_grammar(tokenizer.decode(ids, skip_special_tokens=True))
    assert_all_blocks_free(spec)


def test_draft_masks_follow_the_drafts_and_leave_the_matcher_where_it_was(echo_llama_dir):
    """Row d's mask is the grammar's after the first d drafts; a draft it refuses ("!" after a word) ends the
    walk there (later rows repeat that mask, so the draft is rejected at its position); and the matcher is
    rolled back: its next mask is row 0's, and it accepts the first draft as if none had been tried."""
    engine = make_engine(echo_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(echo_llama_dir)
    cat, dog, bang = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (" cat", " dog", "!"))
    vocab = engine.runner.vocab_size
    matcher = engine.grammars.matcher(Constraint("regex", REGEX))

    def allows(mask, token: int) -> bool:
        return bool((int(mask[token // 32]) >> (token % 32)) & 1)

    masks = fill_draft_bitmasks(matcher, (cat, bang, dog), vocab)
    assert masks.shape[0] == 4
    assert allows(masks[0], cat) and allows(masks[0], dog) and not allows(masks[0], bang)
    assert allows(masks[1], dog) and not allows(masks[1], bang)  # after " cat": another word, never "!"
    assert (masks[2] == masks[1]).all() and (masks[3] == masks[1]).all()  # nothing past the refused draft
    assert (fill_bitmasks([matcher], vocab)[0] == masks[0]).all()  # rolled back
    assert (fill_draft_bitmasks(matcher, (cat, dog), vocab) == masks[[0, 1, 1]]).all()
    matcher.accept(cat)  # the matcher moves only with kept tokens
    assert (fill_bitmasks([matcher], vocab)[0] == masks[1]).all()
