"""The docs hold together. docs/configuration.md is the CLIs' own flags: every flag, variable, default and
help text, in order (a new config field without its row, or a stale row, fails here). README.md stays the
newcomer's page (at most 300 lines), and every relative link in README.md and docs/ leads to a file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from tokenwire.engine.cli import build_parser as engine_parser
from tokenwire.gateway.cli import build_parser as gateway_parser
from tokenwire.serving.cli_env import SECRET_FLAGS, env_name
from tokenwire.tokenizer.cli import build_parser as tokenizer_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 300


def flag_table(parser) -> list[str]:
    """The markdown rows the configuration reference gives for `parser`'s flags."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:  # argparse has no public iterator over its actions
        name = env_name(action)
        if name is None:
            continue
        flags = " / ".join(f"`{s}`" for s in action.option_strings if s.startswith("--"))
        default = action.default
        shown = (
            "empty" if action.dest in SECRET_FLAGS or default == "" else "none" if default is None else f"`{default}`"
        )
        meaning = re.sub(r"\s*\[env: .*", "", action.help or "")
        meaning = meaning.replace("(default: %(default)s)", "").replace("%%", "%").strip()
        rows.append(f"| {flags} | `{name}` | {shown} | {meaning} |")
    return rows


def docs_table(heading: str) -> list[str]:
    text = CONFIGURATION.read_text()
    start = text.index("| flag |", text.index(heading))
    return text[start : text.index("\n\n", start)].splitlines()


@pytest.mark.parametrize(
    "heading, parser",
    [
        ("### `tokenwire-tokenizer`", tokenizer_parser),
        ("### `tokenwire-engine`", engine_parser),
        ("### `tokenwire-gateway`", gateway_parser),
    ],
)
def test_configuration_reference_matches_the_cli(heading, parser, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("TOKENWIRE_")]:
        monkeypatch.delenv(variable)  # the table shows built-in defaults
    assert docs_table(heading) == flag_table(parser())


def test_readme_is_a_newcomers_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    targets = [m.group(1).split("#")[0] for m in _LINK.finditer(page.read_text())]
    local = [t for t in targets if t and not t.startswith(("http://", "https://", "mailto:"))]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert missing == []
