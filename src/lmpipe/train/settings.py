"""The training settings shared by ``pretrain``, ``finetune`` and ``distill``, each declared once.

A stage section inherits the groups it reads, so ``params.yaml`` keeps flat keys
(``pretrain.lr``, ``finetune.tasks.sft.devices``) and ``lmpipe <stage> --help`` lists them with
the stage's own:

- :class:`OptimSettings`: step budget, batch, the optimizer (AdamW, or Muon for the block
  matrices) and the LR schedule (read by :mod:`lmpipe.train.module`);
- :class:`HardwareSettings`: accelerator, precision, strategy, devices (read by
  :func:`lmpipe.train.loop.build_trainer`);
- :class:`CheckpointSettings`: how often checkpoints are written, how many are kept, resume
  (read by :class:`lmpipe.train.checkpoint.PeriodicCheckpoint`);
- :class:`LoggingSettings`: log interval, progress bar, divergence guard (read by
  :class:`lmpipe.train.callbacks.TrainingMonitor`);
- :class:`EvalSettings`: how often the loop evaluates, with :class:`ValidationSettings` (a
  language model's val split, read by :class:`lmpipe.train.callbacks.Validation`) and
  :class:`DevEvalSettings` (a task's dev set, best weights and early stopping, read by
  :class:`lmpipe.train.callbacks.DevEvaluation`); :class:`EarlyStopSettings` (patience and
  min_delta, of the dev set or, in ``pretrain``, of the val split).

A field marked :data:`OPERATIONAL` changes how a run is executed or observed, not what it
computes: a run resumed with other values of it is the same run. :func:`run_key` hashes a
section without them, so every stage keys its checkpoints the same way. A stage that needs
another default than the shared one redeclares the field with :func:`stage_default` and says why.
A key that was renamed stays in its group's ``moved_keys`` (old name -> new name): params.yaml
naming the old key gets an error naming the new one (:func:`lmpipe.config.moved_keys_of`).

This module imports pydantic only: loading params.yaml or printing ``--help`` must not pay for
torch or Lightning.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic.fields import FieldInfo

from lmpipe.config import Section
from lmpipe.io import config_hash

OPERATIONAL_MARK = "lmpipe_operational"
OPERATIONAL: dict[str, Any] = {OPERATIONAL_MARK: True}
"""``json_schema_extra`` of a field that does not change what a run computes."""


def is_operational(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(OPERATIONAL_MARK))


def operational_keys(model: type[BaseModel]) -> frozenset[str]:
    """Top-level keys of ``model`` marked operational."""
    return frozenset(name for name, info in model.model_fields.items() if is_operational(info))


def computed_config(cfg: BaseModel) -> dict[str, Any]:
    """``cfg`` as JSON data without its operational fields, nested sections included."""
    out: dict[str, Any] = {}
    for name, info in type(cfg).model_fields.items():
        if is_operational(info):
            continue
        value = getattr(cfg, name)
        out[name] = computed_config(value) if isinstance(value, BaseModel) else cfg.model_dump(
            mode="json", include={name})[name]
    return out


def run_key(cfg: BaseModel, **inputs: str) -> str:
    """Short hash of what a run computes: the section minus operational fields, plus the
    fingerprints of its inputs (tokens, base model, teacher, data) by name."""
    return config_hash({"config": computed_config(cfg), **inputs})[:16]


def stage_default(owner: type[BaseModel], name: str, default: Any, **changes: Any) -> Any:
    """The shared field ``owner.name`` with a stage's own default (and, in ``changes``, e.g. a
    stage's description); its bounds and marks stay those of the shared declaration."""
    return FieldInfo.merge_field_infos(owner.model_fields[name], default=default, **changes)


class OptimSettings(Section):
    """Step budget, batch, the optimizer and the learning-rate schedule."""

    max_steps: int = Field(600, gt=0, description="Optimizer steps to train for (with max_time: at most).")
    max_time: float | None = Field(
        None, gt=0,
        description="Wall-clock budget of the training loop in seconds (null: off); training ends at whichever "
        "of max_steps and max_time comes first, the final evaluation and checkpoint inside the budget, and the "
        "cosine / wsd decay follows the elapsed share of the time.")
    micro_batch_size: int = Field(16, gt=0, description="Sequences (examples) per device per forward/backward pass.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="After warmup: cosine decay, warmup-stable-decay (wsd), or constant."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps (or of max_time) spent in the final decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (0.95 as GPT-3, for stability from scratch).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW for every parameter; muon: Muon (Jordan et al. 2024) for the 2-D weights of the "
        "transformer blocks, AdamW (lr, betas, weight_decay) for embeddings, LM head, norms and biases.")
    muon_lr: float = Field(0.02, gt=0, description="muon: peak learning rate of the block matrices (the schedule "
                           "of lr, scaled to this peak).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum.")
    muon_ns_steps: int = Field(5, ge=1, le=10, description="muon: Newton-Schulz steps per update (torch's "
                               "coefficients are tuned for 5; fewer cost less and orthogonalize less exactly).")
    # Muon's decay is lr * weight_decay per step at a learning rate some 10x AdamW's, so it takes its
    # own, smaller value (0.01 in the usage example of Jordan's Muon repository).
    muon_weight_decay: float = Field(0.01, ge=0, description="muon: decoupled weight decay of the block matrices.")


