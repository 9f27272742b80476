"""`tokenwire-tokenizer`: run the tokenizer service. Flag defaults come from TokenizerServiceConfig; each
flag can also be set through the environment as TOKENWIRE_<FLAG> (cli_env.py)."""

from __future__ import annotations

import argparse
import asyncio

from tokenwire.serving.cli_env import config_values, service_parser
from tokenwire.serving.logging_setup import configure_logging
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import serve


def build_parser() -> argparse.ArgumentParser:
    return service_parser("tokenwire-tokenizer", "tokenwire tokenizer gRPC service", TokenizerServiceConfig)


def config_from_args(args: argparse.Namespace) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(**config_values(args, TokenizerServiceConfig))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    asyncio.run(serve(config_from_args(args)))


if __name__ == "__main__":
    main()
