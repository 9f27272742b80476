"""Verification of speculative drafts: a drafted chunk's 1 + k positions were each sampled in the step's
forward; keep the longest prefix of drafts equal to the tokens sampled there, plus the sampled token after it.

Greedy rows: position i's argmax is exactly the token a one-token-per-step decode would produce there
whenever drafts[:i] were accepted, so the output is the non-speculative output, several tokens a step.

Sampled rows: this is the standard rejection rule for a point-mass draft q = 1{t}, with its randomness taken
from the sampler's Gumbel-max draw y_i at position i (noise keyed by the request's seed and i's position,
after temperature, min-p, top-k and top-p): accepting t iff y_i == t accepts with probability p_i(t), and on
a rejection y_i is p_i conditioned on y_i != t, which is normalize(max(0, p_i - q)), the residual; after k
acceptances y_k is a draw from p_{k+1}, the bonus. Each kept token is therefore exactly what the
non-speculative sampler draws at that position from the same prefix: a seeded request gives the same tokens
with speculation on or off (up to the rounding of a k+1-row forward), and its distribution is unchanged.
The comparison is one list equality per row, over tokens already on the host: nothing per vocabulary entry.
"""

from __future__ import annotations

from tokenwire.engine.scheduling.sequence import ScheduledChunk
from tokenwire.engine.worker.sampler import SamplerOutput


def accept_drafts(sampled: SamplerOutput, chunks: list[ScheduledChunk]) -> SamplerOutput:
    """`sampled` has 1 + len(drafts) rows per sampling chunk, in chunk order; returns one row per kept token
    (a sequence's rows consecutive, in order) and each drafted sequence's accepted-draft count."""
    seqs, token_ids, logprobs, accepted = [], [], [], {}
    row = 0
    for chunk in chunks:
        drafts = chunk.draft_token_ids
        targets = sampled.token_ids[row : row + 1 + len(drafts)]
        agree = 0
        while agree < len(drafts) and drafts[agree] == targets[agree]:
            agree += 1
        seqs += [chunk.seq] * (agree + 1)
        token_ids += targets[: agree + 1]
        logprobs += sampled.logprobs[row : row + agree + 1]
        if drafts:
            accepted[chunk.seq] = agree
        row += 1 + len(drafts)
    return SamplerOutput(seqs, token_ids, logprobs, sampled.prompt_logprobs, accepted)
