"""Batched sampling for one engine step: logit bias, min_tokens, penalties, temperature, min-p/top-k/top-p,
seeded Gumbel-max; and the logprobs of prompt tokens (`prompt_logprobs`), from the prefill's logits.

Every row's randomness is a counter-based hash of (seed, position, vocab id): splitmix64 turns
(seed, position) into a row key, and lowbias32 mixes it with each vocab id in int32 tensor ops. So a
seeded request draws the same tokens whatever else shares its batch, with no per-row generator.
Rows with a structured-output constraint get their grammar's token bitmask (disallowed logits become
-inf), filled for those rows only; rows below their min_tokens get -inf on eos and their stop ids.
Filters apply in vLLM's order (logit bias, min_tokens, penalties, temperature, min_p, top_k, top_p); rows with top_k/top_p sample among their candidates only, which gives the same
draw as the whole vocabulary because the noise is a function of the vocab id. Greedy rows are an
argmax, and a step where every row is greedy and unpenalized is one argmax. Token ids and logprobs reach
the host in one `.tolist()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenwire.engine.models import kernels
from tokenwire.engine.request.grammar import fill_bitmasks, fill_draft_bitmasks
from tokenwire.engine.scheduling.sequence import Sequence
from tokenwire.engine.worker import sampling_noise

# top_p alone is first tried within the top-N tokens (torch.topk is ~10x cheaper than a full sort on
# CPU); only when the nucleus is wider than that do its rows sort the whole vocabulary.
_NUCLEUS_WIDTH = 1024
# Byte value -> the 8 logit offsets it stands for (bit b clear: -inf). One index_select and one add
# expand a packed bitmask onto the logits: ~5x cheaper on CPU than unpacking bits with shifts.
_BYTE_BIAS = torch.zeros(256, 8).masked_fill_(((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 0, float("-inf"))


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # of the chosen token, from the raw model logits
    rank: int  # 1 = the model's most likely token
    top: list[tuple[int, float]]  # the top-n (token id, logprob), most likely first


@dataclass(frozen=True)
class PromptSpan:
    """Prompt positions [start, start + count) of one sequence, whose logits score `targets`, the prompt
    tokens at start + 1 onwards."""

    seq: Sequence
    start: int
    count: int
    targets: list[int]


@dataclass(frozen=True)
class PromptLogprobs:
    span: PromptSpan
    entries: list[TokenLogprobs]  # one per position of the span: the logprob of the prompt token after it


@dataclass
class SamplerOutput:
    seqs: list[Sequence]  # the rows' sequences
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask for logprobs
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # this step's, span by span
    # Speculative decoding: drafts accepted per drafted sequence (its rows are those tokens plus one more)
    num_accepted: dict[Sequence, int] = field(default_factory=dict)


class Sampler:
    def __init__(self, native=None, eos_token_ids: set[int] | frozenset[int] = frozenset()) -> None:
        self._vocab_keys: torch.Tensor | None = None
        self._eos_token_ids = sorted(eos_token_ids)  # masked, with stop ids, until min_tokens are out
        # The native CPU kernels (models/kernels.py) or None: their argmax reads logits at memory speed.
        self._argmax = native.argmax if native is not None else kernels.argmax

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], drafted: list[tuple[int, ...]] | None = None
    ) -> SamplerOutput:
        """logits [len(seqs), vocab] float32 (raw model output) -> one token per row. `drafted`: per row, the
        draft ids between its sequence's last known token and the row (a drafted chunk's row d follows its
        first d drafts), so each position draws its own noise and is masked by the grammar state there;
        None: no row follows drafts."""
        drafted = drafted or [()] * len(seqs)
        params = [s.params for s in seqs]
        scores = logits
        if any(p.logit_bias for p in params):
            scores = apply_logit_bias(logits, params)  # a copy
        held = _below_min_tokens(seqs)
        if held:  # logprobs stay those of the raw model: never mask `logits` itself
            scores = self._mask_stops(scores.clone() if scores is logits else scores, seqs, held)
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:  # logprobs stay those of the raw model: mask a copy when any row wants them
            copy = scores is logits and any(p.logprobs is not None for p in params)
            scores = self._apply_grammars(scores.clone() if copy else scores, seqs, constrained, drafted)
        if any(p.uses_penalties for p in params):
            scores = apply_penalties(scores, seqs)
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = self._argmax(scores)
        else:
            tokens = self._sample_rows(scores, seqs, greedy, [len(d) for d in drafted])
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return SamplerOutput(seqs, tokens.tolist(), [None] * len(seqs))
        return _with_logprobs(seqs, logits, tokens, wanted, [params[i].logprobs for i in wanted])

    def _mask_stops(self, scores: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        """In place: -inf on the eos ids (unless ignore_eos) and stop ids of `rows`, one flat index_fill_."""
        vocab = scores.shape[1]
        keys: list[int] = []
        for row in rows:
            params = seqs[row].params
            stops = params.stop_token_ids if params.ignore_eos else (*params.stop_token_ids, *self._eos_token_ids)
            keys += [row * vocab + token for token in stops]
        if keys:
            scores.view(-1).index_fill_(0, torch.tensor(keys, device=scores.device), float("-inf"))
        return scores

    def _apply_grammars(
        self, scores: torch.Tensor, seqs: list[Sequence], rows: list[int], drafted: list[tuple[int, ...]]
    ) -> torch.Tensor:
        """In place: -inf on every token the rows' grammars disallow (bitmasks for those rows only)."""
        packed = torch.from_numpy(_grammar_masks(seqs, rows, drafted, scores.shape[1]))
        device = scores.device
        byte_values = packed.view(torch.uint8).reshape(-1).to(device, torch.long)  # little-endian words
        bias = _BYTE_BIAS.to(device).index_select(0, byte_values).view(len(rows), -1)[:, : scores.shape[1]]
        if len(rows) == len(seqs):
            return scores.add_(bias)
        return scores.index_add_(0, torch.tensor(rows, device=scores.device), bias)

    def _sample_rows(
        self, scores: torch.Tensor, seqs: list[Sequence], greedy: list[bool], ahead: list[int]
    ) -> torch.Tensor:
        rows = [i for i, g in enumerate(greedy) if not g]
        device = scores.device
        index = torch.tensor(rows, device=device)
        params = [seqs[i].params for i in rows]
        # Temperature and min_p apply inside _draw: bounded rows scale their candidates alone.
        x = scores if len(rows) == len(seqs) else scores.index_select(0, index)
        temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=device)[:, None]
        row_keys = sampling_noise.row_keys(
            [seqs[i].seed for i in rows], [seqs[i].num_tokens + ahead[i] for i in rows], device
        )
        chosen = _draw(x, temperature, params, row_keys, self._vocab_keys_for(x.shape[1], device))
        if len(rows) == len(seqs):
            return chosen
        return self._argmax(scores).index_copy_(0, index, chosen)

    def _vocab_keys_for(self, vocab: int, device: torch.device) -> torch.Tensor:
        keys = self._vocab_keys
        if keys is None or keys.shape[0] != vocab or keys.device != device:
            keys = self._vocab_keys = sampling_noise.vocab_keys(vocab, device)
        return keys


