"""The README's configuration reference is the CLIs' own flags: every flag, variable, default and help
text, in order. A new config field without its README row (or a stale row) fails here."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tokenwire.engine.cli import build_parser as engine_parser
from tokenwire.gateway.cli import build_parser as gateway_parser
from tokenwire.serving.cli_env import SECRET_FLAGS, env_name
from tokenwire.tokenizer.cli import build_parser as tokenizer_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def flag_table(parser) -> list[str]:
    """The markdown rows the README gives for `parser`'s flags."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:  # argparse has no public iterator over its actions
        name = env_name(action)
        if name is None:
            continue
        flags = " / ".join(f"`{s}`" for s in action.option_strings if s.startswith("--"))
        default = action.default
        shown = "empty" if action.dest in SECRET_FLAGS or default == "" else \
            "none" if default is None else f"`{default}`"
        meaning = re.sub(r"\s*\[env: .*", "", action.help or "")
        meaning = meaning.replace("(default: %(default)s)", "").replace("%%", "%").strip()
        rows.append(f"| {flags} | `{name}` | {shown} | {meaning} |")
    return rows


def readme_table(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index("| flag |", text.index(heading))
    return text[start:text.index("\n\n", start)].splitlines()


@pytest.mark.parametrize("heading, parser", [("### `tokenwire-tokenizer`", tokenizer_parser),
                                             ("### `tokenwire-engine`", engine_parser),
                                             ("### `tokenwire-gateway`", gateway_parser)])
def test_readme_configuration_reference_matches_the_cli(heading, parser, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("TOKENWIRE_")]:
        monkeypatch.delenv(variable)  # the table shows built-in defaults
    assert readme_table(heading) == flag_table(parser())
