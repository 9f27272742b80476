"""IncrementalDetokenizer: streamed deltas concatenate to the one-shot decode, however ids are split."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenwire.tokenizer.detokenizer import MAX_HELD_TOKENS, MAX_KEPT_IDS, IncrementalDetokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café déjà vu, naïve résumé, Ångström, façade, São Paulo, Zürich.",
    "机器学习是人工智能的一个分支。日本語のテキストも。한국어 문장입니다.",
    "Emoji: 🤗🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and text after",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n 4<|im_end|>",
    "Mixed 中文 and English with émojis 🎉 <|endoftext|> a literal \ufffd in the middle.",
]
SKIP = pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
_TINY_CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps.",
    "def main():\n    return 42\n",
    "café naïve résumé",
] * 10


def build_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-style SentencePiece BPE: Metaspace, <0xNN> byte fallback, a decoder that strips
    the first leading space. CJK and emoji are not in its vocabulary, so they become byte tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(_TINY_CORPUS, trainer)
    spec = json.loads(tokenizer.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def byte_fallback():
    return build_byte_fallback_tokenizer()


@pytest.fixture(scope="module", params=["smollm2", "byte_fallback"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def stream(tokenizer, chunks, skip, prompt_ids=()) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, prompt_ids=prompt_ids)
    return "".join(detokenizer.push(chunk) for chunk in chunks) + detokenizer.finish()


def corpus_ids(tokenizer) -> list[list[int]]:
    texts = CORPUS + ["<s>Hi</s> there <s> again"]  # the byte-fallback tokenizer's own special tokens
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts] + [
        tokenizer.encode(" ".join(texts), add_special_tokens=False)
    ]


def test_corpus_exercises_byte_fallback(byte_fallback):
    tokens = byte_fallback.convert_ids_to_tokens(byte_fallback.encode(CORPUS[2]))
    assert sum(t.startswith("<0x") for t in tokens) > 20


@SKIP
def test_every_split_point(tokenizer, skip):
    for ids in corpus_ids(tokenizer):
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        for cut in range(len(ids) + 1):
            assert stream(tokenizer, [ids[:cut], ids[cut:]], skip) == expected, (cut, ids)


@SKIP
def test_one_token_at_a_time(tokenizer, skip):
    for ids in corpus_ids(tokenizer):
        assert stream(tokenizer, [[i] for i in ids], skip) == tokenizer.decode(ids, skip_special_tokens=skip)


@SKIP
def test_random_partitions(tokenizer, skip):
    rng = random.Random(0)
    for ids in corpus_ids(tokenizer):
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(ids) + 1), k=min(len(ids) + 1, rng.randint(1, 8))))
            chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
            assert stream(tokenizer, chunks, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=30), data=st.data())
def test_any_text_any_split_any_prompt(smollm2, byte_fallback, text, data):
    for tokenizer in (smollm2, byte_fallback):
        ids = tokenizer.encode(text, add_special_tokens=False)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
        chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        skip = data.draw(st.booleans())
        assert stream(tokenizer, chunks, skip) == tokenizer.decode(ids, skip_special_tokens=skip)
        if "\ufffd" in tokenizer.decode(ids):
            # Either bytes missing from the vocabulary were dropped (not valid UTF-8) or the text has a
            # literal U+FFFD, which a prompt cut cannot tell from an incomplete character.
            continue
        k = data.draw(st.integers(0, len(ids)))
        streamed = stream(tokenizer, [ids[k:]], skip, prompt_ids=ids[:k])
        assert streamed == text_after_prompt(tokenizer, ids, k, skip)


def test_skipped_special_token_between_words_keeps_the_space(byte_fallback):
    # Decoding a window holding only a skipped token would lose the context of the Strip decoder.
    ids = byte_fallback.encode("Hello</s> world", add_special_tokens=False)
    assert byte_fallback.decode(ids, skip_special_tokens=True) == "Hello world"
    assert stream(byte_fallback, [[i] for i in ids], skip=True) == "Hello world"


def test_prompt_context_keeps_the_leading_space(byte_fallback):
    prompt = byte_fallback.encode("Hello", add_special_tokens=False)
    generated = byte_fallback.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    assert stream(byte_fallback, [generated], skip=True) == "world"  # alone, the decoder strips it
    assert stream(byte_fallback, [generated], skip=True, prompt_ids=prompt) == " world"


def text_after_prompt(tokenizer, ids, k, skip) -> str:
    """What streaming ids[k:] after the prompt ids[:k] must give: the text decode(ids) adds after its
    longest common prefix with the prompt's text. A prompt may end mid-character, and with byte
    fallback an incomplete character turns its whole run of byte tokens into U+FFFD, so the prompt's
    text is its best whole-character prefix among the last few cuts."""
    full_text = tokenizer.decode(ids, skip_special_tokens=skip)
    common = max(
        len(os.path.commonprefix([tokenizer.decode(ids[:j], skip_special_tokens=skip), full_text]))
        for j in range(max(k - 3, 0), k + 1)
    )
    return full_text[common:]


@SKIP
def test_prompt_split_points(tokenizer, skip):
    for ids in corpus_ids(tokenizer)[:-1]:  # the long concatenation would make this quadratic test slow
        for k in range(len(ids) + 1):
            streamed = stream(tokenizer, [[i] for i in ids[k:]], skip, prompt_ids=ids[:k])
            assert streamed == text_after_prompt(tokenizer, ids, k, skip), (k, ids)


def test_incomplete_character_is_held_back_then_flushed(smollm2):
    ids = smollm2.encode("🤗", add_special_tokens=False)
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(smollm2)
    assert detokenizer.push(ids[:1]) == ""
    assert detokenizer.num_pending_ids == 1
    assert detokenizer.finish() == smollm2.decode(ids[:1]) == "\ufffd"
    assert detokenizer.finish() == ""
    with pytest.raises(RuntimeError):
        detokenizer.push(ids[1:])


def test_invalid_bytes_are_not_held_forever(smollm2):
    # A lone UTF-8 continuation byte never completes: after MAX_HELD_TOKENS its U+FFFD is emitted.
    stray = smollm2.convert_tokens_to_ids("Ģ")  # byte-level BPE's symbol for byte 0x80
    assert smollm2.decode([stray]) == "\ufffd"
    ids = [stray] * (3 * MAX_HELD_TOKENS)
    detokenizer = IncrementalDetokenizer(smollm2)
    deltas = [detokenizer.push([i]) for i in ids]
    assert any(deltas)
    assert max_pending(smollm2, ids) <= MAX_HELD_TOKENS
    assert "".join(deltas) + detokenizer.finish() == smollm2.decode(ids)


def test_a_character_after_invalid_bytes_survives_a_forced_emission(smollm2):
    # SmolLM2's vocabulary has no token for byte 0xF1, so U+40000 encodes to three stray continuation
    # bytes (U+FFFD three times). A push of more than MAX_HELD_TOKENS ids ending mid-character right
    # after them forces an emission: it must stop before that character's first bytes (found by
    # hypothesis: the character came out as two U+FFFD).
    ids = smollm2.encode(
        "00000000\x80\x80\u00c0\u0a40\u0a40\u21c0\U000c0000\U00040000\U000c0000", add_special_tokens=False
    )
    assert "\ufffd\ufffd\ufffd\U000c0000" in smollm2.decode(ids) and len(ids) > MAX_HELD_TOKENS + 1
    for cut in range(MAX_HELD_TOKENS, len(ids)):
        assert stream(smollm2, [ids[:cut], ids[cut:]], skip=False) == smollm2.decode(ids), cut


def max_pending(tokenizer, ids) -> int:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pending = 0
    for i in ids:
        detokenizer.push([i])
        pending = max(pending, detokenizer.num_pending_ids)
    return pending


def test_work_per_token_does_not_grow_with_length(smollm2):
    ids = smollm2.encode(" ".join(CORPUS) * 20, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(smollm2, prompt_ids=ids[:1000])
    decoded_lengths = []
    real_decode = detokenizer._decode
    detokenizer._decode = lambda window: decoded_lengths.append(len(window)) or real_decode(window)
    for i in ids:
        detokenizer.push([i])
    assert len(ids) > 2000 and max(decoded_lengths) <= 12


@SKIP
def test_a_long_stream_keeps_a_bounded_window(tokenizer, skip):
    """However long the stream and however big its pushes, only a window of ids is kept between pushes,
    and the text still equals the one-shot decode (multi-byte characters and byte-fallback runs included)."""
    ids = [i for sample in corpus_ids(tokenizer) for i in sample] * 4
    rng = random.Random(1)
    for prompt_length in (0, 40):
        prompt = ids[:prompt_length]
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, prompt_ids=prompt)
        pieces, kept, at = [], [], 0
        while at < len(ids):
            size = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(64, 600)])
            pieces.append(detokenizer.push(ids[at : at + size]))
            kept.append(detokenizer.num_kept_ids)
            at += size
        text = "".join(pieces) + detokenizer.finish()
        assert text == text_after_prompt(tokenizer, prompt + ids, prompt_length, skip)
        assert len(ids) > 2000 and max(kept) <= MAX_KEPT_IDS
