"""docker-compose.yml as local processes: what a container of each service would run, run here.

`load_compose` reads the file with compose's own `${VAR:-default}` interpolation (from a mapping standing
in for the operator's shell). `ComposeProcess` starts one service's `command` with its `environment` on
free local ports: the container ports in the command (`--port`, `--metrics-port`) and in the
healthcheck's address are swapped for free ones; everything else is run exactly as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tokenwire.serving.launcher import command, free_port

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_]\w*))")
_PORT_FLAGS = ("--port", "--metrics-port")


def interpolate(value, env: Mapping[str, str]):
    """Compose-file interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m[1]:
            return "$"
        name, op, arg = m[2] or m[5], m[3], m[4]
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("-") and unset:
            return arg
        if op and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg or 'required'}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict:
    """The compose file with YAML anchors merged and variables interpolated."""
    return interpolate(yaml.safe_load(path.read_text()), {} if env is None else env)


@dataclass
class ComposeProcess:
    """One replica of a compose service, started as a local process on free ports."""

    name: str
    spec: dict  # the service's interpolated compose definition
    log_path: Path
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port
    process: subprocess.Popen | None = None

    def start(self, home: Path) -> ComposeProcess:
        argv = self._swap_ports(list(self.spec["command"]))
        argv[:1] = command(argv[0])  # the console script, as installed in the image
        env = {
            **os.environ,
            **{k: str(v) for k, v in self.spec.get("environment", {}).items()},
            "TOKENWIRE_HOME": str(home),
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def address(self, container_port: int) -> str:
        return f"127.0.0.1:{self.ports[container_port]}"

    def healthcheck_argv(self) -> list[str]:
        """The compose healthcheck's command, pointed at this process's ports."""
        test = list(self.spec["healthcheck"]["test"])
        assert test[0] == "CMD", test
        argv = [self._local_address(arg) for arg in test[1:]]
        return [sys.executable if argv[0] == "python" else argv[0]] + argv[1:]

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def _swap_ports(self, argv: list[str]) -> list[str]:
        for i, arg in enumerate(argv[:-1]):
            if arg in _PORT_FLAGS:
                container = int(argv[i + 1])
                self.ports[container] = free_port()
                argv[i + 1] = str(self.ports[container])
        return argv

    def _local_address(self, arg: str) -> str:
        host, _, port = arg.rpartition(":")
        if host in ("127.0.0.1", "localhost") and port.isdigit() and int(port) in self.ports:
            return self.address(int(port))
        return arg
