"""The batched sampler on plain tensors: greedy, filters, penalties, seeded reproducibility, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import Sequence
from tokenwire.engine.worker import sampler as sampler_module
from tokenwire.engine.worker import sampling_noise
from tokenwire.engine.worker.sampler import Sampler, apply_penalties
from tokenwire.serving.errors import InvalidRequestError

VOCAB = 64


def seq(seed: int = 0, prompt: list[int] | None = None, output: list[int] | None = None, **params) -> Sequence:
    s = Sequence("r", list(prompt or [1, 2, 3]), SamplingParams(**params), seed=seed)
    s.output_token_ids = list(output or [])
    return s


def probs_logits(probs: list[float], vocab: int = VOCAB) -> torch.Tensor:
    """One row whose softmax puts `probs` on the first ids and nothing on the rest."""
    row = torch.full((vocab,), float("-inf"))
    row[: len(probs)] = torch.tensor(probs).log()
    return row


def draws(logits_row: torch.Tensor, n: int, **params) -> list[int]:
    """n samples of one distribution: n rows with seeds 0..n-1 in a single batch."""
    seqs = [seq(seed=i, **params) for i in range(n)]
    return Sampler().sample(logits_row.expand(n, -1).contiguous(), seqs).token_ids


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax(logits):
    out = Sampler().sample(logits, [seq(temperature=0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_top_k_1_is_greedy(logits):
    out = Sampler().sample(logits, [seq(seed=i, temperature=1.5, top_k=1) for i in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_row_is_the_same_alone_or_in_a_batch(logits):
    sampler = Sampler()
    for output in ([], [5], [5, 9, 11]):  # several positions
        target = seq(seed=42, output=output, temperature=1.0, top_p=0.95)
        alone = sampler.sample(logits[:1], [target]).token_ids[0]
        others = [seq(seed=100 + i, temperature=0.7 + i / 10, top_k=i) for i in range(15)]
        others[3] = seq(temperature=0)  # a greedy row in the batch too
        batch = torch.cat([logits[1:8], logits[:1], logits[1:8], logits[1:2]])
        seqs = others[:7] + [target] + others[7:]
        assert sampler.sample(batch, seqs).token_ids[7] == alone


def test_different_seeds_and_positions_draw_differently():
    flat = torch.zeros(VOCAB)
    assert len(set(draws(flat, 32))) > 10
    by_position = [Sampler().sample(flat[None], [seq(seed=1, output=[0] * k)]).token_ids[0] for k in range(32)]
    assert len(set(by_position)) > 10


def test_uniform_logits_draw_uniformly():
    counts = Counter(draws(torch.zeros(16), 3200))
    assert set(counts) == set(range(16))
    assert all(140 < c < 260 for c in counts.values()), counts  # expected 200 each


def test_temperature_reshapes_the_distribution():
    row = probs_logits([0.6, 0.3, 0.1])
    for temperature, expected in ((1.0, [0.6, 0.3, 0.1]), (0.5, [0.783, 0.196, 0.022])):
        counts = Counter(draws(row, 2000, temperature=temperature))
        for token, p in enumerate(expected):
            assert abs(counts[token] / 2000 - p) < 0.04, (temperature, counts)


def test_top_p_keeps_only_the_nucleus():
    row = probs_logits([0.5, 0.3, 0.1, 0.05, 0.05])
    assert set(draws(row, 500, top_p=0.75)) == {0, 1}
    assert set(draws(row, 500, top_p=0.85)) == {0, 1, 2}
    assert set(draws(row, 100, top_p=0.3)) == {0}


def test_top_k_and_min_p():
    row = probs_logits([0.3, 0.25, 0.2, 0.15, 0.1])
    assert set(draws(row, 500, top_k=3)) == {0, 1, 2}
    assert set(draws(row, 500, min_p=0.6)) == {0, 1, 2}  # p >= 0.6 * 0.3 = 0.18
    assert set(draws(row, 500, top_k=4, top_p=0.5)) == {0, 1}


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    s = seq(prompt=[0, 1], output=[2], repetition_penalty=2.0)
    out = apply_penalties(logits, [s])
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -2.0, 1.0]]))


def test_presence_and_frequency_penalties_over_output_only():
    logits = torch.zeros(2, 5)
    s = seq(prompt=[4, 4], output=[0, 0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [seq(), s])  # the unpenalized row is untouched
    torch.testing.assert_close(out, torch.tensor([[0.0] * 5, [-1.25, -0.75, 0.0, 0.0, 0.0]]))


def test_penalties_change_a_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    assert Sampler().sample(logits, [seq(temperature=0, output=[0])]).token_ids == [0]
    assert Sampler().sample(logits, [seq(temperature=0, prompt=[3], output=[0], repetition_penalty=2.0)]).token_ids == [
        1
    ]


def test_logprobs_match_log_softmax(logits):
    seqs = [seq(seed=i, temperature=1.0 if i % 2 else 0, logprobs=[None, 0, 3, 5][i % 4]) for i in range(8)]
    out = Sampler().sample(logits, seqs)
    reference = logits.log_softmax(-1)
    for row, (s, token, lp) in enumerate(zip(seqs, out.token_ids, out.logprobs)):
        if s.params.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == token
        assert math.isclose(lp.logprob, reference[row, token].item(), abs_tol=1e-5)
        assert lp.rank == int((reference[row] > reference[row, token]).sum()) + 1
        assert len(lp.top) == s.params.logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        for token_id, value in lp.top:
            assert math.isclose(value, reference[row, token_id].item(), abs_tol=1e-5)
        if lp.top:
            assert lp.top[0][0] == int(reference[row].argmax())


def test_logprobs_ignore_penalties_and_temperature():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    s = seq(temperature=0, prompt=[2], output=[0], repetition_penalty=3.0, logprobs=1)
    lp = Sampler().sample(logits, [s]).logprobs[0]
    assert lp.token_id == 1
    assert math.isclose(lp.logprob, logits.log_softmax(-1)[0, 1].item(), abs_tol=1e-6)


def test_filters_apply_per_row():
    row = probs_logits([0.3, 0.25, 0.2, 0.15, 0.1])
    seqs = [seq(seed=i, top_k=2 if i % 2 else 0) for i in range(400)]
    tokens = Sampler().sample(row.expand(400, -1).contiguous(), seqs).token_ids
    assert set(tokens[1::2]) == {0, 1}
    assert set(tokens[0::2]) == {0, 1, 2, 3, 4}


def test_wide_nucleus_beyond_the_topk_shortcut():
    vocab = 4096
    row = -torch.arange(vocab, dtype=torch.float32) * 2e-4  # nearly flat, strictly decreasing
    probs = row.double().softmax(-1)
    cutoff = int(((probs.cumsum(-1) - probs) < 0.5).sum())  # the nucleus is ids [0, cutoff)
    assert cutoff > sampler_module._NUCLEUS_WIDTH
    tokens = draws(row, 600, top_p=0.5)
    assert max(tokens) < cutoff
    assert max(tokens) > sampler_module._NUCLEUS_WIDTH


def test_noise_is_the_documented_hash():
    """The int32 tensor arithmetic wraps exactly like the reference integer hash (no platform drift)."""

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    row_keys = sampling_noise.row_keys([0, 7, 2**63 - 1], [0, 5, 100], torch.device("cpu"))
    noise = sampling_noise.gumbel(row_keys, sampling_noise.vocab_keys(300, torch.device("cpu")))
    for r, key in enumerate(row_keys.tolist()):
        for v in (0, 1, 150, 299):
            bits = lowbias32((key ^ ((v * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF) >> 9
            expected = -math.log(-math.log((bits + 0.5) / 2**23))
            assert math.isclose(noise[r, v].item(), expected, rel_tol=1e-5, abs_tol=1e-5)


def test_logit_bias_is_added_per_row_before_sampling(logits):
    """+100 forces a token, -100 bans the argmax; rows without a bias keep their own choice."""
    argmax = logits.argmax(-1).tolist()
    seqs = [
        seq(temperature=0, logit_bias=((7, 100.0),)),
        seq(temperature=0, logit_bias=((argmax[1], -100.0),)),
        seq(temperature=0),
        seq(seed=3, temperature=1.0, top_k=5, logit_bias=((11, 100.0),)),
    ]
    out = Sampler().sample(logits[:4], seqs).token_ids
    assert out[0] == 7
    assert (
        out[1] != argmax[1]
        and out[1] == logits[1].clone().index_fill_(0, torch.tensor([argmax[1]]), float("-inf")).argmax().item()
    )
    assert out[2] == argmax[2]
    assert out[3] == 11  # the bias lands before top_k picks candidates


def test_logit_bias_leaves_logprobs_the_models_own(logits):
    out = Sampler().sample(logits[:1], [seq(temperature=0, logprobs=0, logit_bias=((7, 100.0),))])
    assert out.token_ids == [7]
    assert out.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1)[7].item(), abs=1e-5)


def test_seeded_biased_row_is_the_same_alone_or_in_a_batch(logits):
    target = seq(seed=9, temperature=1.0, logit_bias=((3, 2.5), (40, -1.0)))
    alone = Sampler().sample(logits[:1], [target]).token_ids[0]
    others = [seq(seed=i, temperature=0.8, logit_bias=((i, 5.0),)) for i in range(7)]
    batch = torch.cat([logits[1:8], logits[:1]])
    assert Sampler().sample(batch, [*others, target]).token_ids[-1] == alone


@pytest.mark.parametrize(
    "bias, message",
    [
        (tuple((i, 1.0) for i in range(301)), "at most 300 entries"),
        (((VOCAB, 1.0),), "outside the vocabulary"),
        (((1, 100.5),), "values must be in \\[-100, 100\\]"),
        (((1, float("nan")),), "values must be in"),
        (((1, 1.0), (1, 2.0)), "at most once"),
    ],
)
def test_logit_bias_is_validated_naming_the_field(bias, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        SamplingParams(logit_bias=bias).validate(max_new_tokens_cap=16, max_logprobs=5, vocab_size=VOCAB)
    assert err.value.field == "logit_bias"
    SamplingParams(logit_bias=((0, -100.0), (VOCAB - 1, 100.0))).validate(16, 5, VOCAB)  # the bounds are in
