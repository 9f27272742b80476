"""`--tool-call-parser`: the function calls in a model's text, read as it streams.

`hermes` (the default) reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, the format
of Hermes, Qwen2.5/3 and the shipped `chatml-tools` template; the gateway's forced calls (`tool_choice`
`required` or a named function) are constrained to exactly that format, so they are read the same way.
A parser is fed each text chunk and says what it adds: content, and per call its id and name once,
then argument fragments. It reads the same whatever the chunking (tags cut across chunks are held
back), so a stream's deltas concatenate to the non-streamed message.

When a call opens as `{"name": "<name>", "arguments": {` its arguments stream as they arrive (the last
`}` and any whitespace held back: they may close the outer object); any other shape is parsed whole when
`</tool_call>` arrives. A block that is not a JSON object with a name is returned as content. Whitespace
around calls is not content. `llama3_json` reads Llama 3's bare JSON calls (see its class).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from tokenwire.gateway.streaming_text import partial_tag_length, split_at_tag

# The streamable head of a call, matched only once the arguments' opening brace has arrived (arguments
# given as a JSON string are parsed whole instead).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')
# What may still close the call's outer object: held back until the call ends.
_CLOSING = re.compile(r"\s*(?:\}\s*)?\Z")
_FINAL_CLOSE = re.compile(r"\s*\}\s*\Z")


@dataclass
class CallDelta:
    """One call's piece of a chunk: `id` and `name` come once, first; `arguments` is a fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: ParsedDelta) -> ParsedDelta:
        self.content += other.content
        self.calls += other.calls
        return self


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class HermesParser:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self._in_call = False
        self._buffer = ""  # unreleased text: a partial tag, or the call's body so far
        self._whitespace = ""  # content whitespace held until non-whitespace content follows
        self._calls = 0
        self._streaming: tuple[int, int] | None = None  # (where the arguments start, how much was sent)

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self._buffer += text
        while True:
            if not self._in_call:
                before, tag, self._buffer = split_at_tag(self._buffer, self.OPEN)
                out.content += self._content(before)
                if tag is None:
                    return out
                self._whitespace, self._in_call = "", True  # whitespace before a call is not content
            else:
                body, tag, after = split_at_tag(self._buffer, self.CLOSE)
                if tag is None:
                    out.add(
                        self._body_so_far(
                            self._buffer[: len(self._buffer) - partial_tag_length(self._buffer, self.CLOSE)]
                        )
                    )
                    return out
                out.add(self._end_call(body))
                self._buffer, self._in_call = after, False

    def finish(self) -> ParsedDelta:
        """Flushes what was held: an unclosed call ends with the text; trailing whitespace is dropped
        once a call was made."""
        if self._in_call:  # cut short (max_tokens): a partial closing tag is not part of the call
            body = self._buffer[: len(self._buffer) - partial_tag_length(self._buffer, self.CLOSE)]
            out = self._end_call(body, closed=False)
        else:
            out = ParsedDelta(self._content(self._buffer))
        self._buffer = ""
        if not self.called:
            out.content += self._whitespace
        self._whitespace = ""
        return out

    def _content(self, text: str) -> str:
        text = self._whitespace + text
        kept = text.rstrip()
        self._whitespace = text[len(kept) :]
        return kept

    def _body_so_far(self, body: str) -> ParsedDelta:
        """A call still open: its head once it is whole, then its arguments as far as they are sure."""
        out = ParsedDelta()
        if self._streaming is None:
            head = _HEAD.match(body)
            if head is None:
                return out
            self._streaming = (head.end(), 0)
            out.calls.append(CallDelta(self._calls, call_id(), json.loads(f'"{head.group(1)}"')))
        start, sent = self._streaming
        arguments = body[start:]
        cut = max(_CLOSING.search(arguments).start(), sent)
        if cut > sent:
            out.calls.append(CallDelta(self._calls, arguments=arguments[sent:cut]))
            self._streaming = (start, cut)
        return out

    def _end_call(self, body: str, closed: bool = True) -> ParsedDelta:
        out = self._body_so_far(body)
        if self._streaming is not None:
            start, sent = self._streaming
            arguments = body[start:]
            close = _FINAL_CLOSE.search(arguments)
            end = max(close.start() if close else len(arguments), sent)
            if end > sent:
                out.calls.append(CallDelta(self._calls, arguments=arguments[sent:end]))
            self._calls, self._streaming = self._calls + 1, None
            return out
        call = _whole_call(body)
        if call is None:  # not a call after all: the model's text, as it wrote it
            out.content += self._content(self.OPEN + body + (self.CLOSE if closed else ""))
            return out
        out.calls.append(CallDelta(self._calls, call_id(), *call))
        self._calls += 1
        return out


def _whole_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call body in any key order, or None if it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return call["name"], text


class Llama3JsonParser:
    """Llama 3.1/3.2's JSON calls: an output that opens with `{` (after an optional `<|python_tag|>`) is
    one or more `{"name": ..., "parameters": {...}}` objects separated by `;`, parsed whole at the end
    (each call then comes in one delta); any other output is content, streamed as it comes."""

    TAG = "<|python_tag|>"

    def __init__(self):
        self._state = "start"  # start -> calls | content
        self._buffer = ""
        self._calls = 0

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> ParsedDelta:
        self._buffer += text
        if self._state == "start":
            head = self._buffer.lstrip()
            if head.startswith(self.TAG):
                head = head[len(self.TAG) :].lstrip()
            if not head or self.TAG.startswith(head):
                return ParsedDelta()  # not yet known
            self._state = "calls" if head.startswith("{") else "content"
        if self._state == "content":
            text, self._buffer = self._buffer, ""
            return ParsedDelta(text)
        return ParsedDelta()

    def finish(self) -> ParsedDelta:
        text, self._buffer = self._buffer, ""
        if self._state != "calls":
            return ParsedDelta(text)
        body = text.lstrip().removeprefix(self.TAG)
        calls = [_whole_call(part) for part in _split_objects(body)]
        if not calls or None in calls:
            return ParsedDelta(text)  # not calls after all: the model's text
        out = ParsedDelta()
        for name, arguments in calls:
            out.calls.append(CallDelta(self._calls, call_id(), name, arguments))
            self._calls += 1
        return out


def _split_objects(text: str) -> list[str]:
    """`{...}; {...}` -> the objects' texts (a `;` inside a string or an object does not split)."""
    decoder, parts, at = json.JSONDecoder(), [], 0
    while at < len(text):
        at = len(text) - len(text[at:].lstrip(" \n\t;"))
        if at >= len(text):
            break
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return [text]  # the whole text, which _whole_call then refuses
        parts.append(text[at:end])
        at = end
    return parts


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def make(name: str) -> HermesParser | Llama3JsonParser:
    return PARSERS[name]()
