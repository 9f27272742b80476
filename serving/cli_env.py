"""Service flags: generated from config dataclasses, and settable from the environment.

Each field of a config dataclass becomes a flag (`max_num_seqs` -> `--max-num-seqs`) whose default is the
field's default and whose help is the field's trailing `# comment`, so the dataclasses stay the single
source of defaults and a new field gets its flag for free.

Every flag can also come from the environment: `--max-num-seqs 8` == `TOKENWIRE_MAX_NUM_SEQS=8`.
Containers are configured with environment variables and command flags only; a flag given on the
command line wins over its variable, and a variable wins over the built-in default. A malformed value is
reported like a malformed flag, naming the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Collection, Mapping

ENV_PREFIX = "TOKENWIRE_"
SECRET_FLAGS = frozenset({"auth_token", "upstream_auth_token"})  # `--help` never prints their values
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def add_config_flags(group, cls, skip: Collection[str] = ()) -> None:
    """One flag per field of the dataclass `cls` (but those in `skip`), on a parser or argument group."""
    hints = typing.get_type_hints(cls)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name, "")
            )
        else:
            group.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper(), help=helps.get(f.name, ""))


def service_parser(prog: str, description: str, cls) -> argparse.ArgumentParser:
    """The whole command line of a service with one config dataclass: its flags, the logging flags, and
    TOKENWIRE_<FLAG> environment defaults for every one of them."""
    from tokenwire.serving.logging_setup import add_logging_arguments

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_config_flags(parser, cls)
    add_logging_arguments(parser)
    apply_env_defaults(parser)
    return parser


def config_values(args: argparse.Namespace, cls, skip: Collection[str] = ()) -> dict:
    """The parsed values of `cls`'s flags, as keyword arguments for `cls`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip}


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field, from the dataclass source and its bases' (a subclass that
    redeclares a field, to change its default, may also give it a new comment)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            lines = inspect.getsource(klass).splitlines()
            comments |= {m[1]: m[2].replace("%", "%%") for m in map(_COMMENT.match, lines) if m}
    return comments


def _scalar_type(hint) -> type:
    """`int | None` -> int: an optional field's flag takes the plain type and defaults to None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


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
