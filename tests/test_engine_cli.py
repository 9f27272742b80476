"""The engine's CLI and wire types stay in step with the engine's dataclasses (no model is loaded)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from tokenwire.engine.cli import build_parser, configs_from_args
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.engine.core.openmp import (
    DEFAULT_SPIN_COUNT,
    apply_openmp_defaults,
    cgroup_quota_cores,
    usable_cores,
)
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


def test_openmp_threads_spin_briefly_on_the_cores_they_may_use_unless_told_otherwise():
    environ: dict[str, str] = {}
    settings = apply_openmp_defaults(environ)
    assert environ == {"GOMP_SPINCOUNT": str(DEFAULT_SPIN_COUNT), "OMP_NUM_THREADS": str(usable_cores())}
    assert settings.chosen_by == "tokenwire" and settings.wait_policy is None
    for operator in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}, {"KMP_BLOCKTIME": "0"}):
        environ = dict(operator, OMP_NUM_THREADS="3")
        assert apply_openmp_defaults(environ).chosen_by == "operator"
        assert environ == dict(operator, OMP_NUM_THREADS="3")  # the operator's choices win, none added


def test_a_cgroup_cpu_quota_caps_the_thread_count(tmp_path):
    assert cgroup_quota_cores("max 100000\n") is None
    assert cgroup_quota_cores("200000 100000\n") == 2
    assert cgroup_quota_cores("150000 100000") == 2  # 1.5 CPUs of quota: two threads, rounded up
    assert cgroup_quota_cores("50000 100000") == 1
    assert cgroup_quota_cores("") is None and cgroup_quota_cores("garbage") is None
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")
    assert usable_cores(cpu_max) == 1
    assert usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_the_cli_leaves_torch_unloaded_so_the_openmp_defaults_take_effect():
    code = "import sys, tokenwire.engine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
