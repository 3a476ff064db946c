"""Config section ``pretrain``: model size, objective, optimisation, hardware, logging, checkpoints,
validation."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from lmpipe.config import Section
from lmpipe.model.gpt import CHOICES, GPTConfig
from lmpipe.model.presets import PRESETS, preset_config
from lmpipe.train.settings import (
    OPERATIONAL,
    EarlyStopSettings,
    OptimSettings,
    TrainSettings,
    ValidationSettings,
    stage_default,
)


def _overrides_of_gpt_config() -> dict[str, Any]:
    """One optional pydantic field per described GPTConfig field (its doc, bounds and options):
    null keeps the preset's value. vocab_size (the tokenizer's), norm_eps and bidirectional (the
    objective's) are not overridable."""
    out: dict[str, Any] = {}
    for f in fields(GPTConfig):
        if "doc" not in f.metadata:
            continue
        bounds = {k: v for k, v in f.metadata.items() if k in ("gt", "ge", "lt", "le")}
        kind: Any = Literal[CHOICES[f.name]] if f.name in CHOICES else {"int": int, "float": float, "bool": bool,
                                                                       "int | None": int}[str(f.type)]
        out[f.name] = (kind | None, Field(None, description=f.metadata["doc"], **bounds))
    return out


ModelOverrides = create_model(
    "ModelOverrides", __base__=Section, __doc__="Changes to the preset's architecture; null keeps the preset's value.",
    **_overrides_of_gpt_config(),
)


class PretrainConfig(ValidationSettings, EarlyStopSettings, TrainSettings):
    """Pretrain the GPT on data/tokens/ (causal LM, or BERT-style masked LM) with PyTorch Lightning."""

    # On a text the budget reads several times over, the last step's weights have memorised it;
    # the val split says which evaluation generalised best (docs/benchmarks.md, recipe quality at
    # 300 s: 0.921 / 0.972 of the bare loop's held-out bits/byte, against 0.974 / 1.027 for the
    # last step's weights).
    export_weights: Literal["best", "last"] = Field(
        "best", description="best: export the weights of the evaluation with the lowest val loss (every eval_every "
        "steps and at the last step); last: the last step's weights.")
    # Not operational here, as in fine-tuning: which evaluations happen, on which part of the val
    # split, decides the exported weights (export_weights: best) and the step training stops at.
    eval_every: int = stage_default(ValidationSettings, "eval_every", 100, json_schema_extra={},
                                    description="Steps between val evaluations (0: only at the end); with "
                                    "export_weights: best the candidates for the exported weights.")
    eval_batches: int = stage_default(ValidationSettings, "eval_batches", 20, json_schema_extra={})
    # A long pretraining run is not stopped unless asked: its val loss can stall for a while.
    patience: int = stage_default(EarlyStopSettings, "patience", 0,
                                  description="Early stopping: stop after this many val evaluations without an "
                                  "improvement of the val loss larger than min_delta (0: never stop early).")

    preset: str = Field("tiny", description=f"Model size preset: {', '.join(PRESETS)}.")
    # Training from scratch at a fixed budget is where Muon wins (docs/benchmarks.md, recipe
    # quality: 4% lower held-out bits/byte than AdamW at equal wall time on both real corpora);
    # fine-tuning and distillation keep AdamW, which their few hundred steps were tuned with.
    optimizer: Literal["adamw", "muon"] = stage_default(OptimSettings, "optimizer", "muon",
                                                        annotation=Literal["adamw", "muon"])
    model: ModelOverrides = Field(default_factory=ModelOverrides, description="Architecture overrides of the preset.")
    objective: Literal["clm", "mlm"] = Field(
        "clm", description="clm: next-token prediction; mlm: bidirectional masked-LM (BERT) objective."
    )
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="mlm: share of tokens selected for prediction (BERT: 15%; 80/10/10 mask/random/keep)."
    )
    mask_token_id: int | None = Field(
        None, ge=0,
        description="mlm: id of the mask token; null: a mask piece among meta.json's special tokens, else its pad_id.",
    )
    seed: int = Field(1337, description="Seed of weight init, window order, masking and dropout.")
    tokens_per_step: int | None = Field(
        None, gt=0,
        description="Target tokens per optimizer step across all devices; gradients are accumulated to reach "
        "it (must be a multiple of micro_batch_size * block_size * devices). null: no accumulation.",
    )
    sampling: Literal["random", "sequential"] = Field(
        "random",
        description="random: each epoch visits every window once in a seeded random order (random offset); "
        "sequential: windows in corpus order.",
    )
    num_workers: int = Field(0, ge=0, json_schema_extra=OPERATIONAL,
        description="DataLoader worker processes (0: batches built in the training process).")
    sample_every: int = Field(0, ge=0, json_schema_extra=OPERATIONAL,
        description="Steps between sample generations (0: only at the end).")
    sample_tokens: int = Field(64, ge=0, json_schema_extra=OPERATIONAL,
        description="Tokens per sample generation (0: no samples).")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["", "Once upon a time"],
        json_schema_extra=OPERATIONAL,
        description="Prompts for sample generations ('' starts a new document); needs the tokenizer's model.",
    )
    sample_temperature: float = Field(0.8, ge=0, json_schema_extra=OPERATIONAL,
        description="Sampling temperature (0: greedy).")
    sample_top_k: int | None = Field(50, gt=0, json_schema_extra=OPERATIONAL,
        description="Top-k filter of samples.")
    # Pretrain only: the task models of finetune and distill (a head read through a forward hook,
    # adapters, the student wrapper) are run eagerly.
    compile: bool = Field(False, json_schema_extra=OPERATIONAL,
                          description="torch.compile the model (worth it on GPU for long runs).")
    peak_flops: float | None = Field(
        None, gt=0, json_schema_extra=OPERATIONAL,
        description="Peak FLOP/s of one device for MFU; null: known GPUs by name, none on CPU."
    )

    @model_validator(mode="after")
    def _check_model(self) -> PretrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r} (known: {', '.join(PRESETS)})")
        # Build the architecture once with a placeholder vocabulary so impossible shapes fail
        # at config time, not after the data is loaded.
        try:
            self.gpt_config(vocab_size=2)
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        return self

    def gpt_config(self, vocab_size: int) -> Any:
        """The model's GPTConfig for this section and the given vocabulary."""
        return preset_config(
            self.preset, vocab_size, bidirectional=self.objective == "mlm", **self.model.model_dump()
        )

