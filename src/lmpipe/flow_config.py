"""The ``flow`` section of params.yaml: limits of the Prefect flow (``pipelines/flow.py``).

Not a stage: no DVC stage reads it, so changing it reruns nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lmpipe.config import Section
from lmpipe.errors import ConfigError


class FlowConfig(Section):
    """How long each stage of a flow run may take, and what a second run in the same checkout does."""

    stage_timeout_s: float = Field(
        21600.0, gt=0,
        description="Seconds a stage may run before the flow stops it (its whole process tree: SIGINT, "
        "then SIGKILL) and fails the run, so a hung stage cannot block later scheduled runs.",
    )
    stage_timeouts: dict[str, float] = Field(
        default_factory=dict,
        description="Per-stage limits in seconds that replace stage_timeout_s; keys are stage names of "
        "dvc.yaml ('pretrain', 'finetune@sft'), a foreach group ('finetune') or 'promote'.",
    )
    concurrency: Literal["wait", "fail"] = Field(
        "wait",
        description="When another flow run is running in the same checkout: 'wait' for it to finish, or "
        "'fail' at once with a message naming it.",
    )
    wait_timeout_s: float = Field(
        21600.0, gt=0, description="With concurrency 'wait': fail after waiting this many seconds."
    )

    @field_validator("stage_timeouts")
    @classmethod
    def _positive(cls, limits: dict[str, float]) -> dict[str, float]:
        bad = [stage for stage, seconds in limits.items() if not seconds > 0]
        if bad:
            raise ValueError(f"{bad[0]}: a timeout must be > 0 seconds")
        return limits

    def timeout_for(self, stage: str) -> float:
        """The limit of ``stage``: its own, else its foreach group's (``finetune`` for ``finetune@sft``)."""
        for key in (stage, stage.split("@", 1)[0]):
            if key in self.stage_timeouts:
                return self.stage_timeouts[key]
        return self.stage_timeout_s

    def check_stages(self, stages: list[str], where: str = "params.yaml") -> None:
        """Raise ConfigError naming a ``stage_timeouts`` key that is no stage of ``stages``."""
        known = {"promote", *stages, *(s.split("@", 1)[0] for s in stages)}
        for key in self.stage_timeouts:
            if key not in known:
                raise ConfigError(f"{where}: flow.stage_timeouts.{key}: no such stage "
                                  f"(stages: {', '.join(sorted(known))})")
