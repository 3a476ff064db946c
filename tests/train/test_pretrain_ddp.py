"""Two DDP processes (gloo, CPU) under torchrun follow the single-process loss curve.

The 2-process run is the real CLI (``lmpipe pretrain``) launched by torchrun with devices=2; the
reference is one process accumulating two micro-batches per step, so both see the same global
batch of the same samples. They differ only in floating-point summation order.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmpipe.config import Paths
from lmpipe.model import load_model
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

PRETRAIN = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}, "micro_batch_size": 4,
    "tokens_per_step": 128, "max_steps": 8, "warmup_steps": 2, "lr": 5e-3, "log_every": 1, "eval_every": 4,
    "eval_batches": 4, "checkpoint_every": 0, "sample_tokens": 0, "progress": False, "accelerator": "cpu",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_curve(root: Path) -> list[tuple[float, ...]]:
    with open(root / "plots" / "pretrain_loss.csv") as handle:
        return [tuple(float(v) if v else float("nan") for v in row.values()) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in ("ddp", "single")}
    for root in roots.values():
        write_synthetic_shards(root / "data" / "tokens", vocab_size=40, train_tokens=4000, val_tokens=600)
    params = {"tracking": {"enabled": False}, "pretrain": {**PRETRAIN, "strategy": "ddp", "devices": 2}}
    (roots["ddp"] / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lmpipe.cli", "pretrain", "--root", str(roots["ddp"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    single = train(PretrainConfig.model_validate(PRETRAIN), Paths(roots["single"]))  # meanwhile, here
    output, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, output[-4000:]
    assert single["steps"] == 8

    ddp_curve, single_curve = loss_curve(roots["ddp"]), loss_curve(roots["single"])
    assert [row[0] for row in ddp_curve] == [float(s) for s in range(1, 9)]
    assert len(ddp_curve) == len(single_curve)
    for got, expected in zip(ddp_curve, single_curve, strict=True):
        assert got == pytest.approx(expected, abs=1e-5, nan_ok=True)
    assert ddp_curve[-1][1] < ddp_curve[0][1] - 0.3  # it did learn
    ddp_model, _ = load_model(roots["ddp"] / "models" / "pretrain")
    single_model, _ = load_model(roots["single"] / "models" / "pretrain")
    for (name, a), (_, b) in zip(ddp_model.state_dict().items(), single_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
