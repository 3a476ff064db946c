"""Multi-process pretraining on CPU (gloo), as it runs on GPUs with NCCL: FSDP with sharded
checkpoints resumed at another world size, ranks resuming from rank 0's choice, and a NaN on one
rank stopping every rank.

Every distributed run is ``torchrun`` with 2 processes running :data:`CHILD`, which calls the
stage's ``train`` with a recorder (each micro-batch's sample indices and its optimizer step) and,
as a test asks, a stop after a step, a NaN on one rank, or a rank whose view of the checkpoint
directory lags. The reference is one process training the same global batch of 8 sequences
(2 micro-batches of 4) uninterrupted; runs differ from it only in floating-point summation order.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.model import load_model
from lmpipe.train.checkpoint import find_resume_checkpoint, sidecar
from lmpipe.train.data import write_synthetic_shards
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import accumulation_steps, train

BASE = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}, "micro_batch_size": 4, "max_steps": 8,
    "warmup_steps": 2, "lr": 5e-3, "log_every": 1, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 2,
    "keep_checkpoints": 4, "sample_tokens": 0, "progress": False, "accelerator": "cpu",
    "optimizer": "adamw",  # FSDP shards the matrices Muon needs whole; every run here compares with FSDP's
}
# 8 sequences of 16 tokens a step: 2 micro-batches in one process, 1 on each of 2 processes.
EXPLICIT = {**BASE, "tokens_per_step": 128}

RECORDER = r"""
import json, os
from lightning.pytorch.callbacks import Callback

