"""`tokenwire-tokenizer`: run the tokenizer service. Flag defaults come from TokenizerServiceConfig; each
flag can also be set through the environment as TOKENWIRE_<FLAG> (cli_env.py)."""
from __future__ import annotations

import argparse
import asyncio
from dataclasses import fields

from tokenwire.tokenizer.cli_env import apply_env_defaults
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.logging_setup import add_logging_arguments, configure_logging
from tokenwire.tokenizer.server import serve

_HELP = {
    "model": "resolver name (smollm2-135m), local folder or hub id",
    "host": "interface to bind; 0.0.0.0 for other machines",
    "port": "port to bind; 0 picks a free one (logged)",
    "max_message_bytes": "gRPC send/receive message size limit",
    "max_batch_size": "most texts per BatchEncode",
    "inline_work_limit": "requests up to this many chars/ids run on the event loop, bigger in a thread",
    "drain_grace_s": "seconds in-flight RPCs get to finish after SIGTERM",
    "metrics_port": "Prometheus /metrics port on --host; 0 picks a free one, -1 turns it off",
    "trust_remote_code": "allow code shipped with the checkpoint",
    "tls_cert": "PEM certificate chain; with --tls-key, serve TLS instead of plaintext",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; also require client certificates signed by it (mutual TLS)",
    "auth_token": "require 'authorization: Bearer TOKEN' on every RPC but health (prefer the env variable)",
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
    add_logging_arguments(parser)
    apply_env_defaults(parser)  # every flag can also be set as TOKENWIRE_<FLAG>
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(**{f.name: getattr(args, f.name) for f in fields(TokenizerServiceConfig)})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    asyncio.run(serve(config_from_args(args)))


if __name__ == "__main__":
    main()
