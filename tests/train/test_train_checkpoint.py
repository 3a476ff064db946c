"""Checkpoint files: run keys, atomic writes with sha256 sidecars, choosing where to resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmpipe.train.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, run_key, sidecar
from lmpipe.train.config import PretrainConfig


def save(directory: Path, name: str, key: str, step: int) -> Path:
    path = directory / name
    AtomicCheckpointIO().save_checkpoint({"lmpipe": {"run_key": key}, "global_step": step,
                                          "state_dict": {"w": torch.full((64,), float(step))}}, path)
    return path


def test_run_key_changes_with_what_is_computed_not_with_how_it_is_watched() -> None:
    base = PretrainConfig()
    assert run_key(base, "meta") == run_key(PretrainConfig(log_every=3, devices=2, checkpoint_every=7), "meta")
    assert run_key(base, "meta") != run_key(PretrainConfig(lr=1e-3), "meta")
    assert run_key(base, "meta") != run_key(base, "other tokens")


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
