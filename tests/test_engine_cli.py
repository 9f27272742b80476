"""The engine's CLI and wire types stay in step with the engine's dataclasses (no model is loaded)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from tokenwire.engine.cli import build_parser, configs_from_args, prefer_sleeping_omp_waits
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.engine.edge import convert
from tokenwire.engine.request.sampling_params import Constraint, SamplingParams
from tokenwire.v1 import engine_pb2 as pb


def test_cli_flags_come_from_the_config_dataclasses():
    parser = build_parser()
    engine, server = configs_from_args(parser.parse_args(["--model", "m"]))
    assert (engine, server) == (EngineConfig(model="m"), ServerConfig())
    engine, server = configs_from_args(
        parser.parse_args(
            [
                "--model",
                "m",
                "--port",
                "0",
                "--num-blocks",
                "8",
                "--no-enable-prefix-cache",
                "--max-num-seqs",
                "4",
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
            ]
        )
    )
    assert engine == EngineConfig(
        model="m",
        dtype="float32",
        max_model_len=512,
        cache=CacheConfig(num_blocks=8, enable_prefix_cache=False),
        scheduler=SchedulerConfig(max_num_seqs=4),
    )
    assert server.port == 0
    assert "tokens per KV block" in parser.format_help()  # help text is the dataclass field's comment


def test_proto_sampling_params_mirror_the_engine_dataclass():
    constraints = {f.name for f in pb.SamplingParams.DESCRIPTOR.oneofs_by_name["constraint"].fields}
    assert set(pb.SamplingParams.DESCRIPTOR.fields_by_name) - constraints | {"constraint"} == {
        f.name for f in dataclasses.fields(SamplingParams)
    }  # the oneof is one Constraint field
    assert convert.sampling_params(pb.SamplingParams(choice=pb.Choice(values=["a", "b"]))).constraint == Constraint(
        "choice", ("a", "b")
    )
    assert convert.sampling_params(pb.SamplingParams(json_object=False)).constraint is None
    assert convert.sampling_params(pb.SamplingParams()) == SamplingParams()
    assert convert.sampling_params(pb.SamplingParams(temperature=0.0, stop=["\n"], logprobs=0)) == SamplingParams(
        temperature=0.0, stop=("\n",), logprobs=0
    )


def test_openmp_threads_sleep_unless_told_otherwise():
    assert prefer_sleeping_omp_waits(environ := {}) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert prefer_sleeping_omp_waits({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"  # the operator's choice wins
    # It only takes effect if torch (and with it libgomp) is not loaded before main() sets it.
    code = "import sys, tokenwire.engine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