class AccumulationSettings(Section):
    """Gradient accumulation as a count (pretrain sets a token budget per step instead)."""

    accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step (gradient accumulation).")


class HardwareSettings(Section):
    """Where and how the loop runs."""

    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Hardware: auto, cpu or gpu.", json_schema_extra=OPERATIONAL)
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU that supports it, else 32-true."
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Distribution strategy across devices.", json_schema_extra=OPERATIONAL)
    devices: int | Literal["auto"] = Field(
        1, description="Devices per node (processes per node under torchrun/SLURM).", json_schema_extra=OPERATIONAL)
    num_nodes: int = Field(1, gt=0, description="Machines (set to the launcher's node count).",
                           json_schema_extra=OPERATIONAL)
    deterministic: bool = Field(False, description="Deterministic kernels (exactly reproducible, slower).")


class CheckpointSettings(Section):
    """Periodic checkpoints and resume."""

    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints (0: only at the end).",
                                  json_schema_extra=OPERATIONAL)
    keep_checkpoints: int = Field(2, gt=0, description="Periodic checkpoints kept (the newest ones).",
                                  json_schema_extra=OPERATIONAL)
    resume: bool = Field(True, description="Resume from the newest complete checkpoint of the same run.",
                         json_schema_extra=OPERATIONAL)


class LoggingSettings(Section):
    """Train-loss logging, progress and the divergence guard that watches the logged loss."""

    log_every: int = Field(10, gt=0, description="Steps between train-loss/throughput logs (the only host syncs).",
                           json_schema_extra=OPERATIONAL)
    spike_factor: float = Field(
        4.0, ge=0, json_schema_extra=OPERATIONAL,
        description="Stop with TrainingDiverged when a logged train loss exceeds this multiple of its running "
        "average (0: only NaN/inf stop training).",
    )
    progress: bool = Field(True, description="Show a progress bar.", json_schema_extra=OPERATIONAL)


class EvalSettings(Section):
    """How often the loop evaluates the model (at step 0 too for a dev set, and always at the last step)."""

    eval_every: int = Field(100, ge=0, json_schema_extra=OPERATIONAL,
                            description="Steps between evaluations (0: only at the end).")


class ValidationSettings(EvalSettings):
    """A language model's validation: loss and bits per byte on a fixed part of the val split."""

    moved_keys: ClassVar[dict[str, str]] = {"val_every": "eval_every", "val_batches": "eval_batches"}

    eval_batches: int = Field(20, gt=0, json_schema_extra=OPERATIONAL,
                              description="Micro-batches of the val split per evaluation (across devices).")


class EarlyStopSettings(Section):
    """Early stopping on the metric that picks the exported weights (read by
    :class:`lmpipe.train.callbacks.BestWeights`)."""

    patience: int = Field(
        5, ge=0, description="Early stopping: stop after this many evaluations without improvement (0: never stop early)."
    )
    min_delta: float = Field(0.0, ge=0, description="Early stopping: the smallest change that counts as an improvement.")


class DevEvalSettings(EvalSettings, EarlyStopSettings):
    """A task's dev evaluation: its metrics pick the exported weights and can stop training early."""

    # Not operational here: which evaluations happen decides the exported weights and the step
    # training stops at, so a run resumed with another cadence computes another result.
    eval_every: int = Field(50, ge=0, description="Steps between dev evaluations (0: only at the end).")
    eval_batch_size: int = Field(64, gt=0, json_schema_extra=OPERATIONAL,
                                 description="Examples per dev-evaluation batch.")


# Bases in reverse: pydantic lists the fields of the last base first, so --help shows
# optimisation, hardware, checkpoints, logging, then the stage's own keys.
class TrainSettings(LoggingSettings, CheckpointSettings, HardwareSettings, OptimSettings):
    """Every shared group: what the one loop (:func:`lmpipe.train.loop.fit`) reads."""

    @model_validator(mode="after")
    def _muon_needs_whole_matrices(self) -> TrainSettings:
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise ValueError("optimizer: muon orthogonalises each whole weight matrix, which strategy fsdp shards "
                             "across ranks; use muon with strategy ddp or auto, or adamw with fsdp")
        return self
