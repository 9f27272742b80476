"""`tokenwire-tokenizer`: run the tokenizer service. Flag defaults come from TokenizerServiceConfig; each
flag can also be set through the environment as TOKENWIRE_<FLAG> (cli_env.py)."""
from __future__ import annotations

import argparse
import asyncio

from tokenwire.serving.cli_env import add_config_flags, apply_env_defaults, config_values
from tokenwire.serving.logging_setup import add_logging_arguments, configure_logging
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire-tokenizer", description="tokenwire tokenizer gRPC service",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser, TokenizerServiceConfig)
    add_logging_arguments(parser)
    apply_env_defaults(parser)  # every flag can also be set as TOKENWIRE_<FLAG>
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(**config_values(args, TokenizerServiceConfig))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    asyncio.run(serve(config_from_args(args)))


if __name__ == "__main__":
    main()
