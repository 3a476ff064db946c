"""The one training loop: monitor -> callbacks -> trainer -> resume -> module -> fit -> summary.

Every stage that trains (``pretrain``, ``finetune``, ``distill``) describes its run as a
:class:`Run` (settings, checkpoint directory and key, its evaluation callbacks, and how to build
the :class:`~lmpipe.train.module.TrainModule` once the trainer knows the world size) and calls
:func:`fit`. What the loop gives each of them alike: the metrics monitor with its divergence
guard, atomic periodic checkpoints and exact resume (the newest complete checkpoint of the same
run, chosen by rank 0), SLURM requeue, MFU on known GPUs, a progress bar, and a SIGTERM or Ctrl-C
(SIGINT) that ends the stage with an error instead of passing for success.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmpipe.model.gpt import Block
from lmpipe.train.callbacks import (
    AsyncTracker,
    DivergenceGuard,
    StepProgress,
    TimeBudget,
    TrainingInterrupted,
    TrainingMonitor,
)
from lmpipe.train.checkpoint import (
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    ResumePoint,
    ShardedFSDPStrategy,
    agreed_resume_checkpoint,
    reject_lightning_requeue_checkpoints,
)
from lmpipe.train.module import TrainModule
from lmpipe.train.settings import TrainSettings

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of one device, from the vendors' datasheets (for MFU when not configured).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def quiet_lightning() -> None:
    """Lightning's start-up banners (GPU available, tips), a deprecation notice from its own
    pytree helper and its note that the module's batch hook is used with pretraining's datamodule
    (as intended: :class:`TrainModule` reads sample indices there) are noise in a stage log;
    warnings and errors still come through."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`")


