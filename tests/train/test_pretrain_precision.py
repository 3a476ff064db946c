"""The GPU settings of pretrain, run on the CPU: ``torch.compile`` (inductor, which compiles C++
kernels on the CPU) and bf16 mixed precision (CPU autocast). Tiny model, few steps: inductor's
first compile dominates."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmpipe.config import Paths
from lmpipe.model import load_model
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

TINY = {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16}, "micro_batch_size": 4,
        "max_steps": 4, "warmup_steps": 1, "lr": 5e-3, "log_every": 1, "eval_every": 0, "eval_batches": 1,
        "checkpoint_every": 0, "sample_tokens": 0, "progress": False, "accelerator": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")


def run(root: Path, **overrides: Any) -> list[float]:
    """Train TINY with ``overrides`` in ``root``; the train loss of each step."""
    write_synthetic_shards(root / "data" / "tokens", vocab_size=40, train_tokens=2000, val_tokens=300)
    train(PretrainConfig.model_validate({**TINY, **overrides}), Paths(root), extra_callbacks=list(CALLBACKS))
    with open(root / "plots" / "pretrain_loss.csv") as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


CALLBACKS: list[Callback] = []


class Inspect(Callback):
    """Records how the first training step ran: compiled or not, and the dtype of a matmul."""

    def __init__(self) -> None:
        self.compiled: bool | None = None
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.compiled is None:
            self.compiled = isinstance(pl_module._compiled, torch._dynamo.eval_frame.OptimizedModule)
            head = pl_module.model.blocks[0].mlp
            self._hook = head.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if hasattr(self, "_hook"):
            self._hook.remove()
            del self._hook


@pytest.fixture
def inspect() -> Iterator[Inspect]:
    probe = Inspect()
    CALLBACKS.append(probe)
    yield probe
    CALLBACKS.clear()


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, inspect: Inspect) -> None:
    """Inductor on the CPU fuses and reorders float32 arithmetic, nothing more: over 4 steps the
    losses agree with eager to 1e-4 (absolute, on losses near 3.7) and the weights to 1e-4."""
    eager = run(tmp_path / "eager")
    assert inspect.compiled is False
    inspect.compiled = None
    compiled = run(tmp_path / "compiled", compile=True)
    assert inspect.compiled is True
    assert compiled == pytest.approx(eager, abs=1e-4) and len(eager) == 4
    a, _ = load_model(tmp_path / "eager" / "models" / "pretrain")
    b, _ = load_model(tmp_path / "compiled" / "models" / "pretrain")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_mixed_precision_runs_in_bf16_and_exports_fp32(tmp_path: Path, inspect: Inspect) -> None:
    """bf16-mixed on the CPU autocasts the matmuls to bfloat16 (8 bits of mantissa): losses stay
    within 2% of float32 training; the weights, kept and exported in float32, stay finite."""
    full = run(tmp_path / "fp32", precision="32-true")
    assert inspect.dtypes == {torch.float32}
    inspect.compiled, inspect.dtypes = None, set()
    mixed = run(tmp_path / "bf16", precision="bf16-mixed")
    assert inspect.dtypes == {torch.bfloat16}
    assert mixed == pytest.approx(full, rel=2e-2)
    model, _ = load_model(tmp_path / "bf16" / "models" / "pretrain")
    assert all(t.dtype == torch.float32 and bool(t.isfinite().all()) for t in model.state_dict().values())