class Record(Callback):
    # Each micro-batch's sample indices with the optimizer step it belongs to, one file per rank.
    def __init__(self, root, stop_at=0, nan_at=0):
        self.root, self.stop_at, self.nan_at = root, stop_at, nan_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step if pl_module.stepped else trainer.global_step + 1
        with open(os.path.join(self.root, f"samples-{trainer.global_rank}.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
        if not pl_module.stepped:
            return
        if self.nan_at and trainer.global_step == self.nan_at and trainer.global_rank == 1:
            import torch
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
        if self.stop_at and trainer.global_step == self.stop_at:  # after the step's checkpoint
            raise SystemExit(3)
"""

CHILD = RECORDER + r"""
import sys
import torch
from lmpipe.config import Paths
from lmpipe.train import checkpoint
from lmpipe.train.pretrain import stage as pretrain
from lmpipe.train.pretrain.config import PretrainConfig

torch.set_num_threads(1)
root, options = sys.argv[1], json.loads(sys.argv[2])
if options.get("lagging_rank") is not None and os.environ.get("LOCAL_RANK") == str(options["lagging_rank"]):
    # This rank's view of the shared checkpoint directory lags (an NFS attribute cache, say): it
    # would find no checkpoint. Resuming must not depend on what it sees.
    for module in (checkpoint, pretrain):
        if hasattr(module, "find_resume_checkpoint"):
            module.find_resume_checkpoint = lambda directory, key: None
if options.get("fast_clock_rank") is not None and os.environ.get("LOCAL_RANK") == str(options["fast_clock_rank"]):
    # This rank's clock runs twice as fast: ranks that judged a time budget each by their own
    # clock would disagree on when to stop, and one would be left waiting in a collective.
    import time
    real_clock = time.monotonic
    time.monotonic = lambda: 2 * real_clock()
record = Record(root, options.get("stop_at", 0), options.get("nan_at", 0))
pretrain.train(PretrainConfig.model_validate(options["config"]), Paths(root), extra_callbacks=[record])
"""


def shards(root: Path) -> Path:
    write_synthetic_shards(root / "data" / "tokens", vocab_size=40, train_tokens=4000, val_tokens=600)
    return root


def launch(root: Path, options: dict[str, Any], processes: int = 2) -> subprocess.Popen[str]:
    """``python child.py ROOT OPTIONS``, under torchrun with ``processes`` > 1. A script file, not
    ``-c``: with devices > 1 and one process, Lightning starts the other ranks by rerunning argv."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = root / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, str(script), str(root), json.dumps(options)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "--no-python", *command]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill(proc: subprocess.Popen[str]) -> None:
    """Stop a launched run with every rank of it: on SIGTERM torchrun ends its ranks (each in a
    session of its own, so a killed torchrun would leave them running, its output pipe open) and
    kills those still running after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        output, _ = proc.communicate()
        pytest.fail(f"did not finish in {timeout:.0f} s (ranks waiting on each other?):\n{output[-3000:]}")
    return proc.returncode, output


def steps(root: Path) -> dict[int, list[int]]:
    """Optimizer step -> sorted global sample indices it trained on, over all ranks."""
    out: dict[int, list[int]] = {}
    for file in sorted(root.glob("samples-*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["index"])
    return {step: sorted(indices) for step, indices in sorted(out.items())}


def curve(root: Path) -> list[tuple[float, ...]]:
    with open(root / "plots" / "pretrain_loss.csv") as handle:
        return [tuple(float(v) if v else float("nan") for v in row.values()) for row in csv.DictReader(handle)]


def assert_same_training(got: Path, reference: Path, atol: float = 1e-5) -> None:
    for row, expected in zip(curve(got), curve(reference), strict=True):
        assert row == pytest.approx(expected, abs=atol, nan_ok=True)
    model, _ = load_model(got / "models" / "pretrain")
    expected_model, _ = load_model(reference / "models" / "pretrain")
    for (name, a), (_, b) in zip(model.state_dict().items(), expected_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=name)


FSDP = {**BASE, "strategy": "fsdp", "devices": 2}
DDP = {**EXPLICIT, "strategy": "ddp", "devices": 2}
BUDGET = {**DDP, "max_steps": 10**6, "max_time": 4.0, "schedule": "wsd", "eval_every": 0, "log_every": 10,
          "checkpoint_every": 0}


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, subprocess.Popen[str]]]]:
    """The tests' first runs, started together (the machine has 2 cores; most of a short run is
    start-up and waiting on the other rank): name -> (project root, process)."""
    plans = {"fsdp": ({"config": FSDP, "stop_at": 4}, 2), "stopped": ({"config": EXPLICIT, "stop_at": 4}, 1),
             "nan": ({"config": DDP, "nan_at": 3}, 2), "budget": ({"config": BUDGET, "fast_clock_rank": 1}, 2)}
    started = {}
    for name, (options, processes) in plans.items():
        root = shards(tmp_path_factory.mktemp(name))
        started[name] = (root, launch(root, options, processes))
    yield started
    for _, proc in started.values():
        if proc.poll() is None:
            kill(proc)
            proc.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, first_runs: dict[str, Any],
              one_thread_module: None) -> Path:
    """One process, 2 micro-batches of 4 per step, uninterrupted, with the children's recorder
    (trained here while the first runs go on)."""
    root = shards(tmp_path_factory.mktemp("reference"))
    namespace: dict[str, Any] = {}
    exec(RECORDER, namespace)
    train(PretrainConfig.model_validate(EXPLICIT), Paths(root), extra_callbacks=[namespace["Record"](str(root))])
    return root


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_on_one_process_with_the_same_sample_stream(
        first_runs: dict[str, Any], reference: Path) -> None:
    """FSDP on 2 processes, tokens_per_step unset (8 sequences a step), stopped after step 4: its
    checkpoints are torch.distributed.checkpoint shard directories. Resumed on 1 process, the run
    keeps the global batch (2 micro-batches a step) and so the sample stream."""
    root, proc = first_runs["fsdp"]
    code, output = finish(proc)
    assert code != 0, output[-3000:]
    assert not (root / "models" / "pretrain").exists()
    [ckpt_dir] = (root / "checkpoints" / "pretrain").iterdir()
    step4 = ckpt_dir / "step-00000004.ckpt"
    assert step4.is_dir() and len(list(step4.glob("*.distcp"))) == 2 and sidecar(step4).is_file()
    point = find_resume_checkpoint(ckpt_dir, ckpt_dir.name)
    assert point is not None and point.step == 4 and point.tokens_per_step == 128

    code, output = finish(launch(root, {"config": {**FSDP, "devices": 1}}, processes=1))
    assert code == 0, output[-3000:]
    assert json.loads((root / "metrics" / "pretrain.json").read_text())["resumed_from_step"] == 4
    reference_steps = steps(reference)
    assert steps(root) == {s: reference_steps[s] for s in range(1, 9)} and len(reference_steps) == 8
    assert_same_training(root, reference, atol=1e-4)


@pytest.mark.slow
def test_ranks_resume_from_rank_zeros_checkpoint_at_another_world_size(first_runs: dict[str, Any],
                                                                        reference: Path) -> None:
    """A run stopped after step 4 on one process resumes on 2 (DDP, the second process started by
    Lightning) although rank 1 sees no checkpoint: it resumes where rank 0 does, and the run
    equals the uninterrupted one. (Under torchrun the choice is broadcast instead; the FSDP test
    runs that path.)"""
    root, proc = first_runs["stopped"]
    code, output = finish(proc)
    assert code == 3, output[-3000:]
    for file in root.glob("samples-*.jsonl"):  # steps 1-4 as recorded: kept, then the resumed run's
        file.write_text("\n".join(line for line in file.read_text().splitlines()
                                  if json.loads(line)["step"] <= 4) + "\n")
    code, output = finish(launch(root, {"config": DDP, "lagging_rank": 1}, processes=1))
    assert code == 0, output[-3000:]
    assert json.loads((root / "metrics" / "pretrain.json").read_text())["resumed_from_step"] == 4
    assert steps(root) == steps(reference)
    assert_same_training(root, reference)


def test_world_size_that_cannot_keep_the_global_batch_is_refused() -> None:
    """tokens_per_step unset: a new run takes the world size's batch, a resumed one keeps its own."""
    cfg = PretrainConfig.model_validate(BASE)
    assert accumulation_steps(cfg, 16, world_size=2) == 1
    assert accumulation_steps(cfg, 16, world_size=1, resumed_tokens_per_step=128) == 2
    assert accumulation_steps(cfg, 16, world_size=4, resumed_tokens_per_step=256) == 1
    with pytest.raises(ConfigError, match=r"cannot resume on 2 device\(s\).*trained with 64 tokens per step"):
        accumulation_steps(cfg, 16, world_size=2, resumed_tokens_per_step=64)
    explicit = PretrainConfig.model_validate(EXPLICIT)  # an explicit batch is part of the run key
    assert accumulation_steps(explicit, 16, world_size=2, resumed_tokens_per_step=64) == 1


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_and_writes_no_model(first_runs: dict[str, Any]) -> None:
    """Rank 1's weights turn NaN after step 3: every rank stops at step 4 (none is left waiting
    in a collective), and no model, metrics or checkpoint of a NaN step is written."""
    root, proc = first_runs["nan"]
    code, output = finish(proc)
    assert code != 0
    assert output.count("TrainingDiverged") >= 2, output[-3000:]  # raised on both ranks, none left waiting
    assert "train loss is nan at step 4" in output
    assert not (root / "models" / "pretrain").exists() and not (root / "metrics" / "pretrain.json").exists()
    [ckpt_dir] = (root / "checkpoints" / "pretrain").iterdir()
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["step-00000002.ckpt"]


@pytest.mark.slow
def test_ranks_agree_on_when_a_time_budget_ends(first_runs: dict[str, Any]) -> None:
    """max_time under DDP with rank 1's clock running twice as fast: rank 0's clock decides, so
    both ranks stop after the same step and the run ends normally, inside rank 0's budget."""
    root, proc = first_runs["budget"]
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    last_steps = {max(json.loads(line)["step"] for line in file.read_text().splitlines())
                  for file in root.glob("samples-*.jsonl")}
    metrics = json.loads((root / "metrics" / "pretrain.json").read_text())
    assert last_steps == {metrics["steps"]}
    last = torch.load(next(root.glob("checkpoints/pretrain/*/last.ckpt")), weights_only=True)
    budget = next(state for key, state in last["callbacks"].items() if "TimeBudget" in key)
    assert 4.0 * 0.6 < budget["time_elapsed"]["train"] <= 4.0 + 0.25  # rank 0's clock, not rank 1's
