"""Helpers for parsers that read a model's text as it streams: tags may arrive cut across chunks."""

from __future__ import annotations


def partial_tag_length(text: str, tag: str) -> int:
    """How many of `text`'s last characters could be the start of `tag` (held back until the next chunk
    tells whether the tag follows)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_at_tag(text: str, tag: str) -> tuple[str, str | None, str]:
    """(before, tag or None, after): the text before the first whole `tag` and what follows it; without
    one, `before` is what can be released now and `after` the held-back partial tag."""
    at = text.find(tag)
    if at >= 0:
        return text[:at], tag, text[at + len(tag) :]
    held = partial_tag_length(text, tag)
    return text[: len(text) - held], None, text[len(text) - held :]
