"""Checkpoints for resume: where they live, how they are written, which one a run resumes from.

- A run's checkpoints live in ``checkpoints/pretrain/<run key>/``; the key hashes every config
  key that changes what is computed (not logging or hardware keys) and the token shards' meta.json,
  so a changed config starts a fresh run instead of resuming an incompatible one.
- ``step-NNNNNNNN.ckpt`` every ``checkpoint_every`` steps (the newest ``keep`` kept) and
  ``last.ckpt`` when training ends. Each is written to a temporary file and renamed, with a
  ``.sha256`` sidecar; a file whose hash differs, or that does not load, is skipped with a warning
  and the previous complete checkpoint is used. Under FSDP a checkpoint is a directory of shards
  written by ``torch.distributed.checkpoint`` (each rank its own, loadable at another world
  size) plus ``meta.pt``, built under a temporary name and renamed; its sidecar hashes every file.
- Which checkpoint a run resumes from is decided once, by rank 0, and handed to every rank
  (:func:`agreed_resume_checkpoint`): ranks that chose on their own could resume from different
  steps when their views of a shared filesystem differ.
- Each checkpoint records the global batch it was trained with (``tokens_per_step``). A resume at
  another world size keeps it: the stage recomputes gradient accumulation, or refuses with a
  ConfigError when the new world size cannot reach it (see ``lmpipe.train.pretrain.stage.accumulation_steps``), so
  the resumed run reads the same sample stream as the original.
- SLURM's pre-timeout signal (SIGUSR1, ``--signal`` in ``infra/slurm/pretrain.sbatch``) is
  handled here, not by Lightning's auto-requeue: at the next step boundary every rank saves an
  ordinary ``step-N.ckpt`` (run key, sha256 sidecar), rank 0 requeues the job with ``scontrol``
  and the stage exits with TrainingInterrupted, writing no model; the requeued job resumes from
  that checkpoint through the same checks as any other. Lightning's own ``hpc_ckpt_N.ckpt`` files
  bypassed both checks and are never loaded.
- Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain Python data
  only, so opening one never runs pickled code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from lmpipe.io import atomic_write, fingerprint_path, fsync_dir, fsync_tree, sha256_file

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
SHARDED_META = "meta.pt"  # Lightning's metadata file inside a sharded (FSDP) checkpoint directory
# Rank 0 of a run whose other ranks Lightning starts itself (devices=N, no launcher) puts its choice
# here before fit; the children inherit it with the environment.
RESUME_ENV = "LMPIPE_RESUME_POINT"
REQUEUE_SIGNAL = signal.SIGUSR1


class ResumePoint(NamedTuple):
    """A complete checkpoint of a run: where, its global step, and the tokens per optimizer step
    it was trained with (None in checkpoints that predate the record)."""

    path: Path
    step: int
    tokens_per_step: int | None = None


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


def checkpoint_digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of every file of a sharded checkpoint directory."""
    return fingerprint_path(path) if path.is_dir() else sha256_file(path)


