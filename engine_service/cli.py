"""`tokenwire-engine --model NAME_OR_PATH --host H --port P [engine flags]`: run the engine service.

Every flag is generated from a field of the config dataclasses (ServerConfig, EngineConfig, CacheConfig,
SchedulerConfig): its default is the field's default and its help the field's comment, so the
dataclasses stay the single source of defaults and a new field gets its flag for free. As on the
tokenizer service, each flag can also be set through the environment as TOKENWIRE_<FLAG>.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import re
import types
import typing

from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.server import ServerConfig, serve
from tokenwire.tokenizer.cli_env import apply_env_defaults
from tokenwire.tokenizer.logging_setup import add_logging_arguments, configure_logging

_NESTED = {"cache": CacheConfig, "scheduler": SchedulerConfig}
_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire-engine",
                                     description="Serve a causal LM over gRPC with continuous batching.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, cls in (("server", ServerConfig), ("engine", EngineConfig), ("KV cache", CacheConfig),
                       ("scheduler", SchedulerConfig)):
        _add_fields(parser.add_argument_group(title), cls)
    add_logging_arguments(parser)
    apply_env_defaults(parser)  # TOKENWIRE_MAX_NUM_SEQS=8 == --max-num-seqs 8 (a flag wins)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    nested = {name: cls(**_values(args, cls)) for name, cls in _NESTED.items()}
    return EngineConfig(**_values(args, EngineConfig), **nested), ServerConfig(**_values(args, ServerConfig))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    engine_config, server_config = configs_from_args(args)
    asyncio.run(serve(engine_config, server_config))
    return 0


def _own_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in _NESTED]


def _values(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in _own_fields(cls)}


def _add_fields(group, cls) -> None:
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    for f in _own_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=helps.get(f.name, ""))
        else:
            group.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper(),
                               help=helps.get(f.name, ""))


def _scalar_type(hint) -> type:
    """`int | None` -> int: an optional field's flag takes the plain type and defaults to None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in the dataclass source, used as its --help text."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2].replace("%", "%%") for m in map(_COMMENT.match, lines) if m}


if __name__ == "__main__":
    raise SystemExit(main())
