"""Every service flag can also come from the environment: `--max-num-seqs 8` == `TOKENWIRE_MAX_NUM_SEQS=8`.

Containers are configured with environment variables and command flags only; a flag given on the
command line wins over its variable, and a variable wins over the built-in default. A malformed value is
reported like a malformed flag, naming the variable.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

ENV_PREFIX = "TOKENWIRE_"
SECRET_FLAGS = frozenset({"auth_token"})  # `--help` never prints their values
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(action: argparse.Action) -> str | None:
    """`--max-num-seqs` -> `TOKENWIRE_MAX_NUM_SEQS`; None for actions without a long flag (help)."""
    longs = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
    if not longs or action.dest == "help":
        return None
    return ENV_PREFIX + longs[0][2:].replace("-", "_").upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Turn each set `TOKENWIRE_<FLAG>` into that flag's default, and name the variable in --help."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse has no public iterator over its actions
        name = env_name(action)
        if name is None:
            continue
        action.help = f"{action.help or ''} [env: {name}]".strip()
        if action.dest in SECRET_FLAGS:
            # "%(default).0s" prints nothing and stops ArgumentDefaultsHelpFormatter adding the value.
            action.help = action.help.replace("(default: %(default)s)", "").strip() + "%(default).0s"
        if name in environ:
            action.default = _convert(parser, action, name, environ[name])


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str):
    if isinstance(action, argparse.BooleanOptionalAction):
        value = raw.strip().lower()
        if value in _TRUE | _FALSE:
            return value in _TRUE
        parser.error(f"{name}: expected one of {sorted(_TRUE | _FALSE)}, got {raw!r}")
    try:
        value = action.type(raw) if action.type is not None else raw
    except (TypeError, ValueError):
        parser.error(f"{name}: invalid {getattr(action.type, '__name__', 'value')} {raw!r}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{name}: {value!r} is not one of {list(action.choices)}")
    return value
