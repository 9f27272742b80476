"""Chat templates: the `--chat-template` override and what a template can render.

`--chat-template` is a file, or the name of a template shipped in tokenizer_service/templates/ (for
example `chatml-tools`, the tool-aware ChatML for SmolLM2). It replaces the tokenizer's own template
before anything else sees the tokenizer, so the fingerprint covers it: an engine started with another
template (or none) refuses the ids this service renders.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).resolve().parent / "templates"


def template_text(value: str) -> str:
    """The template that `--chat-template value` names: a file path, else a shipped template's name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    shipped = SHIPPED / f"{value}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.jinja")))
    raise ValueError(f"--chat-template {value!r}: no such file, and not a shipped template ({names})")


def apply_override(tokenizer: Any, chat_template: str) -> Any:
    """The tokenizer with its chat template replaced by `--chat-template` (unchanged when empty)."""
    if chat_template:
        tokenizer.chat_template = template_text(chat_template)
    return tokenizer


@cache
def renders_tools(template: str | None) -> bool:
    """Whether the template reads the `tools` variable at all (a template that never does would drop
    the tools silently, so such a request is refused instead)."""
    if not isinstance(template, str):
        return False
    from jinja2 import Environment, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:  # a template jinja cannot parse fails when rendered, with its own message
        return False
