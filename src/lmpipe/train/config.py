"""Config section ``pretrain``: model size, objective, optimisation, hardware, logging, checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmpipe.config import Section
from lmpipe.model.presets import PRESETS, preset_config


class ModelOverrides(Section):
    """Changes to the preset's architecture; null keeps the preset's value."""

    n_layer: int | None = Field(None, gt=0, description="Transformer blocks.")
    n_head: int | None = Field(None, gt=0, description="Attention (query) heads per block.")
    n_kv_head: int | None = Field(
        None, gt=0, description="Key/value heads (grouped-query attention); null: one per query head."
    )
    n_embd: int | None = Field(None, gt=0, description="Model width.")
    block_size: int | None = Field(None, gt=1, description="Context length in tokens.")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / model width.")
    mlp: Literal["gelu", "swiglu"] | None = Field(None, description="MLP activation: gelu (GPT-2) or swiglu.")
    norm: Literal["layernorm", "rmsnorm"] | None = Field(None, description="Pre-norm type.")
    pos_encoding: Literal["rope", "sinusoidal", "learned"] | None = Field(
        None, description="Position signal: rotary (default), fixed sinusoidal or learned absolute."
    )
    rope_theta: float | None = Field(None, gt=0, description="Rotary base frequency.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout on attention, residual and embeddings.")
    bias: bool | None = Field(None, description="Biases in Linear and LayerNorm layers.")
    tie_weights: bool | None = Field(None, description="Share the token embedding with the LM head.")


class PretrainConfig(Section):
    """Pretrain the GPT on data/tokens/ (causal LM, or BERT-style masked LM) with PyTorch Lightning."""

    preset: str = Field("tiny", description=f"Model size preset: {', '.join(PRESETS)}.")
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
    max_steps: int = Field(600, gt=0, description="Optimizer steps to train for.")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per device per forward/backward pass.")
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
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="After warmup: cosine decay, warmup-stable-decay (wsd), or constant."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps spent in the final decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (0.95 as GPT-3 for stability).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Hardware: auto, cpu or gpu.")
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU that supports it, else 32-true."
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs).")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="Distribution strategy across devices.")
    devices: int | Literal["auto"] = Field(1, description="Devices per node (processes per node under torchrun/SLURM).")
    num_nodes: int = Field(1, gt=0, description="Machines (set to the launcher's node count).")
    deterministic: bool = Field(False, description="Deterministic kernels (exactly reproducible, slower).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: batches built in the training process).")
    log_every: int = Field(10, gt=0, description="Steps between train-loss/throughput logs (the only host syncs).")
    val_every: int = Field(100, ge=0, description="Steps between validation runs (0: only at the end).")
    val_batches: int = Field(20, gt=0, description="Micro-batches of the val split per validation (across devices).")
    sample_every: int = Field(0, ge=0, description="Steps between sample generations (0: only at the end).")
    sample_tokens: int = Field(64, ge=0, description="Tokens per sample generation (0: no samples).")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["", "Once upon a time"],
        description="Prompts for sample generations ('' starts a new document); needs the tokenizer's model.",
    )
    sample_temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    sample_top_k: int | None = Field(50, gt=0, description="Top-k filter of samples.")
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints (0: only at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Periodic checkpoints kept (the newest ones).")
    resume: bool = Field(True, description="Resume from the newest complete checkpoint of the same run.")
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one device for MFU; null: known GPUs by name, none on CPU."
    )
    spike_factor: float = Field(
        4.0, ge=0,
        description="Stop with TrainingDiverged when a logged train loss exceeds this multiple of its running "
        "average (0: only NaN/inf stop training).",
    )
    progress: bool = Field(True, description="Show a progress bar.")

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


# Keys that change how a run is observed or executed but not what it computes: a run resumed with
# different values of these is the same run (checkpoints are keyed by everything else).
OPERATIONAL_KEYS = frozenset({
    "accelerator", "compile", "strategy", "devices", "num_nodes", "num_workers", "log_every", "val_every",
    "val_batches", "sample_every", "sample_tokens", "sample_prompts", "sample_temperature", "sample_top_k",
    "checkpoint_every", "keep_checkpoints", "resume", "peak_flops", "spike_factor", "progress",
})
