"""Config section ``distill``: teacher, student architecture and init, loss weights, teacher logits
(online or precomputed top-k), and the same optimisation and hardware keys as pretraining.

```yaml
distill:
  task: lm                       # or classification (teacher: a finetuned classifier)
  teacher: models/pretrain
  student: {model: {n_layer: 2}, init: auto}
  losses: {soft: 1.0, hard: 0.0, reverse_kl: 0.0, hidden: 0.0}
  temperature: 1.0
  teacher_logits: online         # or precomputed (top_k per position, cached on disk)
```
``lmpipe distill -S distill.baseline=true`` trains the same student from a random init on the
hard labels alone (no teacher) into ``models/distill_baseline/``, the comparison point evaluate uses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmpipe.config import Section
from lmpipe.errors import ConfigError
from lmpipe.model.gpt import GPTConfig
from lmpipe.model.presets import PRESETS, preset_config
from lmpipe.train.finetune.config import DataSource, split_source
from lmpipe.train.pretrain.config import ModelOverrides
from lmpipe.train.settings import (
    AccumulationSettings,
    DevEvalSettings,
    HardwareSettings,
    TrainSettings,
    ValidationSettings,
    stage_default,
)


class StudentModel(ModelOverrides):
    """Changes to the student's base architecture (the teacher's or a preset); null keeps its value."""

    n_layer: int | None = Field(2, gt=0, description="Transformer blocks (2: half of the tiny preset's).")


class StudentSettings(Section):
    """The student's architecture (the teacher's or a preset, with overrides) and its initialisation."""

    preset: str | None = Field(
        None, description=f"Size preset of the student ({', '.join(PRESETS)}); null: the teacher's architecture.",
    )
    model: StudentModel = Field(
        default_factory=StudentModel,
        description="Changes to that architecture (null keeps its value); the vocabulary is always the teacher's.",
    )
    init: Literal["auto", "teacher", "scratch"] = Field(
        "auto",
        description="teacher: copy embeddings, final norm and every other block of the teacher (DistilBERT, Sanh "
        "et al. 2019), which needs the same width and block layout; scratch: random init; auto: teacher when the "
        "shapes allow, else scratch. The baseline always starts from scratch.",
    )


class LossWeights(Section):
    """Weights of the distillation losses; the training loss is their weighted sum."""

    soft: float = Field(1.0, ge=0, description="KL(teacher || student) of the softened distributions, times T^2 "
                        "(Hinton et al. 2015).")
    hard: float = Field(0.0, ge=0, description="Cross-entropy on the true next token / label. For language models "
                        "the teacher's full next-token distribution already contains it (on the embedded default, "
                        "adding it with weight 1 did not help).")
    reverse_kl: float = Field(0.0, ge=0, description="KL(student || teacher) at temperature T, times T^2: "
                              "mode-seeking (MiniLLM, Gu et al. 2024). It weighs the teacher's tail, which precomputed "
                              "top-k targets keep as one bucket (a lower bound): use it with teacher_logits: online.")
    hidden: float = Field(0.0, ge=0, description="Hidden-state matching of block outputs (student block i with "
                          "teacher block (i+1)*L_t/L_s - 1, TinyBERT's uniform map), through a learned linear "
                          "projection when the widths differ. Needs teacher_logits: online.")
    hidden_kind: Literal["cosine", "mse"] = Field(
        "cosine", description="cosine: 1 - cosine similarity (DistilBERT); mse: mean squared error (TinyBERT).")


class DistillConfig(DevEvalSettings, ValidationSettings, TrainSettings, AccumulationSettings):
    """Distil a teacher model into a smaller student (language modelling or classification)."""

    # The frozen teacher is replicated on every rank, outside the DDP wrapper: no FSDP.
    strategy: Literal["auto", "ddp"] = stage_default(
        HardwareSettings, "strategy", "auto", annotation=Literal["auto", "ddp"],
        description="auto or ddp. The frozen teacher is replicated on every rank, outside the DDP wrapper.")

    task: Literal["lm", "classification"] = Field(
        "lm", description="lm: next-token distillation on data/tokens/; classification: the teacher's class "
        "distribution on the classification data (teacher must be a finetuned classifier).",
    )
    teacher: str = Field("models/pretrain", description="Teacher model directory, relative to the project root.")
    student: StudentSettings = Field(default_factory=StudentSettings, description="Student architecture and init.")
    baseline: bool = Field(
        False, description="Train the same student from scratch on hard labels only (no teacher), into "
        "models/distill_baseline/: the no-distillation comparison at the same size and budget.",
    )
    losses: LossWeights = Field(default_factory=LossWeights, description="Loss weights.")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of the soft targets (Hinton et al. 2015). T > 1 brings out the "
        "small probabilities of a few-class teacher (try 2-4 for classification); over a vocabulary it flattens the "
        "targets the student should match (on the embedded default T=2 gave 40% worse val bits per byte than T=1).")
    teacher_logits: Literal["online", "precomputed"] = Field(
        "online", description="online: run the frozen teacher on every batch; precomputed: run it once over the "
        "training windows/examples and keep its top_k log-probabilities on disk (checkpoints/distill/teacher_cache/), "
        "reused by every student run with the same teacher, data, block size and temperature.",
    )
    top_k: int = Field(32, gt=0, description="precomputed: teacher probabilities kept per position; the rest of the "
                       "mass is one 'other' bucket.")
    train_data: DataSource = Field(
        default_factory=lambda: split_source("train", "review"), description="classification: training rows.")
    dev_data: DataSource = Field(
        default_factory=lambda: split_source("val", "review"), description="classification: dev rows.")
    max_length: int | None = Field(None, gt=2, description="classification: longest example in tokens; null: "
                                   "the student's block_size.")
    seed: int = Field(1337, description="Seed of student init, batch order and dropout.")
    # Pretraining's cadence: distillation runs are as long. Not operational, as in fine-tuning:
    # with task: classification the dev evaluations pick the exported weights.
    eval_every: int = stage_default(DevEvalSettings, "eval_every", 100,
                                    description="Steps between val (lm) or dev (classification) evaluations "
                                    "(0: only at the end).")
    # The student is compared with its baseline at the same step budget: no early stop unless asked.
    patience: int = stage_default(DevEvalSettings, "patience", 0,
                                  description="classification: early stopping after this many evaluations "
                                  "without improvement (0: never).")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.student.preset is not None and self.student.preset not in PRESETS:
            raise ValueError(f"student.preset: unknown {self.student.preset!r} (known: {', '.join(PRESETS)})")
        if self.losses.hidden > 0 and self.teacher_logits == "precomputed" and not self.baseline:
            raise ValueError("losses.hidden needs the teacher's hidden states: set teacher_logits: online")
        if not self.baseline and self.losses.soft + self.losses.reverse_kl + self.losses.hidden == 0:
            raise ValueError("losses: soft, reverse_kl and hidden are all 0, so nothing is distilled "
                             "(set baseline: true to train without the teacher)")
        return self

    def student_config(self, teacher: GPTConfig) -> GPTConfig:
        """The student's architecture: the teacher's (or a preset) with the configured overrides and
        the teacher's vocabulary. Raises ConfigError for an impossible shape."""
        overrides = {k: v for k, v in self.student.model.model_dump().items() if v is not None}
        try:
            if self.student.preset is not None:
                return preset_config(self.student.preset, teacher.vocab_size, **overrides)
            values = {**teacher.to_dict(), "bidirectional": False}
            if "n_head" in overrides and "n_kv_head" not in overrides and teacher.n_kv_head == teacher.n_head:
                values["n_kv_head"] = None  # plain multi-head stays plain multi-head with a new head count
            return GPTConfig(**{**values, **overrides})
        except (KeyError, ValueError) as err:
            raise ConfigError(f"distill.student: {err}") from None

    @property
    def run_name(self) -> str:
        """``distill`` or ``distill_baseline``: names the model directory, metrics and plots."""
        return "distill_baseline" if self.baseline else "distill"