def _grammar_masks(seqs: list[Sequence], rows: list[int], drafted: list[tuple[int, ...]], vocab: int) -> np.ndarray:
    """Packed masks of `rows`: one batched fill for sequences without drafts; a drafted sequence's row d is
    its grammar's mask after its first d drafts (the matcher is rolled back: drafts never advance it)."""
    chunk_drafts: dict[Sequence, tuple[int, ...]] = {}  # a drafted sequence -> its drafts (its last row's)
    for i in rows:
        if len(drafted[i]) > len(chunk_drafts.get(seqs[i], ())):
            chunk_drafts[seqs[i]] = drafted[i]
    if not chunk_drafts:
        return fill_bitmasks([seqs[i].grammar for i in rows], vocab)
    plain = [j for j, i in enumerate(rows) if seqs[i] not in chunk_drafts]
    out = np.empty((len(rows), (vocab + 31) // 32), dtype=np.int32)
    if plain:
        out[plain] = fill_bitmasks([seqs[rows[j]].grammar for j in plain], vocab)
    for seq, drafts in chunk_drafts.items():
        masks = fill_draft_bitmasks(seq.grammar, drafts, vocab)
        for j, i in enumerate(rows):
            if seqs[i] is seq:
                out[j] = masks[len(drafted[i])]
    return out


def _below_min_tokens(seqs: list[Sequence]) -> list[int]:
    """Rows whose sequence has generated fewer than its min_tokens."""
    return [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]


def _draw(
    x: torch.Tensor, temperature: torch.Tensor, params: list, row_keys: torch.Tensor, vocab_keys: torch.Tensor
) -> torch.Tensor:
    """Gumbel-max over each row's allowed tokens of x / temperature (x: scores before temperature, never
    written). Noise depends on (row key, vocab id) only, so the draw is the same whether it looks at the
    whole vocabulary or at a row's candidates."""
    bounded = [p.top_k > 0 or p.top_p < 1 for p in params]
    if not any(bounded):
        scaled = _apply_min_p_(x / temperature, params)
        return scaled.add_(sampling_noise.gumbel(row_keys, vocab_keys)).argmax(-1)
    if all(bounded):
        values, ids = _candidates(x, temperature, params)
        noise = sampling_noise.gumbel(row_keys, vocab_keys[ids])
        return ids.gather(1, (values + noise).argmax(-1, keepdim=True)).squeeze(1)
    out = torch.empty(len(params), dtype=torch.long, device=x.device)
    for flag in (True, False):  # bounded rows on candidates, the others on the whole vocabulary
        rows = [i for i, b in enumerate(bounded) if b is flag]
        index = torch.tensor(rows, device=x.device)
        picked = [params[i] for i in rows]
        keys = row_keys.index_select(0, index)
        out.index_copy_(0, index, _draw(x.index_select(0, index), temperature[index], picked, keys, vocab_keys))
    return out


def _candidates(
    x: torch.Tensor, temperature: torch.Tensor, params: list, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values / temperature, vocab ids) [rows, width] of each row's top tokens, -inf beyond its min_p /
    top_k / top_p cut. A positive temperature keeps the order, so top-k runs on the unscaled row and only
    the candidates are scaled (at a 262k vocabulary a full-row copy and divide cost more than the top-k);
    the row's maximum is its first candidate, so min_p needs no pass over the row either."""
    vocab = x.shape[1]
    if width is None:
        width = min(vocab, max(p.top_k if p.top_k > 0 else _NUCLEUS_WIDTH for p in params))
    values, ids = x.topk(width, dim=-1)
    values = _apply_min_p_(values.div_(temperature), params)
    device, neg_inf = x.device, float("-inf")
    top_k = torch.tensor([p.top_k if 0 < p.top_k < width else width for p in params], device=device)
    values.masked_fill_(torch.arange(width, device=device) >= top_k[:, None], neg_inf)
    if all(p.top_p >= 1 for p in params):
        return values, ids
    # top_p after top_k (HF, vLLM): mass over the top_k survivors, or over the whole row without top_k.
    has_top_k = torch.tensor([p.top_k > 0 for p in params], device=device)[:, None]
    norm = values.logsumexp(-1, keepdim=True)
    if not bool(has_top_k.all()):
        whole_row = _apply_min_p_(x / temperature, params).logsumexp(-1, keepdim=True)
        norm = torch.where(has_top_k, norm, whole_row)
    probs = (values - norm).exp_()
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)[:, None]
    covered = has_top_k | (probs.sum(-1, keepdim=True) >= top_p)
    if width < vocab and not bool(covered.all()):  # a nucleus wider than `width`: sort everything
        return _candidates(x, temperature, params, vocab)
    # Keep the shortest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    values.masked_fill_(probs.cumsum(-1) - probs >= top_p, neg_inf)
    return values, ids


def _apply_min_p_(x: torch.Tensor, params: list) -> torch.Tensor:
    """In place, on temperature-scaled scores: p < min_p * p_max  <=>  logit < max_logit + log(min_p)
    (no softmax needed)."""
    if all(p.min_p <= 0 for p in params):
        return x
    log_min_p = torch.tensor(
        [math.log(p.min_p) if p.min_p > 0 else float("-inf") for p in params], dtype=x.dtype, device=x.device
    )
    return x.masked_fill_(x < x.amax(-1, keepdim=True) + log_min_p[:, None], float("-inf"))


def apply_logit_bias(logits: torch.Tensor, params: list) -> torch.Tensor:
    """A new tensor with each row's bias added to its listed ids: one index_add_ over flat indices, never a
    dense [rows, vocab] bias."""
    vocab, device = logits.shape[1], logits.device
    keys = [row * vocab + token for row, p in enumerate(params) for token, _ in p.logit_bias]
    values = [bias for p in params for _, bias in p.logit_bias]
    scores = logits.clone()
    scores.view(-1).index_add_(
        0, torch.tensor(keys, device=device), torch.tensor(values, dtype=logits.dtype, device=device)
    )
    return scores


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A new tensor: repetition penalty over prompt + output ids, presence/frequency over output ids
    (vLLM's semantics). Only the logits of tokens that occurred are touched: gathered, adjusted and
    scattered back by flat index, never a dense [rows, vocab] mask."""
    vocab, device = logits.shape[1], logits.device
    prompt_keys: list[int] = []
    output_keys: list[int] = []
    for row, seq in enumerate(seqs):
        if seq.params.uses_penalties:
            base = row * vocab
            if seq.params.repetition_penalty != 1.0:
                prompt_keys += [base + t for t in seq.prompt_token_ids]
            output_keys += [base + t for t in seq.output_token_ids]
    if not prompt_keys and not output_keys:
        return logits
    keys, inverse = torch.unique(torch.tensor(prompt_keys + output_keys, device=device), return_inverse=True)
    counts = torch.zeros(keys.shape[0], dtype=logits.dtype, device=device)
    counts.index_add_(0, inverse[len(prompt_keys) :], torch.ones(len(output_keys), dtype=logits.dtype, device=device))
    row_of = keys // vocab

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(s.params, name) for s in seqs], dtype=logits.dtype, device=device)[row_of]

    scores = logits.clone()
    values = scores.view(-1)[keys]
    repetition = column("repetition_penalty")
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0)
    scores.view(-1)[keys] = values
    return scores


def _with_logprobs(
    seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], ns: list[int]
) -> SamplerOutput:
    """Token ids plus logprobs of the rows that asked, packed into one tensor for a single .tolist()."""
    index = torch.tensor(rows, device=logits.device)
    n = max(ns)
    packed = _pack_logprobs(logits.index_select(0, index), tokens.index_select(0, index), n)
    flat = torch.cat([tokens.double(), packed.flatten()]).tolist()
    num_rows = len(tokens)
    token_ids = [int(t) for t in flat[:num_rows]]
    records = _unpack_logprobs(flat[num_rows:], [token_ids[row] for row in rows], ns, n)
    out: list[TokenLogprobs | None] = [None] * num_rows
    for row, record in zip(rows, records):
        out[row] = record
    return SamplerOutput(seqs, token_ids, out)


# Prompt rows are turned into logprobs this many at a time, so log_softmax's copy stays bounded.
_PROMPT_TILE_ROWS = 256


def prompt_logprobs(logits: torch.Tensor, spans: list[PromptSpan]) -> list[PromptLogprobs]:
    """logits [sum of span counts, vocab] (raw model output, spans in order) -> each span's entries: the
    logprob, rank and top-n of every prompt token it scores, in one .tolist() for the whole step."""
    targets = torch.tensor([t for span in spans for t in span.targets], dtype=torch.long, device=logits.device)
    ns = [span.seq.params.prompt_logprobs for span in spans for _ in range(span.count)]
    n = max(ns)
    tiles = [
        _pack_logprobs(logits[i : i + _PROMPT_TILE_ROWS], targets[i : i + _PROMPT_TILE_ROWS], n)
        for i in range(0, logits.shape[0], _PROMPT_TILE_ROWS)
    ]
    records = _unpack_logprobs(torch.cat(tiles).flatten().tolist(), targets.tolist(), ns, n)
    out, at = [], 0
    for span in spans:
        out.append(PromptLogprobs(span, records[at : at + span.count]))
        at += span.count
    return out


def _pack_logprobs(logits: torch.Tensor, chosen_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, 2 + 2n] float64 per row: the chosen id's logprob and rank, then the top-n ids and logprobs."""
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(1, chosen_ids[:, None])
    rank = (logprobs > chosen).sum(-1, keepdim=True) + 1
    top_values, top_ids = logprobs.topk(n, dim=-1) if n else (chosen[:, :0], chosen[:, :0])
    return torch.cat([chosen.double(), rank.double(), top_ids.double(), top_values.double()], 1)


def _unpack_logprobs(flat: list[float], token_ids: list[int], ns: list[int], n: int) -> list[TokenLogprobs]:
    """_pack_logprobs' rows (flattened to a list) as records, row j keeping its own top-ns[j]."""
    width = 2 + 2 * n
    out = []
    for j, (token_id, row_n) in enumerate(zip(token_ids, ns)):
        rec = flat[j * width : (j + 1) * width]
        ids, values = rec[2 : 2 + n], rec[2 + n :]
        out.append(TokenLogprobs(token_id, rec[0], int(rec[1]), [(int(ids[i]), values[i]) for i in range(row_n)]))
    return out
