"""A chat request's `tools` and `tool_choice`: what the template is given, and how the output is read.

`none`: the template still lists the tools, the output is plain content. `auto` (the default with tools):
the `--tool-call-parser` reads calls out of the output. `required` or a named function: the output is
constrained by a grammar (llguidance, in the engine's sampler) to `<tool_call>` blocks whose arguments are
valid JSON of the function's schema; one block, or several with `parallel_tool_calls`, and then the
Hermes parser reads them whatever `--tool-call-parser` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenwire.gateway.errors import bad_request
from tokenwire.gateway.protocol import ChatCompletionRequest, NamedToolChoice, Tool

# An object with no declared properties (OpenAI's default when a function gives no parameters).
_NO_PARAMETERS = {"type": "object", "properties": {}}
# Compact JSON: a small model otherwise pads the arguments with whitespace (as structured output does).
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[dict, ...]  # as the template gets them (OpenAI's shape)
    parser: str | None  # the parser that reads the output; None: plain content
    grammar: str | None  # the constraint of a forced call (a Lark grammar); None: unconstrained


def plan(req: ChatCompletionRequest, parser: str) -> ToolPlan:
    """The request's plan; a 400 naming `tools` or `tool_choice` for a choice the tools cannot meet."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice", "needs tools")
        return ToolPlan((), None, None)
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise bad_request("tools", "function names must be unique")
    rendered = tuple(t.model_dump(exclude_none=True) for t in tools)
    if choice == "none":
        return ToolPlan(rendered, None, None)
    if choice == "auto":
        return ToolPlan(rendered, parser, None)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request("tool_choice", f"names function {choice.function.name!r}, which tools do not list")
        forced = [t for t in tools if t.function.name == choice.function.name]
        return ToolPlan(rendered, "hermes", call_grammar(forced, parallel=False))
    return ToolPlan(rendered, "hermes", call_grammar(tools, parallel=req.parallel_tool_calls))


def call_grammar(tools: list[Tool], parallel: bool) -> str:
    """A Lark grammar of one `<tool_call>` block (or several, newline-separated) calling one of `tools`
    with arguments that validate against its parameters' schema."""
    rules = []
    for i, tool in enumerate(tools):
        head = '<tool_call>\n{"name": ' + json.dumps(tool.function.name, ensure_ascii=False) + ', "arguments": '
        schema = dict(tool.function.parameters or _NO_PARAMETERS) | _COMPACT
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps(chr(125) + chr(10) + '</tool_call>')}")
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, f"call: {calls}", *rules])
