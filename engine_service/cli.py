"""`tokenwire-engine --model NAME_OR_PATH --host H --port P [engine flags]`: run the engine service.

Every flag is generated from a field of the config dataclasses (ServerConfig, EngineConfig, CacheConfig,
SchedulerConfig; see tokenwire.serving.cli_env), and, as on the tokenizer service, each flag can also be
set through the environment as TOKENWIRE_<FLAG>.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.engine.core.openmp import apply_openmp_defaults
from tokenwire.engine.edge.server import serve
from tokenwire.serving.cli_env import add_config_flags, apply_env_defaults, config_values
from tokenwire.serving.logging_setup import add_logging_arguments, configure_logging
from tokenwire.serving.server import ServiceFailed

_NESTED = {"cache": CacheConfig, "scheduler": SchedulerConfig}
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire-engine",
        description="Serve a causal LM over gRPC with continuous batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, cls in (
        ("server", ServerConfig),
        ("engine", EngineConfig),
        ("KV cache", CacheConfig),
        ("scheduler", SchedulerConfig),
    ):
        add_config_flags(parser.add_argument_group(title), cls, skip=_NESTED)
    add_logging_arguments(parser)
    apply_env_defaults(parser)  # TOKENWIRE_MAX_NUM_SEQS=8 == --max-num-seqs 8 (a flag wins)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    nested = {name: cls(**config_values(args, cls)) for name, cls in _NESTED.items()}
    return (
        EngineConfig(**config_values(args, EngineConfig, skip=_NESTED), **nested),
        ServerConfig(**config_values(args, ServerConfig)),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    log.info("OpenMP: %s", apply_openmp_defaults())  # before the core process loads torch
    engine_config, server_config = configs_from_args(args)
    try:
        asyncio.run(serve(engine_config, server_config))
    except ServiceFailed as failure:  # e.g. the engine core died: exit non-zero so that it is restarted
        log.error("tokenwire-engine stopped: %s", failure)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
