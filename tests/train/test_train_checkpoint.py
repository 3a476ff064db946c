"""Checkpoint files: run keys, atomic writes with sha256 sidecars, choosing where to resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmpipe.train.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, sidecar
from lmpipe.train.distill.config import DistillConfig
from lmpipe.train.finetune.config import ClassificationTask, SFTTask
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.settings import run_key


def save(directory: Path, name: str, key: str, step: int) -> Path:
    path = directory / name
    AtomicCheckpointIO().save_checkpoint({"lmpipe": {"run_key": key}, "global_step": step,
                                          "state_dict": {"w": torch.full((64,), float(step))}}, path)
    return path


@pytest.mark.parametrize("section", [PretrainConfig, DistillConfig, lambda **kw: SFTTask(type="sft", **kw),
                                     lambda **kw: ClassificationTask(type="classification", **kw)])
def test_run_key_changes_with_what_is_computed_not_with_how_it_is_watched(section) -> None:
    # The shared settings mark their operational keys once; every stage keys its runs the same way.
    base = run_key(section(), data="meta")
    assert base == run_key(section(log_every=3, devices=2, checkpoint_every=7, resume=False,
                                   spike_factor=9.0, progress=False), data="meta")
    assert base != run_key(section(lr=3e-4), data="meta")
    assert base != run_key(section(beta2=0.9), data="meta")
    assert base != run_key(section(), data="other tokens")


def test_stage_defaults_differ_only_where_declared_and_keep_the_shared_bounds() -> None:
    sft, cls, pretrain, distill = SFTTask(type="sft"), ClassificationTask(type="classification"), \
        PretrainConfig(), DistillConfig()
    assert (pretrain.beta2, distill.beta2, sft.beta2) == (0.95, 0.95, 0.999)
    assert (pretrain.spike_factor, distill.spike_factor, cls.spike_factor) == (4.0, 4.0, 0.0)
    assert (pretrain.lr, cls.lr, sft.lr) == (2e-3, 5e-4, 1e-3)
    assert SFTTask.model_fields["lr"].description == PretrainConfig.model_fields["lr"].description
    with pytest.raises(ValueError, match="greater than 0"):
        SFTTask(type="sft", lr=0.0)
    with pytest.raises(ValueError, match="'auto' or 'ddp'"):
        DistillConfig(strategy="fsdp")
    # one evaluation group: the same names and meanings in every stage, defaults as declared there
    assert (pretrain.eval_every, distill.eval_every, sft.eval_every) == (100, 100, 50)
    assert (pretrain.eval_batches, distill.eval_batches, distill.eval_batch_size, cls.eval_batch_size) == (20, 20, 64, 64)
    assert (distill.patience, cls.patience) == (0, 5)
    for name in ("eval_batches", "eval_batch_size", "min_delta"):
        owner = PretrainConfig if name == "eval_batches" else SFTTask
        assert DistillConfig.model_fields[name].description == owner.model_fields[name].description, name


def test_evaluation_cadence_keys_a_run_only_where_evaluations_pick_the_weights() -> None:
    """Pretraining's val evaluations (export_weights: best) and dev evaluations (fine-tuning,
    classification distillation) choose the exported weights and may stop training, so their
    cadence changes a run; how big a dev batch is, or how often the loss is logged, does not."""
    assert run_key(PretrainConfig(eval_every=7)) != run_key(PretrainConfig())
    assert run_key(PretrainConfig(eval_batches=3)) != run_key(PretrainConfig())
    assert run_key(PretrainConfig(log_every=3)) == run_key(PretrainConfig())
    for section in (DistillConfig, lambda **kw: ClassificationTask(type="classification", **kw)):
        assert run_key(section(eval_every=7)) != run_key(section())
        assert run_key(section(eval_batch_size=7)) == run_key(section())


def test_newest_complete_checkpoint_of_the_run_is_chosen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert find_resume_checkpoint(tmp_path / "absent", "k") is None
    save(tmp_path, "step-00000002.ckpt", "k", 2)
    four = save(tmp_path, "step-00000004.ckpt", "k", 4)
    save(tmp_path, "last.ckpt", "k", 6)
    save(tmp_path, "step-00000008.ckpt", "another run", 8)
    assert sidecar(four).read_text().strip() and not list(tmp_path.glob(".*.tmp"))
    assert find_resume_checkpoint(tmp_path, "k")[:2] == (tmp_path / "last.ckpt", 6)
    assert "belongs to run 'another run'" in caplog.text

    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-10])  # truncated: the sidecar hash no longer matches
    assert find_resume_checkpoint(tmp_path, "k")[:2] == (four, 4)
    sidecar(four).unlink()  # no sidecar: the file must still load as a zip archive
    four.write_bytes(four.read_bytes()[:200])
    assert find_resume_checkpoint(tmp_path, "k")[:2] == (tmp_path / "step-00000002.ckpt", 2)
    assert "cannot be loaded" in caplog.text


class Payload:
    """Stands for any object whose unpickling could run code."""


def test_checkpoints_load_without_unpickling_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"lmpipe": {"run_key": "k"}, "global_step": 1, "obj": Payload()}, path)
    assert find_resume_checkpoint(tmp_path, "k") is None  # weights_only refuses arbitrary objects
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)
