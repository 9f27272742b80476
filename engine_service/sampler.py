"""Batched sampling for one engine step: penalties, temperature, top-k/top-p/min-p, seeded Gumbel-max.

Every row's randomness is a counter-based hash of (seed, position, vocab id), so a seeded request draws
the same tokens whatever else shares its batch, with no per-row generator. Greedy rows are an argmax;
a step where every row is greedy and unpenalized is just one argmax. Results reach the host in one
`.tolist()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenwire.engine.sequence import Sequence

_GREEDY_TEMPERATURE = 1e-5   # below this, temperature scaling would overflow: treat as greedy
_U64 = 1 << 64


def _i64(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no fast uint64 arithmetic)."""
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_UNIFORM_BITS = 23           # k + 0.5 stays exact in float32, so u never rounds to 0 or 1


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float                      # of the chosen token, from the raw model logits
    rank: int                           # 1 = the model's most likely token
    top: list[tuple[int, float]]        # the top-n (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]                    # one per row
    logprobs: list[TokenLogprobs | None]    # None for rows that did not ask for logprobs


class Sampler:
    def __init__(self) -> None:
        self._vocab_keys: torch.Tensor | None = None

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [len(seqs), vocab] float32 (raw model output) -> one token per sequence."""
        params = [s.params for s in seqs]
        scores = logits
        if any(p.uses_penalties for p in params):
            scores = apply_penalties(logits, seqs)
        greedy = [p.temperature < _GREEDY_TEMPERATURE for p in params]
        if all(greedy):
            tokens = scores.argmax(-1)
        else:
            tokens = self._sample_rows(scores, seqs, greedy)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return SamplerOutput(tokens.tolist(), [None] * len(seqs))
        return _with_logprobs(logits, tokens, wanted, [params[i].logprobs for i in wanted])

    def _sample_rows(self, scores: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        rows = [i for i, g in enumerate(greedy) if not g]
        device = scores.device
        index = torch.tensor(rows, device=device)
        params = [seqs[i].params for i in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        x = filter_logits(scores.index_select(0, index) / temperature[:, None], params)
        seeds = [seqs[i].seed for i in rows]
        positions = [seqs[i].num_tokens for i in rows]
        chosen = (x + self._gumbel(seeds, positions, x.shape[1], device)).argmax(-1)
        if len(rows) == len(seqs):
            return chosen
        return scores.argmax(-1).index_copy_(0, index, chosen)

    def _gumbel(self, seeds: list[int], positions: list[int], vocab: int, device) -> torch.Tensor:
        """Gumbel noise [rows, vocab], a pure function of (seed, position, vocab id) per element."""
        if self._vocab_keys is None or self._vocab_keys.shape[0] != vocab or self._vocab_keys.device != device:
            self._vocab_keys = _mix(torch.arange(vocab, dtype=torch.long, device=device) * _GOLDEN + _MIX2)
        seed = torch.tensor(seeds, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        row_keys = _mix(_mix(seed + _GOLDEN) + pos * _GOLDEN)
        bits = _srl(_mix(row_keys[:, None] ^ self._vocab_keys[None, :]), 64 - _UNIFORM_BITS)
        u = (bits.float() + 0.5) * (2.0 ** -_UNIFORM_BITS)
        return u.log_().neg_().log_().neg_()


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (>> on int64 is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A new tensor: repetition penalty over prompt + output ids, presence/frequency over output ids."""
    rows = [i for i, s in enumerate(seqs) if s.params.uses_penalties]
    penalized = [seqs[i] for i in rows]
    device, vocab = logits.device, logits.shape[1]
    index = torch.tensor(rows, device=device)
    x = logits.index_select(0, index)
    outputs = _counts(x, [s.output_token_ids for s in penalized])
    seen = (_counts(x, [s.prompt_token_ids for s in penalized]) > 0) | (outputs > 0)
    column = lambda values: torch.tensor(values, dtype=x.dtype, device=device)[:, None]  # noqa: E731
    rep = column([s.params.repetition_penalty for s in penalized])
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x -= column([s.params.frequency_penalty for s in penalized]) * outputs
    x -= column([s.params.presence_penalty for s in penalized]) * (outputs > 0)
    return logits.index_copy(0, index, x)


def _counts(like: torch.Tensor, id_lists: list[list[int]]) -> torch.Tensor:
    """[rows, vocab] occurrence counts, by one scatter_add over right-padded ids (pad = an extra column)."""
    rows, vocab = like.shape
    width = max((len(ids) for ids in id_lists), default=0)
    padded = torch.full((rows, max(width, 1)), vocab, dtype=torch.long)
    for r, ids in enumerate(id_lists):
        padded[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = padded.to(like.device)
    counts = torch.zeros(rows, vocab + 1, dtype=like.dtype, device=like.device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=like.dtype))[:, :vocab]


def filter_logits(x: torch.Tensor, params: list) -> torch.Tensor:
    """Mask (-inf) what min_p, then top_k and top_p exclude; x is temperature-scaled, one row per params."""
    device = x.device
    neg_inf = float("-inf")
    if any(p.min_p > 0 for p in params):  # p < min_p * p_max  <=>  logit < max_logit + log(min_p)
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else neg_inf for p in params], device=device)
        x = x.masked_fill(x < x.amax(-1, keepdim=True) + log_min_p[:, None], neg_inf)
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    use_top_p = any(p.top_p < 1 for p in params)
    if not use_top_p and all(k == vocab for k in top_k):
        return x
    k = torch.tensor(top_k, device=device)[:, None]
    if not use_top_p:  # top_k alone: the k-th largest value is the cutoff, no full sort
        widest = max(t for t in top_k if t < vocab)
        values = x.topk(widest, dim=-1).values
        cutoff = values.gather(1, k.clamp(max=widest) - 1).masked_fill_(k == vocab, neg_inf)
        return x.masked_fill(x < cutoff, neg_inf)
    ordered = x.sort(-1, descending=True).values
    ordered.masked_fill_(torch.arange(vocab, device=device)[None, :] >= k, neg_inf)
    probs = ordered.softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)[:, None]
    # Keep the shortest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    kept = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True).clamp_(min=1)
    return x.masked_fill(x < ordered.gather(1, kept - 1), neg_inf)


def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], ns: list[int]) -> SamplerOutput:
    """Token ids plus logprobs of the rows that asked, packed into one tensor for a single .tolist()."""
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits.index_select(0, index).log_softmax(-1)
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])
    rank = (logprobs > chosen).sum(-1, keepdim=True) + 1
    n = max(ns)
    top_values, top_ids = logprobs.topk(n, dim=-1) if n else (chosen[:, :0], chosen[:, :0])
    packed = torch.cat([chosen.double(), rank.double(), top_ids.double(), top_values.double()], 1)
    flat = torch.cat([tokens.double(), packed.flatten()]).tolist()
    num_rows = len(tokens)
    token_ids = [int(t) for t in flat[:num_rows]]
    out: list[TokenLogprobs | None] = [None] * num_rows
    width = 2 + 2 * n
    for j, (row, row_n) in enumerate(zip(rows, ns)):
        rec = flat[num_rows + j * width: num_rows + (j + 1) * width]
        ids, values = rec[2:2 + n], rec[2 + n:]
        top = [(int(ids[i]), values[i]) for i in range(row_n)]
        out[row] = TokenLogprobs(token_ids[row], rec[0], int(rec[1]), top)
    return SamplerOutput(token_ids, out)
