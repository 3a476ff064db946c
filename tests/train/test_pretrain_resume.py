"""Exact resume: a run killed with SIGKILL and restarted equals an uninterrupted run, bit for bit.

Run B trains in a child process that is killed (SIGKILL) after step 6; its step-6 checkpoint is
then truncated, so run C, restarted in B's directory, must fall back to the step-4 checkpoint and
redo steps 5-10. Run A trains uninterrupted (in this process, while B runs, to save time).
Deterministic kernels, one thread everywhere, dropout on, two micro-batches per step. The
optimizer is Muon, which also steps AdamW (embedding, norms): both optimizers' states must come
back from the checkpoint for the weights to match, in the time of one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmpipe.config import Paths
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

RECORDER = r"""
import json, os, time
from lightning.pytorch.callbacks import Callback

class RecordAndBlock(Callback):
    # Logs each micro-batch's sample indices with the optimizer step it belongs to; after step
    # `block_at` (checkpoint written) it says so and waits to be killed.
    def __init__(self, root, block_at):
        self.root, self.block_at = root, block_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step if pl_module.stepped else trainer.global_step + 1
        with open(os.path.join(self.root, "samples.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
        if self.block_at and pl_module.stepped and trainer.global_step == self.block_at:
            open(os.path.join(self.root, "blocked"), "w").close()
            time.sleep(600)
"""

CHILD = RECORDER + r"""
import sys
import torch
from lmpipe.config import Paths
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

torch.set_num_threads(1)
root, block_at = sys.argv[1], int(sys.argv[2])
train(PretrainConfig.model_validate(json.loads(sys.argv[3])), Paths(root),
      extra_callbacks=[RecordAndBlock(root, block_at)])
"""

CONFIG = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16, "dropout": 0.1},
    "micro_batch_size": 4, "tokens_per_step": 128, "max_steps": 10, "warmup_steps": 2, "lr": 5e-3, "optimizer": "muon",
    "deterministic": True, "log_every": 1, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 2,
    "keep_checkpoints": 3, "sample_tokens": 0, "progress": False,
}


def start(root: Path, block_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(block_at), json.dumps(CONFIG)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_here(root: Path) -> None:
    """The same training as a child's, in this process (one thread, like the children: the
    ``one_thread`` fixture)."""
    namespace: dict = {}
    exec(RECORDER, namespace)  # the children's recorder, so both sides log the same way
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train(PretrainConfig.model_validate(CONFIG), Paths(root),
              extra_callbacks=[namespace["RecordAndBlock"](str(root), 0)])
    finally:
        torch.use_deterministic_algorithms(deterministic)


def samples(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sigkilled_run_resumes_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    roots = {name: tmp_path / name for name in ("uninterrupted", "killed")}
    for root in roots.values():
        write_synthetic_shards(root / "data" / "tokens", vocab_size=40, train_tokens=4000, val_tokens=600)
    killed = start(roots["killed"], block_at=6)
    train_here(roots["uninterrupted"])
    deadline = time.monotonic() + 240
    while not (roots["killed"] / "blocked").exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run to be killed never reached step 6"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    ckpt_dir = next((roots["killed"] / "checkpoints" / "pretrain").iterdir())
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == [f"step-0000000{s}.ckpt" for s in (2, 4, 6)]
    newest = ckpt_dir / "step-00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn copy of the newest
    killed_log = samples(roots["killed"])
    (roots["killed"] / "samples.jsonl").unlink()
    caplog.clear()
    train_here(roots["killed"])
    assert "skipping checkpoint" in caplog.text and "step-00000006.ckpt" in caplog.text

    resumed = json.loads((roots["killed"] / "metrics" / "pretrain.json").read_text())
    expected = json.loads((roots["uninterrupted"] / "metrics" / "pretrain.json").read_text())
    assert resumed["resumed_from_step"] == 4 and expected["resumed_from_step"] == 0
    # Same losses at every step (train every step, val at 3, 6, 9, 10) and the same final weights.
    csv = {name: (root / "plots" / "pretrain_loss.csv").read_text() for name, root in roots.items()}
    assert csv["killed"] == csv["uninterrupted"] and len(csv["killed"].splitlines()) == 11
    weights = {name: (root / "models" / "pretrain" / "model.safetensors").read_bytes() for name, root in roots.items()}
    assert weights["killed"] == weights["uninterrupted"]
    # Each sample seen exactly once: the killed run's steps up to the checkpoint plus the resumed
    # run's steps are exactly the uninterrupted run's, in order, with no index twice.
    assert max(r["step"] for r in killed_log) == 6  # steps 5 and 6 were done and lost
    stitched = [r for r in killed_log if r["step"] <= 4] + samples(roots["killed"])
    reference = samples(roots["uninterrupted"])
    assert stitched == reference and len(reference) == 20
    indices = [i for r in reference for i in r["index"]]
    assert sorted(indices) == list(range(10 * 8))
