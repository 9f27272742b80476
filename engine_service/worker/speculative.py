"""Verification of speculative drafts: a drafted chunk's 1 + k positions were each sampled in the step's
forward; keep the longest prefix of drafts the model agrees with, plus the model's own token after it.

Greedy requests only (the scheduler drafts for no others): position i's argmax is exactly the token a
one-token-per-step decode would produce there whenever drafts[:i] were accepted, so the output is the
non-speculative output, several tokens a step.
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
