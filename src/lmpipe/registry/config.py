"""Config section ``register``: which models go to the MLflow registry and the promotion gate.

```yaml
register:
  models:
    - {stage: pretrain, metrics: {val_bpb: "metrics/pretrain.json:val_bpb"}}
    - {stage: finetune, task: cls, metrics: {accuracy: "metrics/finetune_cls.json:test_accuracy"}}
  gate:
    val_bpb: {direction: lower, min_improvement: 0.0}
    accuracy: {direction: higher, max_drop: 0.01}
```
A model's ``metrics`` maps a gate metric name to ``FILE:KEY`` (a JSON metrics file relative to the
project root and a key in it; dots reach into nested objects). Every metric a model names needs a
rule under ``gate``; the gate checks all of them against the current ``champion``.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, model_validator

from lmpipe.config import Section

STAGES = ("pretrain", "finetune", "distill")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class GateRule(Section):
    """How one metric decides a promotion: must improve by ``min_improvement``, or may regress by
    at most ``max_drop`` (non-inferiority), in the given direction."""

    direction: Literal["lower", "higher"] = Field(..., description="Which way is better: lower (loss, bpb) or higher (accuracy).")
    min_improvement: float | None = Field(
        None, ge=0, description="The candidate must beat the champion by at least this much (0: not worse). "
        "Used when max_drop is null; with both null it is 0.",
    )
    max_drop: float | None = Field(
        None, ge=0, description="The candidate may be worse than the champion by at most this much "
        "(a non-inferiority margin for metrics that should merely not regress).",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> GateRule:
        if self.min_improvement is not None and self.max_drop is not None:
            raise ValueError("set either min_improvement or max_drop, not both")
        for value in (self.min_improvement, self.max_drop):
            if value is not None and not math.isfinite(value):
                raise ValueError("thresholds must be finite numbers")
        return self

    def allowed_change(self) -> float:
        """The smallest acceptable ``improvement`` (candidate better than champion, in the rule's
        direction): ``min_improvement``, or ``-max_drop``."""
        if self.max_drop is not None:
            return -self.max_drop
        return self.min_improvement or 0.0


class ModelSpec(Section):
    """One model directory to register as ``<prefix>-<stage>[-<task>]``."""

    stage: Literal["pretrain", "finetune", "distill"] = Field(..., description="Stage that wrote the model.")
    task: str | None = Field(None, description="Task name (finetune: the task under models/finetune/).")
    path: str | None = Field(
        None, description="Model directory relative to the project root; null: models/<stage>[/<task>].",
    )
    metrics: dict[str, str] = Field(
        ..., min_length=1,
        description="Gate metric name -> 'FILE:KEY' in a JSON metrics file (dots reach nested keys), "
        "e.g. {val_bpb: 'metrics/pretrain.json:val_bpb'}.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.stage == "finetune" and not self.task:
            raise ValueError("a finetune model needs its task name (task: sft)")
        if self.task is not None and not re.match(NAME_PATTERN, self.task):
            raise ValueError(f"task {self.task!r} must be letters, digits, '_', '.' or '-'")
        for metric, ref in self.metrics.items():
            file, sep, key = ref.rpartition(":")
            if not sep or not file or not key:
                raise ValueError(f"metrics.{metric}: {ref!r} is not 'FILE:KEY' (e.g. metrics/pretrain.json:val_bpb)")
        return self

    def directory(self) -> str:
        if self.path is not None:
            return self.path
        return f"models/{self.stage}/{self.task}" if self.stage == "finetune" else f"models/{self.stage}"

    def registered_name(self, prefix: str) -> str:
        return f"{prefix}-{self.stage}" + (f"-{self.task}" if self.task else "")


def _default_models() -> list[ModelSpec]:
    return [ModelSpec.model_validate(spec) for spec in (
        {"stage": "pretrain", "metrics": {"val_bpb": "metrics/pretrain.json:val_bpb"}},
        {"stage": "finetune", "task": "sft", "metrics": {"dev_loss": "metrics/finetune_sft.json:dev_loss"}},
        {"stage": "finetune", "task": "cls", "metrics": {"accuracy": "metrics/finetune_cls.json:test_accuracy"}},
        {"stage": "distill", "metrics": {"val_bpb": "metrics/distill.json:val_bpb"}},
    )]


def _default_gate() -> dict[str, GateRule]:
    rules = {
        # Bits per byte does not depend on the tokenizer, so champions with other vocabularies compare fairly.
        "val_bpb": {"direction": "lower", "min_improvement": 0.0},
        "dev_loss": {"direction": "lower", "min_improvement": 0.0},
        "accuracy": {"direction": "higher", "max_drop": 0.01},
        "entity_f1": {"direction": "higher", "max_drop": 0.01},  # token classifiers (seqeval micro F1)
    }
    return {name: GateRule.model_validate(rule) for name, rule in rules.items()}


class RegisterConfig(Section):
    """Log trained models to the MLflow registry (pyfunc, alias candidate) and promote by the gate."""

    models: list[ModelSpec] = Field(
        default_factory=_default_models, description="Model directories to register, each with its gate metrics.",
    )
    gate: dict[str, GateRule] = Field(
        default_factory=_default_gate, description="Metric name -> promotion rule (direction and threshold).",
    )
    auto_promote: bool = Field(
        True, description="Run the gate right after registering and move 'champion' when it passes.",
    )
    name_prefix: str = Field(
        "lmpipe", pattern=NAME_PATTERN, description="Registered model names are <prefix>-<stage>[-<task>].",
    )
    example_prompt: str = Field(
        "Once upon a time", min_length=1,
        description="Input example stored with generative models (also the smoke test after logging).",
    )
    example_text: str = Field(
        "A warm and funny film with a great cast.", min_length=1,
        description="Input example stored with classification models.",
    )
    max_new_tokens: int = Field(64, gt=0, description="Default generation length of the served model.")

    @model_validator(mode="after")
    def _check(self) -> RegisterConfig:
        names = [spec.registered_name(self.name_prefix) for spec in self.models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"models: {', '.join(duplicated)} listed more than once")
        for spec in self.models:
            missing = sorted(set(spec.metrics) - set(self.gate))
            if missing:
                raise ValueError(
                    f"models ({spec.registered_name(self.name_prefix)}): metric(s) {', '.join(missing)} have no rule "
                    f"under register.gate (rules: {', '.join(self.gate) or 'none'})"
                )
        return self

    def spec_for(self, name: str) -> ModelSpec | None:
        """The model entry registered under ``name`` (None if none is)."""
        for spec in self.models:
            if spec.registered_name(self.name_prefix) == name:
                return spec
        return None
