"""Callbacks of the training loop: metrics and throughput, divergence guard, validation with bits
per byte, dev evaluation, model selection and early stopping on either, sample generations and progress (a bar on a
terminal, plain lines elsewhere).

All of them act on optimizer-step boundaries (``pl_module.stepped``) and return at once on other
steps, so the per-step cost is a few attribute reads. MLflow calls go through a background thread
(:class:`AsyncTracker`): a metrics write to MLflow's SQLite store takes tens of milliseconds,
longer than a small model's step.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Timer
from torch import Tensor, nn

from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.tracking import StageTracker, flatten
from lmpipe.train.objectives import Objective

log = logging.getLogger(__name__)


class TrainingDiverged(LmpipeError):
    """The train loss became NaN/inf or spiked far above its running average."""


class TrainingInterrupted(LmpipeError):
    """Training was stopped from outside (SIGTERM, a SLURM requeue) before it finished; no model was written."""


ASYNC_LOGGING_ENV = "LMPIPE_ASYNC_LOGGING"
ASYNC_BACKENDS = ("thread", "mlflow")
SAMPLES_TABLE = "samples.json"


class AsyncTracker:
    """Logs to the stage's MLflow run without making the training loop wait.

    Two backends behind one interface, chosen by ``backend`` or ``LMPIPE_ASYNC_LOGGING``:

    - ``thread``: a daemon thread of ours. MLflow's fluent API keeps the active run per
      thread, so the worker talks to the run by id through an ``MlflowClient``; metric timestamps
      are taken when the metric is submitted. The worker writes at most once per ``min_interval``
      seconds, all queued metrics in one batch: a write to the SQLite store is tens of
      milliseconds of Python, which would otherwise compete for the interpreter lock with a fast
      training loop.
    - ``mlflow`` (default): MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``), whose
      queue batches and writes from MLflow's thread; artifacts (samples) are written at once, as
      MLflow has no asynchronous artifact logging for a run by id. ``close`` flushes the queue.

    MLflow's is the default: ``benchmarks/pretrain_throughput.py --async-logging mlflow`` keeps the
    pipeline at 0.99x of the bare loop (0.98x logging every step), as ``thread`` does
    (docs/benchmarks.md), so the maintained implementation wins.
    """

    MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
    MAX_PARAMS_PER_BATCH = 100

    def __init__(self, tracker: StageTracker, min_interval: float = 2.0, backend: str | None = None) -> None:
        self.run_id = tracker.run_id if tracker.enabled else None
        self._run_id = self.run_id or ""
        self.min_interval = min_interval
        self.backend = backend or os.environ.get(ASYNC_LOGGING_ENV) or "mlflow"
        if self.backend not in ASYNC_BACKENDS:
            raise ConfigError(f"{ASYNC_LOGGING_ENV}={self.backend!r}: expected one of {', '.join(ASYNC_BACKENDS)}")
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        if self.run_id is not None:
            import mlflow

            self._client = mlflow.MlflowClient()
            if self.backend == "thread":
                self._thread = threading.Thread(target=self._work, name="lmpipe-mlflow", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        last_write = -math.inf
        done = False
        while not done:
            items = [self._queue.get()]
            wait = self.min_interval - (time.monotonic() - last_write)
            if items[0] is not None and wait > 0:
                self._closing.wait(wait)  # cut short by close()
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in items
            self._write([item for item in items if item is not None])
            last_write = time.monotonic()

    def _write(self, items: list[tuple[str, Any]], synchronous: bool = True) -> None:
        metrics = [m for kind, payload in items if kind == "metrics" for m in payload]
        params = [p for kind, payload in items if kind == "params" for p in payload]
        calls = [payload for kind, payload in items if kind == "call"]
        try:
            for start in range(0, len(metrics), self.MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=metrics[start:start + self.MAX_METRICS_PER_BATCH],
                                       synchronous=synchronous)
            for start in range(0, len(params), self.MAX_PARAMS_PER_BATCH):
                self._client.log_batch(self._run_id, params=params[start:start + self.MAX_PARAMS_PER_BATCH],
                                       synchronous=synchronous)
            for call in calls:
                call()
        except Exception as err:  # tracking must never kill training
            log.warning("MLflow logging failed: %s", err)

    def _submit(self, kind: str, payload: Any) -> None:
        if self._thread is not None:
            self._queue.put((kind, payload))
        elif self.run_id is not None:  # backend "mlflow": MLflow's queue does the waiting
            self._write([(kind, payload)], synchronous=False)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._submit("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._submit("params", [Param(k, str(v)[:6000]) for k, v in flatten(params).items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("call", lambda: self._client.log_text(self._run_id, text, artifact_file))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows appended to the run's table ``artifact_file`` (JSON; MLflow's Artifacts and Evaluation views)."""
        import pandas as pd

        frame = pd.DataFrame(rows)
        self._submit("call", lambda: self._client.log_table(self._run_id, frame, artifact_file))

    def close(self) -> None:
        """Write everything submitted, then stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._closing.set()
            self._thread.join()
            self._thread = None
        elif self.run_id is not None:
            import mlflow

            try:
                mlflow.flush_async_logging()
            except Exception as err:  # tracking must never kill training
                log.warning("MLflow logging failed: %s", err)


class TaskAsyncTracker(AsyncTracker):
    """The background MLflow logger with a task's name as key prefix (``sft/train/loss``), so
    several tasks can share the stage's run."""

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


