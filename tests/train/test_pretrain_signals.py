"""Stopping the pretrain stage from outside: SIGTERM or SIGINT to the real ``lmpipe pretrain``
process, a second SIGINT, and SLURM's pre-timeout signal (requeue). Each stops with a non-zero
status and no ``models/pretrain``; the requeue checkpoint is an ordinary, checked lmpipe checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from lmpipe.config import Paths
from lmpipe.io import sha256_file
from lmpipe.train.callbacks import TrainingInterrupted
from lmpipe.train.checkpoint import find_resume_checkpoint
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train
from lmpipe.train.settings import run_key

TINY = {"model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}, "micro_batch_size": 4,
        "warmup_steps": 2, "lr": 5e-3, "log_every": 1, "eval_every": 0, "eval_batches": 1, "sample_tokens": 0,
        "progress": False, "accelerator": "cpu"}

pytestmark = pytest.mark.usefixtures("one_thread")


def project(root: Path, **pretrain: Any) -> Path:
    write_synthetic_shards(root / "data" / "tokens", vocab_size=40, train_tokens=4000, val_tokens=600)
    params = {"tracking": {"enabled": False}, "pretrain": {**TINY, **pretrain}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_to_the_pretrain_stage_exits_non_zero_without_a_model(tmp_path: Path,
                                                                                 signum: signal.Signals) -> None:
    """A real ``lmpipe pretrain`` process sent the signal once training is under way (a checkpoint
    exists) stops at the next step through the same path for both signals, keeping its checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = project(tmp_path / signum.name, max_steps=100_000, checkpoint_every=5)
    # Started with SIGINT ignored, as a non-interactive shell starts a background job (a CI
    # script, `cmd &`): Python keeps the inherited disposition, so only lmpipe's handler stops it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "pretrain", "--root", str(root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 120
        while not list((root / "checkpoints").glob("pretrain/*/step-*.ckpt")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.1)
        proc.send_signal(signum)
        # a bound on a hang, not on speed (about 2 s on an idle machine)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, f"{signum.name}: {output[-3000:]}"
    assert f"lmpipe pretrain: error: stopped by {signum.name} at step" in output
    assert not (root / "models" / "pretrain").exists() and not (root / "metrics" / "pretrain.json").exists()
    assert list((root / "checkpoints").glob("pretrain/*/step-*.ckpt"))  # the next run resumes from them


SECOND_SIGINT = """
import os, signal, sys, time
import lightning as L
from lmpipe.train.loop import StopOnInterrupt

trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
interrupt = StopOnInterrupt()
with interrupt.installed(trainer):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs in the main thread, soon after the signal
        if interrupt.received:
            break
        time.sleep(0.01)
    print("first SIGINT: stopping", trainer.received_sigterm, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
print("still running after the second SIGINT", flush=True)
"""


def test_first_sigint_asks_the_loop_to_stop_and_a_second_kills_at_once() -> None:
    """The first Ctrl-C raises nothing (nothing to swallow): it sets the flag Lightning's loops
    stop on; the second ends the process at once with SIGINT's default action."""
    done = subprocess.run([sys.executable, "-c", SECOND_SIGINT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "first SIGINT: stopping True" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "still running" not in done.stdout
    assert done.returncode == -signal.SIGINT, done.stderr[-3000:]


class SignalAt(Callback):
    """Sends this process SLURM's pre-timeout signal after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.stepped and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_slurm_requeue_checkpoint_goes_through_lmpipes_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SLURM, SIGUSR1 (sbatch --signal) saves a step checkpoint of the run at the next step,
    requeues the job and stops without a model; the requeued job resumes from that checkpoint.
    A Lightning ``hpc_ckpt_N.ckpt`` left in the working or checkpoint directory (here, another
    run's) is never loaded: Lightning would load it without the run-key and sha256 checks."""
    other = project(tmp_path / "other")
    train(PretrainConfig.model_validate({**TINY, "max_steps": 6, "checkpoint_every": 6, "seed": 7}), Paths(other))
    [foreign] = other.glob("checkpoints/pretrain/*/step-00000006.ckpt")

    root = project(tmp_path / "job")
    cfg = PretrainConfig.model_validate({**TINY, "max_steps": 8, "checkpoint_every": 0})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # SLURM's client: records the call (the job is not real)
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "pretrain",
                        "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(root)
    ckpt_dir = root / "checkpoints" / "pretrain" / run_key(cfg, tokens_meta=sha256_file(root / "data" / "tokens" / "meta.json"))
    ckpt_dir.mkdir(parents=True)
    for directory in (root, ckpt_dir):  # Lightning's default root dir, and the run's checkpoint dir
        shutil.copyfile(foreign, directory / "hpc_ckpt_1.ckpt")
    with pytest.raises(TrainingInterrupted, match="SLURM requeue"):
        train(cfg, Paths(root), extra_callbacks=[SignalAt(3)])
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (root / "models" / "pretrain").exists()
    point = find_resume_checkpoint(ckpt_dir, ckpt_dir.name)
    assert point is not None and point.path.name == "step-00000004.ckpt" and point.step == 4
    assert not list(ckpt_dir.glob("hpc_ckpt_*")) and (ckpt_dir / "hpc-ckpt-1.ckpt.rejected").is_file()

    summary = train(cfg, Paths(root))  # the requeued job
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    assert (root / "models" / "pretrain" / "model.safetensors").is_file()