def build_trainer(cfg: TrainSettings, callbacks: list[Callback], checkpoint_dir: Path) -> L.Trainer:
    """A Trainer stripped to what the loop uses: no Lightning logger, progress bar, model summary,
    checkpointing or validation loop (the loop's callbacks do those without per-step cost).

    ``checkpoint_dir`` (the run's checkpoint directory) is Lightning's root, where under SLURM
    Lightning would load ``hpc_ckpt_N.ckpt`` by itself, so the loop keeps it free of files it has
    not checked; Lightning's SLURM auto-requeue is off (:class:`PeriodicCheckpoint` requeues);
    FSDP saves sharded checkpoints (:class:`ShardedFSDPStrategy`).
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    use_cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if use_cuda and torch.cuda.is_bf16_supported() else "32-true"
    if use_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
    strategy: Any = cfg.strategy
    if cfg.strategy == "ddp":
        import inspect

        from lightning.pytorch.strategies import DDPStrategy
        from torch.nn.parallel import DistributedDataParallel

        # The models' only buffers are constant position tables: no need to broadcast them every
        # step (the flag was renamed in torch 2.13).
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        ddp_kwargs: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        strategy = DDPStrategy(**ddp_kwargs)
    elif cfg.strategy == "fsdp":
        strategy = ShardedFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=precision, max_steps=cfg.max_steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, plugins=plugins,
        deterministic=cfg.deterministic, use_distributed_sampler=False, default_root_dir=checkpoint_dir,
    )


def device_peak_flops(trainer: L.Trainer) -> float | None:
    """Datasheet bf16 peak of the GPU in use, when training in bf16 on one we know."""
    if trainer.strategy.root_device.type != "cuda" or "bf16" not in str(trainer.precision):
        return None
    name = torch.cuda.get_device_name(trainer.strategy.root_device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


class StopOnInterrupt(Callback):
    """Ctrl-C (SIGINT) during :func:`fit` stops the run the way SIGTERM does.

    Without it a SIGINT could leave the run training on: a process started in the background by
    a non-interactive shell (a CI script, ``cmd &``) inherits SIGINT ignored, which Python keeps;
    and where Python's handler does run, its KeyboardInterrupt is raised wherever the main thread
    happens to be, and swallowed when that is a finalizer, a weakref callback or a library's
    ``except BaseException``. This handler replaces either and only sets Lightning's SIGTERM
    flag: every rank stops at the next batch boundary (Lightning broadcasts rank 0's flag under
    DDP), no checkpoint is added and none is removed, and :func:`fit` raises TrainingInterrupted.
    A second SIGINT kills the process at once (SIGINT's default action), for a run that does not
    reach a batch boundary.
    """

    def __init__(self) -> None:
        self.received = False
        self._trainer: L.Trainer | None = None

    @contextmanager
    def installed(self, trainer: L.Trainer) -> Iterator[None]:
        """The handler, for the duration of the block; the previous one afterwards. Only the main
        thread receives signals: in another thread (a run started from one) this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._trainer = trainer
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._trainer = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        self.received = True
        self._stop()
        log.warning("SIGINT: stopping at the next step; a second SIGINT (Ctrl-C) kills the process at once")

    def _stop(self) -> None:
        if self._trainer is not None:
            # Lightning's stop path for SIGTERM (its signal connector's flag, read by its loops).
            self._trainer._signal_connector.received_sigterm = True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.received:  # Lightning clears its flag when training starts: a Ctrl-C before that still stops
            self._stop()


@dataclass
class Run:
    """One training run of a stage, as :func:`fit` needs it.

    ``start(trainer, resume)`` builds the module once the trainer has read the environment (world
    size, rank) and the resume point is known; it seeds and initialises weights itself, so each
    stage keeps its order of random draws. ``evaluation(monitor)`` gives the stage's evaluation
    callbacks (validation, dev evaluation, samples), which run after the monitor and before the
    checkpoint of a step. ``also_at``: steps those callbacks act on, which the monitor logs too.
    """

    label: str
    settings: TrainSettings
    checkpoint_dir: Path
    key: str
    tracker: AsyncTracker
    start: Callable[[L.Trainer, ResumePoint | None], TrainModule]
    evaluation: Callable[[TrainingMonitor], list[Callback]] = lambda monitor: []
    also_at: tuple[int, ...] = ()
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    datamodule: L.LightningDataModule | None = None
    extra_callbacks: Sequence[Callback] = ()


@dataclass
class Fitted:
    """What a finished :func:`fit` leaves: the trainer, module, monitor, callbacks and resume point."""

    trainer: L.Trainer
    module: TrainModule
    monitor: TrainingMonitor
    callbacks: list[Callback]
    resume: ResumePoint | None
    summary: dict[str, Any] = field(default_factory=dict)


def fit(run: Run) -> Fitted:
    """Train ``run`` to its last step (resuming its newest complete checkpoint) on every rank.

    ``Fitted.summary`` holds what every stage reports: steps, resumed_from_step, tokens_per_s and,
    once logged, train_loss (and each train_<term> of a loss made of several). Raises
    TrainingDiverged on a non-finite or spiking loss, TrainingInterrupted on SIGTERM or SIGINT
    (no model is written; the next run resumes from the newest checkpoint).
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    quiet_lightning()
    cfg = run.settings
    monitor = TrainingMonitor(
        log_every=cfg.log_every, also_at=(*run.also_at, cfg.checkpoint_every), tracker=run.tracker,
        flops_per_token=run.flops_per_token, peak_flops=None, guard=DivergenceGuard(cfg.spike_factor, cfg.warmup_steps),
    )
    evaluation = run.evaluation(monitor)
    # The time budget first: the callbacks after it see on the last step that it is the last.
    callbacks: list[Callback] = [TimeBudget(cfg.max_time)] if cfg.max_time else []
    callbacks += [monitor, *evaluation, PeriodicCheckpoint(
        run.checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints, requeue=SLURMEnvironment.detect())]
    if cfg.progress:
        callbacks.append(StepProgress(monitor, run.label))
    interrupt = StopOnInterrupt()
    trainer = build_trainer(cfg, [*callbacks, interrupt, *run.extra_callbacks], run.checkpoint_dir)
    resume = agreed_resume_checkpoint(trainer, run.checkpoint_dir, run.key) if cfg.resume else None
    if resume is None:
        reject_lightning_requeue_checkpoints(run.checkpoint_dir)
    if run.flops_per_token:
        monitor.peak_flops = run.peak_flops or device_peak_flops(trainer)
    module = run.start(trainer, resume)
    if trainer.is_global_zero and resume:
        log.info("%s: resuming from %s (step %d)", run.label, resume.path, resume.step)
    stopped = False
    try:
        with interrupt.installed(trainer):
            trainer.fit(module, datamodule=run.datamodule, ckpt_path=resume.path if resume else None,
                        weights_only=True)
    except SIGTERMException:
        # Lightning stops every rank at a step boundary on SIGTERM but exits with status 0, which
        # would pass for success to DVC and the flow.
        stopped = True
    finally:
        run.tracker.close()
    if stopped or trainer.received_sigterm or interrupt.received:  # a signal after the last step stops too
        raise TrainingInterrupted(f"stopped by {'SIGINT' if interrupt.received else 'SIGTERM'} at step "
                                  f"{trainer.global_step}; no model was written (the next run resumes from the "
                                  "newest checkpoint)")
    summary: dict[str, Any] = {"steps": trainer.global_step, "resumed_from_step": resume.step if resume else 0,
                               "tokens_per_s": monitor.mean_tokens_per_s()}
    if monitor.train:
        summary["train_loss"] = monitor.train[-1][1]
    summary.update({f"train_{k}": v for k, v in monitor.last_parts.items()})
    return Fitted(trainer, module, monitor, evaluation, resume, summary)