class DivergenceGuard:
    """Raises TrainingDiverged on a non-finite loss, or on a loss above ``spike_factor`` times the
    exponential moving average of the logged losses since warmup ended."""

    def __init__(self, spike_factor: float, warmup_steps: int, decay: float = 0.9) -> None:
        self.spike_factor, self.warmup_steps, self.decay = spike_factor, warmup_steps, decay
        self.average: float | None = None

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"train loss is {loss} at step {step}: training diverged (lower pretrain.lr, raise "
                "pretrain.warmup_steps or check the data); no checkpoint was written for this step"
            )
        if step <= self.warmup_steps:
            return  # early losses fall fast and would keep the average high for long
        if self.spike_factor > 0 and self.average is not None and loss > self.spike_factor * self.average:
            raise TrainingDiverged(
                f"train loss spiked to {loss:.3f} at step {step}, over {self.spike_factor}x its running "
                f"average {self.average:.3f} (lower pretrain.lr or raise pretrain.spike_factor)"
            )
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss


def at_end(trainer: L.Trainer) -> bool:
    """True on the run's last optimizer step: max_steps reached, or the loop told to stop (the time
    budget, early stopping) at this step. The callbacks that act "at the end" ask this."""
    return trainer.global_step >= trainer.max_steps or trainer.should_stop


