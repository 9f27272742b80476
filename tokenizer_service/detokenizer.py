"""Incremental detokenization: token ids arrive a few at a time, text deltas leave.

The offset scheme of vLLM and TGI. Decoding one token alone is wrong (byte-level BPE splits a
character over several tokens; SentencePiece decoders strip the first token's leading space), and
decoding the whole sequence every step costs O(n). So each step decodes only a short window twice:

    prefix_text = decode(ids[prefix_offset:read_offset])   # text already emitted, in context
    full_text   = decode(ids[prefix_offset:])              # the same, plus the new ids
    delta       = full_text[len(prefix_text):]

holding back the last few ids while their text ends in U+FFFD (a character whose remaining bytes
are in tokens not seen yet). Offsets only advance to where the window's text ends on a whole
character, so every window starts on a character boundary and `prefix_text` is a true prefix of
`full_text`.

State stays bounded however long the stream: once a push has emitted more than a few ids, the window
moves up to the last few of them (the context a leading-space or merge decision needs, starting on a
whole character) and everything before it is dropped, so the detokenizer keeps at most
`MAX_KEPT_IDS` ids between pushes (plus a single push's own ids during it), not the stream's history.

Skipped special tokens are dropped on arrival rather than decoded with skip_special_tokens: a window
made only of skipped tokens would decode to "" and lose the context that decides a leading space.
Text is never "cleaned up" (`clean_up_tokenization_spaces`): that rewrites text already streamed.

Guarantees, for ids whose bytes form valid UTF-8 (and for invalid bytes a tokenizer produced from text,
such as a character whose first byte is missing from the vocabulary), however the ids are split into
pushes: the deltas of `push` and `finish` concatenate to
`decode(ids, skip_special_tokens=...)`; with `prompt_ids`, to the text `decode(prompt + ids)` has
after the prompt's text (a first word keeps its leading space; a prompt ending mid-character yields
the completed character; a literal U+FFFD right at the cut is ambiguous). Free of gRPC: the engine
reuses it for stop strings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context: enough for any leading-space or merge decision.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes and a token at least 1, so an incomplete last character
# starts within the last 3 tokens: that is as far back as `push` looks for a whole-character end.
MAX_INCOMPLETE_TOKENS = 3
# When no such end exists the U+FFFD is real (invalid bytes, or literal U+FFFD characters); past this
# many held-back tokens the text is emitted anyway, so a run of them cannot grow the window forever.
MAX_HELD_TOKENS = 32
# Emitted ids a window keeps as context for the next push once it holds more: the prompt's context plus
# room for the step back to a whole character.
MAX_CONTEXT_IDS = PROMPT_CONTEXT_TOKENS + 2 * MAX_INCOMPLETE_TOKENS + 1
# Kept between pushes: the context, and ids held back (an incomplete character) up to the forced emission.
MAX_KEPT_IDS = MAX_CONTEXT_IDS + MAX_HELD_TOKENS


def skipped_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids `decode(..., skip_special_tokens=True)` drops: added tokens flagged special."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
    return frozenset(tokenizer.all_special_ids)


def make_decoder(tokenizer: Any):
    """A `decode(ids) -> str` with no special-token skipping and no clean-up, as fast as available."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: ~2 us a call instead of ~7 through transformers
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


