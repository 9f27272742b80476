"""Deliberate failures, for testing that one broken request cannot take the engine down. Off by default.

No valid request makes the engine fail (the edge validates everything), so the failure paths need a
switch: `TOKENWIRE_FAULT_INJECT="postprocess:poison-,forward:crash-"` makes post-processing raise for
requests whose id starts with `poison-`, and the batched forward raise for any step that holds a
request whose id starts with `crash-`. The exceptions are raised where real ones would be (inside the
step), so everything after them is the production code path. Read once, when the engine starts; a
malformed value stops the engine from starting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ENV_VAR = "TOKENWIRE_FAULT_INJECT"
STAGES = ("forward", "postprocess")


class InjectedFault(RuntimeError):
    """The failure TOKENWIRE_FAULT_INJECT asked for."""


@dataclass(frozen=True)
class FaultInjector:
    rules: tuple[tuple[str, str], ...]  # (stage, request-id prefix)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultInjector | None:
        spec = environ.get(ENV_VAR, "").strip()
        return cls.parse(spec) if spec else None

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        rules = []
        for item in spec.split(","):
            stage, sep, prefix = item.strip().partition(":")
            if not sep or stage not in STAGES or not prefix:
                raise ValueError(
                    f"{ENV_VAR}: expected 'stage:request-id-prefix' items with stage in {STAGES}, got {item!r}"
                )
            rules.append((stage, prefix))
        return cls(tuple(rules))

    def check(self, stage: str, request_ids: Iterable[str]) -> None:
        """Raise InjectedFault if a rule for `stage` matches one of `request_ids`."""
        prefixes = tuple(prefix for s, prefix in self.rules if s == stage)
        for request_id in request_ids:
            if prefixes and request_id.startswith(prefixes):
                raise InjectedFault(f"injected {stage} fault for {request_id}")
