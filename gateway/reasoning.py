"""`--reasoning-parser`: splits a model's thinking (`reasoning_content`) from its answer (`content`).

The `<think>...</think>` families: `qwen3` reasons only when the output opens with `<think>` (with
`enable_thinking: false` its template writes an empty think block into the prompt, and all output is the
answer); `deepseek_r1` reasons from the start until `</think>` (its template opens the block in the
prompt, so the output may not repeat `<think>`). Text is read as it streams, with tags cut across chunks
held back, so any split of the same text gives the same reasoning and content: the streamed deltas
concatenate to the non-streamed fields. Whitespace right after `</think>` is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tokenwire.gateway.streaming_text import split_at_tag

OPEN, CLOSE = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ThinkParser:
    """One choice's text; `feed` each chunk, then `finish` once."""

    def __init__(self, opening_required: bool):
        self._state = "start"  # start -> reasoning -> after -> content
        self._opening_required = opening_required
        self._held = ""

    def feed(self, text: str) -> Split:
        out = Split()
        text, self._held = self._held + text, ""
        while text:
            if self._state == "start":
                if text.startswith(OPEN):
                    text, self._state = text[len(OPEN) :], "reasoning"
                elif OPEN.startswith(text):  # maybe the opening tag, not all here yet
                    self._held = text
                    return out
                else:
                    self._state = "content" if self._opening_required else "reasoning"
            elif self._state == "reasoning":
                before, tag, after = split_at_tag(text, CLOSE)
                out.reasoning += before
                if tag is None:
                    self._held = after
                    return out
                text, self._state = after, "after"
            elif self._state == "after":
                text = text.lstrip()
                if text:
                    self._state = "content"
            else:
                out.content += text
                text = ""
        return out

    def finish(self) -> Split:
        """What was held back, as whatever it would have been without a tag following."""
        held, self._held = self._held, ""
        if self._state == "reasoning" or (self._state == "start" and not self._opening_required):
            return Split(reasoning=held)
        return Split(content=held)


PARSERS = {"qwen3": True, "deepseek_r1": False}  # name -> whether the output must open with <think>


def make(name: str) -> ThinkParser | None:
    """The parser `--reasoning-parser name` names; None for "" (no split)."""
    return ThinkParser(PARSERS[name]) if name else None


# ---- constraints on the answer only ----

# The engine's JSON options (engine_service/request/grammar.py), carried inside a `%json` rule.
_JSON_OPTIONS = {"x-guidance": {"whitespace_flexible": False}}


def answer_only(option: dict, parser_name: str) -> dict:
    """A structured-output or forced-call constraint (the SDK's `{"json_schema": ...}`, `{"json_object": True}`
    or `{"grammar": <Lark>}`) as
    one Lark grammar that lets the model think first, freely, and holds only the answer to the constraint:
    `<think>` (required to open the block for qwen3, already opened by the prompt for deepseek_r1), any
    text up to the first `</think>` (a lazy lexeme), whitespace, then the answer."""
    if PARSERS[parser_name]:  # the output opens the block itself, or does not think at all
        start = 'start: (think WS?)? answer\nthink: "<think>" think_text'
    else:  # the prompt opened the block: think text first, always
        start = "start: think_text WS? answer"
    rules = [start, 'think_text[lazy]: THINK_TEXT "</think>"', "THINK_TEXT: /(.|\\n)*/", "WS: /[ \\t\\n]+/"]
    return {"grammar": "\n".join([*rules, *_answer_rules(option)])}


def _answer_rules(option: dict) -> list[str]:
    if "json_schema" in option or "json_object" in option:
        schema = _schema(option["json_schema"]) if "json_schema" in option else {"type": "object"}
        return [f"answer: %json {json.dumps(schema | _JSON_OPTIONS, ensure_ascii=False)}"]
    # a forced call's Lark grammar: its start rule becomes the answer rule
    return [re.sub(r"^start:", "answer:", option["grammar"], count=1, flags=re.MULTILINE)]


def _schema(spec) -> dict:
    schema = json.loads(spec) if isinstance(spec, str) else spec
    return schema if isinstance(schema, dict) else {}