class IncrementalDetokenizer:
    """Streams the text of one sequence; O(1) work per token in the sequence length."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
        *,
        skipped_ids: frozenset[int] | None = None,
    ):
        """`prompt_ids` give context only (their text is never returned). `skipped_ids` lets a caller
        that builds many detokenizers compute `skipped_token_ids(tokenizer)` once."""
        self._decode = make_decoder(tokenizer)
        if skip_special_tokens:
            self._skipped = skipped_token_ids(tokenizer) if skipped_ids is None else skipped_ids
        else:
            self._skipped = frozenset()
        self._ids: list[int] = self._prompt_tail(prompt_ids)
        self._read_offset = len(self._ids)
        # Until the first emission after a prompt, the cut between prompt and output text is found by
        # comparing texts (the prompt's last character may be incomplete): `_prompt_whole_chars` is
        # the length of the window's prompt text known to end on a whole character.
        self._prefix_offset, self._prompt_whole_chars = self._prompt_window() if self._ids else (0, None)
        self._finished = False

    @property
    def num_pending_ids(self) -> int:
        """Ids received whose text is held back (an incomplete character)."""
        return len(self._ids) - self._read_offset

    @property
    def num_kept_ids(self) -> int:
        """Ids held as state: the window's context and the pending ids (bounded: MAX_KEPT_IDS)."""
        return len(self._ids)

    def push(self, ids: Iterable[int]) -> str:
        """Adds generated ids; returns the text they complete (possibly "")."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        kept = self._keep(ids)
        if not kept:
            return ""
        self._ids.extend(kept)
        prefix_text = self._prefix_text()
        # Emit up to the last whole character: the full window, else one of the last few ids may
        # hold the first bytes of a character still being generated.
        ends = []
        for end in range(len(self._ids), max(self._read_offset, len(self._ids) - MAX_INCOMPLETE_TOKENS - 1), -1):
            text = self._decode(self._ids[self._prefix_offset : end])
            cut = self._cut(prefix_text, text)
            if len(text) > cut and not text.endswith(REPLACEMENT_CHAR):
                return self._advance(text, cut, end)
            ends.append((len(text) - len(text.rstrip(REPLACEMENT_CHAR)), -end, text, cut))
        if self.num_pending_ids > MAX_HELD_TOKENS:
            # The U+FFFD are real (invalid bytes, which a tokenizer missing some bytes can produce from
            # text): emit anyway, up to the end with the fewest of them trailing, since the first bytes
            # of a character still being generated add one more there and have to stay held.
            _, end, text, cut = min(ends)
            return self._advance(text, cut, -end)
        return ""

    def finish(self) -> str:
        """Flushes held-back text (a trailing incomplete character becomes U+FFFD, as in decode)."""
        if self._finished:
            return ""
        self._finished = True
        if not self.num_pending_ids:
            return ""
        return self._emit_all(self._prefix_text())

    def _emit_all(self, prefix_text: str) -> str:
        """Emits everything received, whatever its last character."""
        text = self._decode(self._ids[self._prefix_offset :])
        return self._advance(text, self._cut(prefix_text, text), len(self._ids))

    def _keep(self, ids: Iterable[int]) -> list[int]:
        if not self._skipped:
            return list(ids)
        return [i for i in ids if i not in self._skipped]

    def _prompt_tail(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's last kept ids, as many as the context window search can use: O(1), not O(prompt)."""
        wanted = PROMPT_CONTEXT_TOKENS + 2 * MAX_INCOMPLETE_TOKENS + 1
        tail: list[int] = []
        for i in reversed(prompt_ids):
            if i not in self._skipped:
                tail.append(i)
                if len(tail) == wanted:
                    break
        return tail[::-1]

    def _prefix_text(self) -> str:
        """The already emitted part of the window, decoded in the same context as the full window."""
        if self._read_offset == self._prefix_offset:
            return ""
        return self._decode(self._ids[self._prefix_offset : self._read_offset])

    def _cut(self, prefix_text: str, text: str) -> int:
        """Where the new text starts in the window's text."""
        if self._prompt_whole_chars is None:
            return len(prefix_text)
        return max(self._prompt_whole_chars, _common_prefix_length(prefix_text, text))

    def _advance(self, text: str, cut: int, end: int) -> str:
        if self._prompt_whole_chars is None:
            self._prefix_offset = self._read_offset
        else:  # the prompt may end mid-character: keep the window on the boundary found before it
            self._prompt_whole_chars = None
        self._read_offset = end
        self._shrink_window()
        return text[cut:]

    def _shrink_window(self) -> None:
        """Moves the window's start up to the last few emitted ids, and drops every id before it.

        The new start is found as for a prompt's window: a start whose text does not open with U+FFFD is
        on a whole character. When none is (a run of invalid bytes), the start stays where it was; it is
        the previous push's end, so the window is still only the last push's ids."""
        emitted = self._read_offset - self._prefix_offset
        if emitted > MAX_CONTEXT_IDS:
            lowest = self._read_offset - PROMPT_CONTEXT_TOKENS
            for start in range(lowest, lowest - MAX_INCOMPLETE_TOKENS - 1, -1):
                if not self._decode(self._ids[start : self._read_offset]).startswith(REPLACEMENT_CHAR):
                    self._prefix_offset = start
                    break
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0

    def _prompt_window(self) -> tuple[int, int]:
        """(window start, length of the window's whole-character prompt text) over the prompt's end.

        A window opening mid-character decodes to U+FFFD there (with byte fallback, its whole run of
        byte tokens does), so the start may step back a few ids. The search also tries ends a few ids
        short of the prompt's, because an incomplete last character can make a good start look bad.
        A U+FFFD at the start that no step back removes is a literal one (or invalid bytes).
        """
        n = len(self._ids)
        for read in range(n, max(n - MAX_INCOMPLETE_TOKENS - 1, 0), -1):
            lowest = max(read - PROMPT_CONTEXT_TOKENS, 0)
            for start in range(lowest, max(lowest - MAX_INCOMPLETE_TOKENS - 1, -1), -1):
                text = self._decode(self._ids[start:read])
                if not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                    return start, len(text)
        return max(n - PROMPT_CONTEXT_TOKENS, 0), 0