def inspect_checkpoint(path: Path, key: str) -> ResumePoint:
    """The resume point of a complete checkpoint (file or sharded directory) of run ``key``;
    raises ValueError saying why it is unusable."""
    digest_file = sidecar(path)
    if path.is_dir() and not digest_file.is_file():
        raise ValueError("a sharded checkpoint without its .sha256 file (its save did not finish)")
    if digest_file.is_file() and digest_file.read_text().strip() != checkpoint_digest(path):
        raise ValueError("sha256 differs from its .sha256 file (truncated or corrupt)")
    try:
        # mmap: reads the archive's index and pickled structure, not every tensor.
        state = torch.load(path / SHARDED_META if path.is_dir() else path, map_location="cpu",
                           weights_only=True, mmap=True)
    except Exception as err:  # a torn zip raises RuntimeError, other damage other types
        raise ValueError(f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    record = state.get("lmpipe", {})
    found = record.get("run_key")
    if found != key:
        raise ValueError(f"belongs to run {found!r}, not {key!r}")
    tokens = record.get("tokens_per_step")
    return ResumePoint(path, int(state["global_step"]), int(tokens) if tokens else None)


def find_resume_checkpoint(directory: Path, key: str) -> ResumePoint | None:
    """The complete checkpoint with the highest step in ``directory`` (None if there is none)."""
    if not directory.is_dir():
        return None
    best: ResumePoint | None = None
    for path in sorted(directory.glob("*.ckpt")):
        try:
            point = inspect_checkpoint(path, key)
        except ValueError as reason:
            log.warning("skipping checkpoint %s: %s", path, reason)
            continue
        if best is None or point.step > best.step:
            best = point
    return best


def agreed_resume_checkpoint(trainer: L.Trainer, directory: Path, key: str) -> ResumePoint | None:
    """Rank 0's :func:`find_resume_checkpoint`, the same on every rank. Called before ``fit``.

    - one process: its own choice;
    - rank 0 of a run whose other ranks Lightning starts inside ``fit``: its choice, also put in
      the environment (:data:`RESUME_ENV`) that those ranks inherit, which is how they learn it;
    - ranks started by a launcher (torchrun, srun): the process group is set up now, through the
      trainer's strategy (Lightning then reuses it), and rank 0's choice is broadcast.
    """
    strategy = trainer.strategy
    if trainer.world_size == 1:
        return find_resume_checkpoint(directory, key)
    inherited = os.environ.get(RESUME_ENV)
    if inherited:
        record = json.loads(inherited)
        if record.get("key") == key and record.get("parent") == os.getppid():
            point = record["point"]
            return ResumePoint(Path(point[0]), int(point[1]), point[2]) if point else None
    environment = getattr(strategy, "cluster_environment", None)
    if environment is not None and not environment.creates_processes_externally:
        point = find_resume_checkpoint(directory, key)
        os.environ[RESUME_ENV] = json.dumps({"key": key, "parent": os.getpid(),
                                             "point": [str(point.path), point.step, point.tokens_per_step]
                                             if point else None})
        return point
    strategy.setup_environment()  # the process group; Lightning's own setup finds it initialised
    point = find_resume_checkpoint(directory, key) if trainer.global_rank == 0 else None
    shared: Any = strategy.broadcast([str(point.path), point.step, point.tokens_per_step] if point else None, src=0)
    return ResumePoint(Path(shared[0]), int(shared[1]), shared[2]) if shared else None


def reject_lightning_requeue_checkpoints(directory: Path) -> None:
    """Rename Lightning's ``hpc_ckpt_N.ckpt`` files in ``directory`` (the trainer's root dir) out
    of its reach: under SLURM it loads the newest one by itself when no checkpoint is passed to
    ``fit``, without the run-key and sha256 checks (any name containing ``hpc_ckpt_`` counts)."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if "hpc_ckpt_" in path.name:
            # Neither "hpc_ckpt_" (Lightning's scan) nor ".ckpt" at the end (find_resume_checkpoint's).
            target = path.with_name(path.name.replace("hpc_ckpt_", "hpc-ckpt-") + ".rejected")
            log.warning("not resuming from %s (not written by lmpipe's checkpoints); renamed to %s", path, target.name)
            os.replace(path, target)


class ShardedFSDPStrategy(FSDPStrategy):
    """FSDP with sharded checkpoints (``torch.distributed.checkpoint``), saved atomically.

    Every rank writes its shards into ``.<name>.partial``; once all are done rank 0 fsyncs it,
    renames it to ``<name>`` and writes the sha256 sidecar. A subclass also because Lightning
    refuses the plain FSDPStrategy on CPU, where the test suite runs it (gloo).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(state_dict_type="sharded", **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the module's GPT (``model.model``), not the LightningModule: Lightning's root
        wrapper runs ``training_step`` inside FSDP's forward, and the step's own backward there
        trips FSDP's state checks. With the GPT as the FSDP root, Lightning sees a model already
        wrapped and leaves the LightningModule as it is."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        gpt = getattr(model, "model", None)
        if gpt is None or isinstance(gpt, FullyShardedDataParallel):
            return super()._setup_model(model)
        # Lightning passes device_id=None on the CPU, which torch's FSDP reads as "find an accelerator".
        device = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        model.model = FullyShardedDataParallel(
            module=gpt, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=device, **self.kwargs)
        return model

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("lmpipe-checkpoint-start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("lmpipe-checkpoint-written")
        if self.global_rank == 0:
            fsync_tree(partial)
            sidecar(path).unlink(missing_ok=True)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            os.replace(partial, path)
            fsync_dir(path.parent)
            with atomic_write(sidecar(path), "w") as handle:
                handle.write(checkpoint_digest(path) + "\n")
        self.barrier("lmpipe-checkpoint-done")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            sidecar(path).unlink(missing_ok=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (gathered from the shards, on the CPU); {} elsewhere."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None
        config = FullStateDictConfig(offload_to_cpu=self.root_device.type != "cpu", rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()


class PeriodicCheckpoint(Callback):
    """Saves ``step-N.ckpt`` every ``every`` steps (keeping the newest ``keep``) and ``last.ckpt``
    at the end. Runs after the monitor and its divergence guard, so a step whose loss is not
    finite raises before it can be saved; the weights are checked for NaN/inf as well.

    With ``requeue`` (a SLURM job), SIGUSR1 asks for a checkpoint at the next step boundary, then
    a requeue of the job and TrainingInterrupted (see the module docstring)."""

    def __init__(self, directory: Path, every: int, keep: int, requeue: bool = False) -> None:
        self.directory, self.every, self.keep, self.requeue = directory, every, keep, requeue
        self._signalled = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.requeue:
            self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore_handler()
        self.save(trainer, pl_module, self.directory / LAST_NAME)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore_handler()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True  # acted on at the next step boundary, never inside a step

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.stepped:
            return
        step = trainer.global_step
        requeue = self.requeue and trainer.strategy.reduce_boolean_decision(self._signalled, all=False)
        if requeue or (self.every and step % self.every == 0):
            self.save(trainer, pl_module, self.directory / f"step-{step:08d}.ckpt")
            if trainer.is_global_zero:
                self._prune()
        if requeue:
            self._requeue(trainer, step)

    def _requeue(self, trainer: L.Trainer, step: int) -> None:
        from lmpipe.train.callbacks import TrainingInterrupted

        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                log.warning("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
            else:
                log.info("requeued SLURM job %s", job)
        raise TrainingInterrupted(f"stopped at step {step} for a SLURM requeue; checkpoint step-{step:08d}.ckpt "
                                  "was saved and the requeued job resumes from it; no model was written")

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
            sidecar(path).unlink(missing_ok=True)  # first: a directory without it is never resumed from
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
