"""Checkpoints for resume: where they live, how they are written, which one a run resumes from.

- A run's checkpoints live in ``checkpoints/pretrain/<run key>/``; the key hashes every config
  key that changes what is computed (not logging or hardware keys) and the token shards' meta.json,
  so a changed config starts a fresh run instead of resuming an incompatible one.
- ``step-NNNNNNNN.ckpt`` every ``checkpoint_every`` steps (the newest ``keep`` kept) and
  ``last.ckpt`` when training ends. Each is written to a temporary file and renamed, with a
  ``.sha256`` sidecar; a file whose hash differs, or that does not load, is skipped with a warning
  and the previous complete checkpoint is used.
- Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain Python data
  only, so opening one never runs pickled code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from lmpipe.io import atomic_write, config_hash, sha256_file
from lmpipe.train.config import OPERATIONAL_KEYS, PretrainConfig

log = logging.getLogger(__name__)



class _FullStateSaveNotice(logging.Filter):
    """Drops Lightning's "`weights_only` was not set, defaulting to `False`" line on every save.

    Saving the full training state (optimizer, loops) is what exact resume needs; the line reads
    like unsafe loading in a pipeline log although loading here is always ``weights_only=True``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`weights_only` was not set" not in record.getMessage()


logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(_FullStateSaveNotice())

STEP_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")
LAST_NAME = "last.ckpt"


def run_key(cfg: PretrainConfig, tokens_meta_sha256: str) -> str:
    """Short hash of what a run computes: the config minus operational keys, plus the data."""
    computed = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in OPERATIONAL_KEYS}
    return config_hash({"config": computed, "tokens_meta": tokens_meta_sha256})[:16]


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file renamed into place, plus a sha256 sidecar; loads weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)
        with atomic_write(sidecar(path), "w") as handle:
            handle.write(sha256_file(path) + "\n")

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        for file in (Path(path), sidecar(Path(path))):
            file.unlink(missing_ok=True)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def inspect_checkpoint(path: Path, key: str) -> int:
    """Global step of a complete checkpoint of run ``key``; raises ValueError saying why it is unusable."""
    digest_file = sidecar(path)
    if digest_file.is_file() and digest_file.read_text().strip() != sha256_file(path):
        raise ValueError("sha256 differs from its .sha256 file (truncated or corrupt)")
    try:
        # mmap: reads the archive's index and pickled structure, not every tensor.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a torn zip raises RuntimeError, other damage other types
        raise ValueError(f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    found = state.get("lmpipe", {}).get("run_key")
    if found != key:
        raise ValueError(f"belongs to run {found!r}, not {key!r}")
    return int(state["global_step"])


def find_resume_checkpoint(directory: Path, key: str) -> tuple[Path, int] | None:
    """The complete checkpoint with the highest step in ``directory`` (None if there is none)."""
    if not directory.is_dir():
        return None
    best: tuple[Path, int] | None = None
    for path in sorted(directory.glob("*.ckpt")):
        try:
            step = inspect_checkpoint(path, key)
        except ValueError as reason:
            log.warning("skipping checkpoint %s: %s", path, reason)
            continue
        if best is None or step > best[1]:
            best = (path, step)
    return best


class PeriodicCheckpoint(Callback):
    """Saves ``step-N.ckpt`` every ``every`` steps (keeping the newest ``keep``) and ``last.ckpt``
    at the end. Runs after the monitor and its divergence guard, so a step whose loss is not
    finite raises before it can be saved; the weights are checked for NaN/inf as well."""

    def __init__(self, directory: Path, every: int, keep: int) -> None:
        self.directory, self.every, self.keep = directory, every, keep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.stepped and self.every and step % self.every == 0:
            self.save(trainer, pl_module, self.directory / f"step-{step:08d}.ckpt")
            if trainer.is_global_zero:
                self._prune()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.save(trainer, pl_module, self.directory / LAST_NAME)

    def save(self, trainer: L.Trainer, pl_module: Any, path: Path) -> None:
        from lmpipe.train.callbacks import TrainingDiverged

        finite = bool(torch.stack([p.detach().float().abs().sum() for p in pl_module.parameters()]).sum().isfinite())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise TrainingDiverged(f"weights contain NaN/inf at step {trainer.global_step}; not saving {path.name}")
        trainer.save_checkpoint(path)  # Lightning default: the full training state (optimizer, loops), not weights only

    def _prune(self) -> None:
        steps = sorted(
            (int(m.group(1)), p) for p in self.directory.glob("step-*.ckpt") if (m := STEP_PATTERN.match(p.name))
        )
        for _, path in steps[: max(0, len(steps) - self.keep)]:
            for file in (path, sidecar(path)):
                file.unlink(missing_ok=True)
