"""`tokenwire-tokenizer`: run the tokenizer service. Flag defaults come from TokenizerServiceConfig."""
from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import fields

from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import serve

_HELP = {
    "model": "resolver name (smollm2-135m), local folder or hub id",
    "host": "interface to bind; 0.0.0.0 for other machines",
    "port": "port to bind; 0 picks a free one (logged)",
    "max_message_bytes": "gRPC send/receive message size limit",
    "max_batch_size": "most texts per BatchEncode",
    "inline_work_limit": "requests up to this many chars/ids run on the event loop, bigger in a thread",
    "grace_period_s": "seconds in-flight RPCs get to finish on shutdown",
    "trust_remote_code": "allow code shipped with the checkpoint",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire-tokenizer", description="tokenwire tokenizer gRPC service")
    defaults = TokenizerServiceConfig()
    for f in fields(TokenizerServiceConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP[f.name])
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{_HELP[f.name]} (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(**{f.name: getattr(args, f.name) for f in fields(TokenizerServiceConfig)})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config_from_args(args)))


if __name__ == "__main__":
    main()
