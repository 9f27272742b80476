"""One chat choice's text, read as it streams: reasoning split off first (`--reasoning-parser`), then
tool calls parsed out of the content (`tools`); what is left is `content`. The same reader builds the
streamed deltas and the whole message, so the one concatenates to the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwire.gateway import reasoning, tool_parsers
from tokenwire.gateway.reasoning import Split, ThinkParser
from tokenwire.gateway.tool_parsers import CallDelta, HermesParser, ParsedDelta


@dataclass
class ChoiceDelta:
    content: str = ""
    reasoning: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def body(self) -> dict:
        """OpenAI's `delta`: only the fields this chunk adds."""
        out: dict = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.calls:
            out["tool_calls"] = [_call_delta(c) for c in _coalesced(self.calls)]
        return out


class ChoiceReader:
    def __init__(self, think: ThinkParser | None, tools: HermesParser | None):
        self._think, self._tools = think, tools
        self._message = ChoiceDelta()

    @property
    def called(self) -> bool:
        return self._tools is not None and self._tools.called

    def feed(self, text: str) -> ChoiceDelta:
        return self._merge(self._think.feed(text) if self._think else Split(content=text), final=False)

    def finish(self) -> ChoiceDelta:
        return self._merge(self._think.finish() if self._think else Split(), final=True)

    def message(self) -> dict:
        """The whole message of what was read (after `finish`)."""
        calls: dict[int, dict] = {}
        for c in self._message.calls:
            call = calls.setdefault(
                c.index, {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            )
            call["function"]["arguments"] += c.arguments
        content = self._message.content
        body: dict = {"role": "assistant", "content": content if content or not calls else None}
        if self._message.reasoning:
            body["reasoning_content"] = self._message.reasoning
        if calls:
            body["tool_calls"] = list(calls.values())
        return body

    def _merge(self, split: Split, final: bool) -> ChoiceDelta:
        parsed = ParsedDelta(split.content)
        if self._tools is not None:
            parsed = self._tools.feed(split.content)
            if final:
                parsed.add(self._tools.finish())
        delta = ChoiceDelta(parsed.content, split.reasoning, parsed.calls)
        self._message.content += delta.content
        self._message.reasoning += delta.reasoning
        self._message.calls += delta.calls
        return delta


def reader_factory(reasoning_parser: str, tool_parser: str | None) -> Callable[[], ChoiceReader]:
    return lambda: ChoiceReader(
        reasoning.make(reasoning_parser), tool_parsers.make(tool_parser) if tool_parser else None
    )


def _coalesced(calls: list[CallDelta]) -> list[CallDelta]:
    """One entry per call in a chunk: its head (if in this chunk) and its fragments joined."""
    out: list[CallDelta] = []
    for c in calls:
        if out and out[-1].index == c.index and c.id is None:
            out[-1] = CallDelta(c.index, out[-1].id, out[-1].name, out[-1].arguments + c.arguments)
        else:
            out.append(c)
    return out


def _call_delta(c: CallDelta) -> dict:
    out: dict = {"index": c.index}
    if c.id is not None:
        out |= {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
    else:
        out["function"] = {"arguments": c.arguments}
    return out
