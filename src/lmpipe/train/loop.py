"""The training loop of the ``finetune`` stage: a LightningModule, dev evaluation with early
stopping, and task-prefixed MLflow logging.

The loop mirrors pretraining's (:mod:`lmpipe.train.module`) and reuses its pieces: the learning-rate
schedule, the trainer set-up, the metrics monitor with its divergence guard, atomic checkpoints
and exact resume. What differs is the objective (an :class:`Objective`: answer-token loss for
SFT, cross-entropy on a head for classification), that only trainable parameters are optimised
(LoRA freezes the base), and :class:`DevEvaluation`, which scores the dev set, keeps the best
weights and stops early. Its state (history, best weights, patience) lives in the checkpoints, so
a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lmpipe.model.gpt import optim_groups
from lmpipe.tracking import StageTracker
from lmpipe.train.callbacks import AsyncTracker, StepProgress
from lmpipe.train.finetune.data import Batch, TrainBatches
from lmpipe.train.module import StepStats, learning_rate

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What a task type supplies to the loop."""

    monitor: str  # key of metrics() used for early stopping and model selection
    mode: str  # "min" or "max"
    sums_size: int

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def metrics(self, sums: Tensor) -> dict[str, float]: ...


class FinetuneModule(L.LightningModule):
    """Manual-optimization step over ``cfg.accumulation`` micro-batches (see lmpipe.train.module)."""

    def __init__(self, model: nn.Module, objective: Objective, cfg: Any, data: TrainBatches, *, run_key: str) -> None:
        super().__init__()
        self.model, self.objective, self.cfg, self.data, self.run_key = model, objective, cfg, data, run_key
        self.automatic_optimization = False
        self.accumulation = cfg.accumulation
        self.tokens_per_step = 0.0  # of the last monitor interval (real tokens, padding excluded)
        self._acc = StepStats()
        self._batch_seed = 0
        self._tokens = self._steps = 0

    @property
    def stepped(self) -> bool:
        """True right after the micro-batch that completed an optimizer step."""
        return self._acc.stepped

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = optim_groups(self.model, self.cfg.weight_decay)
        # learning_rate reads lr, min_lr_ratio, warmup_steps, schedule, decay_fraction and
        # max_steps, which a finetune task has under the same names.
        return torch.optim.AdamW(groups, lr=learning_rate(0, self.cfg), betas=(self.cfg.beta1, self.cfg.beta2),
                                 eps=self.cfg.eps, fused=self.device.type == "cuda" or None)

    def train_dataloader(self) -> DataLoader:
        return self.data.dataloader(self.trainer)

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # Still on the host: counting here costs no device sync.
        if "index" in batch:
            self._tokens += int(batch["length"].sum())
            self._batch_seed = int(batch["index"][0])
        return batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        wrapped = self.trainer.strategy.model
        if self.accumulation > 1 and isinstance(wrapped, DistributedDataParallel):
            wrapped.require_backward_grad_sync = self._acc.micro == self.accumulation - 1

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        # Dropout masks (head, LoRA, model) from (seed, sample): identical after a resume.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self._batch_seed)
        loss = self.objective.loss(self.model, batch)
        self.manual_backward(loss / self.accumulation if self.accumulation > 1 else loss)
        if self._acc.add_loss(loss, self.accumulation):
            self._steps += 1
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        if self.cfg.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._acc.add_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True).float())
        lr = learning_rate(self.trainer.global_step, self.cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def consume_stats(self) -> dict[str, Any]:
        """Mean train loss and grad norm since the last call (device tensors), as the pretrain
        monitor reads them; also sets ``tokens_per_step`` for the interval's throughput."""
        self.tokens_per_step = self._tokens * self.trainer.world_size / max(1, self._steps)
        self._tokens = self._steps = 0
        return self._acc.consume()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmpipe"] = {"run_key": self.run_key}


class DevEvaluation(Callback):
    """Scores the dev set at step 0 (the reference), every ``every`` steps and at the last step;
    keeps a CPU copy of the trainable weights of the best evaluation after step 0; stops training
    after ``patience`` evaluations without an improvement larger than ``min_delta`` (Prechelt 1998,
    "Early stopping - but when?")."""

    def __init__(self, *, every: int, batches: Callable[[int, int], list[Batch]], objective: Objective,
                 patience: int, min_delta: float, tracker: AsyncTracker) -> None:
        self.every, self.batches, self.objective = every, batches, objective
        self.patience, self.min_delta, self.tracker = patience, min_delta, tracker
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, Tensor] = {}
        self.bad_evaluations = 0
        self.stopped = False
        self._batches: dict[tuple[int, int], list[Batch]] = {}  # collated once per (rank, world)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.stopped:  # resumed from a run that had already stopped early: nothing to train
            trainer.should_stop = True
        elif not self.history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.stepped and ((self.every and step % self.every == 0) or step == trainer.max_steps):
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        model: nn.Module = pl_module.model
        was_training = model.training
        model.eval()
        total = torch.zeros(self.objective.sums_size, device=pl_module.device)
        with trainer.precision_plugin.forward_context():
            where = (trainer.global_rank, trainer.world_size)
            if where not in self._batches:
                self._batches[where] = self.batches(*where)
            for batch in self._batches[where]:
                batch = {k: v.to(pl_module.device, non_blocking=True) for k, v in batch.items()}
                total += self.objective.eval_sums(model, batch).float()
        model.train(was_training)
        metrics = self.objective.metrics(trainer.strategy.reduce(total, reduce_op="sum"))
        step = trainer.global_step
        self.history.append({"step": float(step), **metrics})
        if step > 0:  # step 0 is the reference point: the exported model is always a trained one
            self._select(trainer, model, step, metrics)
        if trainer.is_global_zero:
            self.tracker.log_metrics({f"dev/{k}": v for k, v in metrics.items()}, step)
            log.info("step %d: dev %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _select(self, trainer: L.Trainer, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        value = metrics[self.objective.monitor]
        best = self.best[self.objective.monitor] if self.best is not None else None
        sign = -1.0 if self.objective.mode == "min" else 1.0
        if best is None or sign * (value - best) > self.min_delta:
            self.best, self.bad_evaluations = {"step": float(step), **metrics}, 0
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            return
        self.bad_evaluations += 1
        if self.patience and self.bad_evaluations >= self.patience:
            self.stopped = trainer.should_stop = True
            log.info("early stopping at step %d: dev %s has not improved on %.4f (step %d) for %d evaluations",
                     step, self.objective.monitor, best, int(self.best["step"]) if self.best else 0,
                     self.bad_evaluations)

    def restore_best(self, model: nn.Module) -> None:
        """Load the trainable weights of the best evaluation into ``model``."""
        if self.best_state:
            unexpected = model.load_state_dict(self.best_state, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"best weights do not match the model: unexpected {unexpected[:3]}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "best_state": self.best_state,
                "bad_evaluations": self.bad_evaluations, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.best = dict(state["best"]) if state["best"] is not None else None
        self.best_state = dict(state["best_state"])
        self.bad_evaluations, self.stopped = int(state["bad_evaluations"]), bool(state["stopped"])


class TaskProgress(StepProgress):
    """The pretrain progress, labelled with the task's name."""

    def __init__(self, monitor: Any, label: str) -> None:
        super().__init__(monitor, label)


class TaskAsyncTracker(AsyncTracker):
    """The background MLflow logger of the training loop, with the task's name as key prefix."""

    def __init__(self, tracker: StageTracker, task: str) -> None:
        super().__init__(tracker)
        self.task = task

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics({f"{self.task}/{k}": v for k, v in metrics.items()}, step)

    def log_params(self, params: dict[str, Any]) -> None:
        super().log_params({self.task: params})

    def log_text(self, text: str, artifact_file: str) -> None:
        super().log_text(text, f"{self.task}/{artifact_file}")

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        super().log_table(rows, f"{self.task}/{artifact_file}")


class TaskTracker(StageTracker):
    """The stage's MLflow run seen by one task: metric keys, text/dict names and artifact paths get
    the task's name as prefix, so several tasks can share one run without overwriting each other."""

    def __init__(self, inner: StageTracker, task: str) -> None:
        super().__init__(None, inner.run_id)
        self.inner, self.task = inner, task

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params({self.task: dict(params)})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.inner.log_metrics({f"{self.task}/{k}": v for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, f"{self.task}/{artifact_path}" if artifact_path else self.task)

    def log_dict(self, obj: Any, name: str) -> None:
        self.inner.log_dict(obj, f"{self.task}/{name}")

    def log_text(self, text: str, name: str) -> None:
        self.inner.log_text(text, f"{self.task}/{name}")

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        self.inner.log_table(rows, f"{self.task}/{name}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags({f"{self.task}.{k}": v for k, v in tags.items()})