class TimeBudget(Timer):
    """``max_time``: ends training at the step boundary where the time budget would run out,
    keeping time for the final evaluation and checkpoint; Lightning's Timer keeps the clock (and,
    in checkpoints, the elapsed time, so a resumed run continues its remaining budget).

    At every optimizer step boundary rank 0 predicts the time at the end of the next step (its
    clock plus the average step time) and adds the reserve: the longest step-boundary work seen
    so far (evaluations, checkpoints, samples, timed from this callback's turn to the next step's
    start), and at least :attr:`MARGIN` of the budget for end-only work no earlier step showed
    (samples or a checkpoint written only at the end). When the next step would end past ``max_time - reserve`` it
    is the last one: the time fraction handed to the learning-rate schedule becomes 1 (the decay
    ends on it) and the loop stops after it. Rank 0's decision and fraction are broadcast every
    step, so ranks never disagree on when to stop. Must come first among the callbacks, so the
    others see ``trainer.should_stop`` on the last step (:func:`at_end`).
    """

    MARGIN = 0.02

    def __init__(self, max_time: float) -> None:
        super().__init__(duration={"seconds": max_time}, interval="step")
        self.max_time = max_time
        self.time_fraction = 0.0  # read by TrainModule for the learning rate of the next step
        self.reserve = 0.0
        self._step_time: float | None = None
        self._step_start: float | None = None
        self._boundary: float | None = None
        self._last_next = False

    def on_fit_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # After a resume has restored the elapsed time: a spent budget trains no further step.
        self._decide(trainer, final=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        pl_module.budget = self

    def _decide(self, trainer: L.Trainer, final: bool) -> None:
        """Rank 0's plan for the next step, on every rank: stop now (``final``: the step just
        done was planned as the last), make it the last one, or go on; and its time fraction."""
        stop, self._last_next = final, False
        if not stop:
            training_time = self.max_time - max(self.reserve, self.MARGIN * self.max_time)  # for steps
            step_end = self.time_elapsed() + (self._step_time or 0.0)  # the end of one more step
            self._last_next = step_end + (self._step_time or 0.0) > training_time
            self.time_fraction = 1.0 if self._last_next else min(1.0, step_end / max(training_time, 1e-9))
            stop = step_end > training_time  # not even one more step fits
        if trainer.world_size > 1:
            stop, self._last_next, self.time_fraction = trainer.strategy.broadcast(
                (stop, self._last_next, self.time_fraction), src=0)
        if stop:
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.info("time budget: stopping at step %d after %.1f s of max_time %.1f s (%.1f s kept for the "
                         "final evaluation and checkpoint)", trainer.global_step, self.time_elapsed(),
                         self.max_time, self.reserve)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module._acc.micro:  # not the first micro-batch of an optimizer step
            return
        now = time.monotonic()
        if self._boundary is not None:
            self.reserve = max(self.reserve, now - self._boundary)
        self._step_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.stepped:
            return
        now = time.monotonic()
        if self._step_start is not None:
            took = now - self._step_start
            self._step_time = took if self._step_time is None else 0.8 * self._step_time + 0.2 * took
        self._decide(trainer, final=self._last_next)
        self._boundary = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reserve": self.reserve, "step_time": self._step_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reserve = float(state_dict.get("reserve", 0.0))
        self._step_time = state_dict.get("step_time")


class TrainingMonitor(Callback):
    """Every ``log_every`` steps (and on the steps other callbacks act on): one host sync to read
    the mean train loss and grad norm, throughput and MFU, the divergence guard, MLflow metrics,
    and the loss history that the stage writes as a CSV. The history lives in checkpoints."""

    def __init__(self, *, log_every: int, also_at: tuple[int, ...], tracker: AsyncTracker,
                 flops_per_token: float, peak_flops: float | None, guard: DivergenceGuard) -> None:
        self.log_every, self.also_at = log_every, tuple(n for n in also_at if n > 0)
        self.tracker, self.flops_per_token, self.peak_flops, self.guard = tracker, flops_per_token, peak_flops, guard
        self.train: list[list[float]] = []  # [step, loss]
        self.val: list[list[float]] = []  # [step, loss, bpb]
        self.throughput: list[float] = []  # tokens/s of each logged interval
        self.last: dict[str, float] = {}
        self.last_parts: dict[str, float] = {}
        self._mark: tuple[float, int] | None = None

    def wants(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        return step % self.log_every == 0 or at_end(trainer) or any(step % n == 0 for n in self.also_at)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._mark = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.stepped and self.wants(trainer):
            self.flush(trainer, pl_module)

    def flush(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        stats = pl_module.consume_stats()
        parts = stats.get("parts")
        if parts and trainer.is_global_zero:  # the terms of a loss made of several (distillation)
            self.last_parts = dict(zip(parts, torch.stack(list(parts.values())).tolist(), strict=True))
            self.tracker.log_metrics({f"train/{k}": v for k, v in self.last_parts.items()}, step)
        if stats["loss"] is None:
            return
        norm = stats["grad_norm"] if stats["grad_norm"] is not None else torch.zeros_like(stats["loss"])
        values = trainer.strategy.reduce(torch.stack([stats["loss"], norm]), reduce_op="mean")
        loss, grad_norm = values.tolist()  # the host sync of this interval
        now = time.perf_counter()
        assert self._mark is not None
        seconds, steps = now - self._mark[0], step - self._mark[1]
        self._mark = (now, step)
        self.guard.check(step, loss)
        tokens_per_s = steps * pl_module.tokens_per_step / seconds if seconds > 0 else 0.0
        self.throughput.append(tokens_per_s)
        optimizers = pl_module.optimizers()  # AdamW first, then Muon when it is on
        lr = (optimizers[0] if isinstance(optimizers, list) else optimizers).param_groups[0]["lr"]
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr,
                   "perf/tokens_per_s": tokens_per_s, "perf/step_ms": 1000 * seconds / max(1, steps)}
        if self.peak_flops:
            metrics["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * trainer.world_size)
        self.last = metrics
        if trainer.is_global_zero:
            self.train.append([step, loss])
            self.tracker.log_metrics(metrics, step)

    def record_val(self, step: int, loss: float, bpb: float | None) -> None:
        self.val.append([step, loss, bpb if bpb is not None else float("nan")])
        metrics = {"val/loss": loss}
        if bpb is not None:
            metrics["val/bpb"] = bpb
        self.tracker.log_metrics(metrics, step)

    def mean_tokens_per_s(self) -> float:
        """Throughput over the run, leaving out the first interval (start-up, compilation)."""
        steady = self.throughput[1:] or self.throughput
        return sum(steady) / len(steady) if steady else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val, "throughput": self.throughput,
                "guard_average": self.guard.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train, self.val = [list(r) for r in state["train"]], [list(r) for r in state["val"]]
        self.throughput = list(state["throughput"])
        self.guard.average = state["guard_average"]


class BestWeights:
    """Model selection and early stopping on one metric of the evaluations of a run, for
    :class:`Validation` and :class:`DevEvaluation`: keeps a CPU copy of the weights of the best
    evaluation (taken by the caller's ``snapshot``, on the ranks that export) and stops training
    after ``patience`` evaluations without an improvement larger than ``min_delta`` (Prechelt 1998,
    "Early stopping - but when?"). Its state lives in the owning callback's checkpoint state."""

    def __init__(self, *, monitor: str, mode: str, patience: int, min_delta: float) -> None:
        self.monitor, self.sign = monitor, -1.0 if mode == "min" else 1.0
        self.patience, self.min_delta = patience, min_delta
        self.best: dict[str, float] | None = None
        self.state: dict[str, Tensor] = {}
        self.bad_evaluations = 0
        self.stopped = False

    def offer(self, trainer: L.Trainer, step: int, metrics: dict[str, float],
              snapshot: Callable[[], dict[str, Tensor]]) -> bool:
        """Record an evaluation; True (and a new snapshot) when it is the best so far. Called on
        every rank, which all see the same reduced metrics, so they agree on when to stop."""
        value = metrics[self.monitor]
        best = self.best[self.monitor] if self.best is not None else None
        if best is None or self.sign * (value - best) > self.min_delta:
            self.best, self.bad_evaluations = {"step": float(step), **metrics}, 0
            self.state = snapshot()
            return True
        self.bad_evaluations += 1
        if self.patience and self.bad_evaluations >= self.patience:
            self.stopped = trainer.should_stop = True
            log.info("early stopping at step %d: %s has not improved on %.4f (step %d) for %d evaluations",
                     step, self.monitor, best, int(self.best["step"]) if self.best else 0, self.bad_evaluations)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_state": self.state, "bad_evaluations": self.bad_evaluations,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state["best"]) if state["best"] is not None else None
        self.state = dict(state["best_state"])
        self.bad_evaluations, self.stopped = int(state["bad_evaluations"]), bool(state["stopped"])


class Validation(Callback):
    """Val loss (nats/token) and bits per byte every ``every`` steps and at the last step.

    bpb = loss * tokens / bytes / ln 2 with the val split's token and UTF-8 byte counts from
    meta.json: a tokenizer-independent number, comparable across vocabularies.

    With ``selection`` the val loss also picks the weights to export (``snapshot`` copies them; see
    :class:`BestWeights`) and can stop training early.
    """

    def __init__(self, *, every: int, batches: Callable[[int, int], Iterator[dict[str, torch.Tensor]]],
                 tokens_per_byte: float | None, monitor: TrainingMonitor, selection: BestWeights | None = None,
                 snapshot: Callable[[L.Trainer], dict[str, Tensor]] | None = None) -> None:
        self.every, self.batches, self.tokens_per_byte, self.monitor = every, batches, tokens_per_byte, monitor
        if selection is not None and snapshot is None:
            raise ValueError("Validation: a selection needs a snapshot of the weights")
        self.selection, self.snapshot = selection, snapshot

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.selection is not None and self.selection.stopped:  # resumed from a run that had stopped early
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.stepped and ((self.every and step % self.every == 0) or at_end(trainer)):
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: Any) -> tuple[float, float | None]:
        was_training = pl_module.training
        pl_module.eval()
        totals = torch.zeros(2, device=pl_module.device)
        with trainer.precision_plugin.forward_context():
            for batch in self.batches(trainer.global_rank, trainer.world_size):
                batch = {k: v.to(pl_module.device, non_blocking=True) for k, v in batch.items()}
                totals += pl_module.eval_sums(batch).float()
        pl_module.train(was_training)
        loss_sum, count = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        loss = loss_sum / max(count, 1.0)
        bpb = loss * self.tokens_per_byte / math.log(2) if self.tokens_per_byte else None
        if trainer.is_global_zero:
            self.monitor.record_val(trainer.global_step, loss, bpb)
            log.info("step %d: val loss %.4f%s", trainer.global_step, loss, f", {bpb:.4f} bits/byte" if bpb else "")
        if self.selection is not None and self.snapshot is not None:
            metrics = {"loss": loss, **({"bpb": bpb} if bpb is not None else {})}
            snapshot = self.snapshot
            self.selection.offer(trainer, trainer.global_step, metrics, lambda: snapshot(trainer))
        return loss, bpb

    def state_dict(self) -> dict[str, Any]:
        return self.selection.state_dict() if self.selection is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.selection is not None and state:
            self.selection.load_state_dict(state)


class DevEvaluation(Callback):
    """Scores the dev set at step 0 (the reference), every ``every`` steps and at the last step;
    keeps a CPU copy of the trainable weights of the best evaluation after step 0 and stops early
    (:class:`BestWeights`, on the objective's ``monitor``)."""

    def __init__(self, *, every: int, batches: Callable[[int, int], list[dict[str, Tensor]]], objective: Objective,
                 patience: int, min_delta: float, tracker: AsyncTracker) -> None:
        self.every, self.batches, self.objective, self.tracker = every, batches, objective, tracker
        self.selection = BestWeights(monitor=objective.monitor, mode=objective.mode, patience=patience,
                                     min_delta=min_delta)
        self.history: list[dict[str, float]] = []
        self._batches: dict[tuple[int, int], list[dict[str, Tensor]]] = {}  # collated once per (rank, world)

    @property
    def best(self) -> dict[str, float] | None:
        return self.selection.best

    @property
    def stopped(self) -> bool:
        return self.selection.stopped

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.stopped:  # resumed from a run that had already stopped early: nothing to train
            trainer.should_stop = True
        elif not self.history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.stepped and ((self.every and step % self.every == 0) or at_end(trainer)):
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
            self.selection.offer(trainer, step, metrics, lambda: {
                n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad})
        if trainer.is_global_zero:
            self.tracker.log_metrics({f"dev/{k}": v for k, v in metrics.items()}, step)
            log.info("step %d: dev %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def restore_best(self, model: nn.Module) -> None:
        """Load the trainable weights of the best evaluation into ``model``."""
        if self.selection.state:
            unexpected = model.load_state_dict(self.selection.state, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"best weights do not match the model: unexpected {unexpected[:3]}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, **self.selection.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.selection.load_state_dict(state)


class SampleGenerations(Callback):
    """Generate from a few prompts every ``every`` steps and at the end; text goes to the log and
    to the MLflow table ``samples.json`` (one row per step and prompt, so the UI compares steps side
    by side). Uses its own RNG so training randomness is untouched."""

    def __init__(self, *, every: int, prompts: list[list[int]], decode: Callable[[list[int]], str],
                 max_new_tokens: int, temperature: float, top_k: int | None, stop_id: int, seed: int,
                 tracker: AsyncTracker) -> None:
        self.every, self.prompts, self.decode, self.max_new_tokens = every, prompts, decode, max_new_tokens
        self.temperature, self.top_k, self.stop_id, self.seed, self.tracker = temperature, top_k, stop_id, seed, tracker

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        due = (self.every and step % self.every == 0) or at_end(trainer)
        if pl_module.stepped and due and trainer.is_global_zero:
            self.generate(trainer, pl_module)

    def generate(self, trainer: L.Trainer, pl_module: Any) -> list[str]:
        model = pl_module.model
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_step)
        was_training = model.training
        model.eval()
        texts = []
        with trainer.precision_plugin.forward_context():
            for prompt in self.prompts:
                idx = torch.tensor([prompt], dtype=torch.long, device=pl_module.device)
                out = model.generate(idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                     stop_tokens=[self.stop_id], generator=generator)
                new = [t for t in out[0, len(prompt):].tolist()]
                if self.stop_id in new:
                    new = new[:new.index(self.stop_id)]
                texts.append(self.decode(prompt + new))
        model.train(was_training)
        body = "\n\n".join(f"--- sample {i}\n{text}" for i, text in enumerate(texts))
        log.info("step %d samples:\n%s", trainer.global_step, body)
        self.tracker.log_table([{"step": trainer.global_step, "sample": i, "prompt": self.decode(prompt), "text": text}
                                for i, (prompt, text) in enumerate(zip(self.prompts, texts, strict=True))],
                               SAMPLES_TABLE)
        return texts


class StepProgress(Callback):
    """Progress over optimizer steps (:class:`lmpipe.progress.Progress`): a rich bar on a terminal,
    redrawn only when the monitor has new numbers; elsewhere a plain line with step, loss, tokens/s
    and ETA every few seconds."""

    def __init__(self, monitor: TrainingMonitor, label: str = "pretrain") -> None:
        self.monitor, self.label = monitor, label
        self._progress: Any = None
        self._task: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from lmpipe.progress import Progress

        self._progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeRemainingColumn(), auto_refresh=False,
                                  unit="steps", label=self.label)
        self._task = self._progress.add_task("", total=trainer.max_steps, completed=trainer.global_step)
        self._progress.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._progress is None or not pl_module.stepped:
            return
        step = trainer.global_step
        if self.monitor.wants(trainer):
            m = self.monitor.last
            text = f"loss {m.get('train/loss', float('nan')):.3f}, {m.get('perf/tokens_per_s', 0):,.0f} tok/s"
            self._progress.update(self._task, completed=step, description=text)
            self._progress.refresh()
        elif self._progress.plain:  # the plain line is due by time, not by step: keep the count current
            self._progress.update(self._task, completed=step)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._stop()
