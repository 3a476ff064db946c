"""The one LightningModule of every training stage: a lean manual-optimization step driven by an
:class:`~lmpipe.train.objectives.Objective`.

Why manual optimization: Lightning's automatic loop wraps every step in a closure, per-step
logging and progress-bar bookkeeping that cost a visible share of a small model's step on CPU.
Here one ``training_step`` is one micro-batch: the objective's loss, backward, and on the last
micro-batch of an accumulation group clip, set the learning rate and step the optimizers (AdamW,
and with ``optimizer: muon`` Muon for the block matrices). Losses and
gradient norms are summed on the device; the monitor callback reads them every ``log_every``
steps, the only host sync. The learning rate is a pure function of the step, so no scheduler
state needs saving. Only trainable parameters are optimised (LoRA freezes the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lmpipe.model.gpt import optim_groups
from lmpipe.train.muon import Muon
from lmpipe.train.objectives import Objective
from lmpipe.train.settings import OptimSettings


@dataclass
class StepStats:
    """Per-micro-batch bookkeeping: where gradient accumulation stands, and device-side sums of
    loss and grad norm that the monitor reads and resets every log interval (no host sync per
    step). A plain object on purpose: attribute writes on an nn.Module cost microseconds each."""

    micro: int = 0
    stepped: bool = False
    loss_sum: Tensor | None = None
    loss_count: int = 0
    norm_sum: Tensor | None = None
    norm_count: int = 0

    def add_loss(self, loss: Tensor, accumulation: int) -> bool:
        """Count one micro-batch's loss; True when it completes an optimizer step."""
        detached = loss.detach().float()
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), device=detached.device, dtype=torch.float32)
            self.norm_sum = torch.zeros((), device=detached.device, dtype=torch.float32)
        self.loss_sum += detached
        self.loss_count += 1
        self.micro += 1
        self.stepped = self.micro == accumulation
        if self.stepped:
            self.micro = 0
        return self.stepped

    def add_norm(self, norm: Tensor) -> None:
        assert self.norm_sum is not None, "add_loss comes first"
        self.norm_sum += norm
        self.norm_count += 1

    def consume(self) -> dict[str, Any]:
        """Mean loss and grad norm (device tensors, None before any step) since the last call, then reset."""
        stats = {
            "loss": self.loss_sum / max(1, self.loss_count) if self.loss_sum is not None else None,
            "grad_norm": self.norm_sum / self.norm_count if self.norm_sum is not None and self.norm_count else None,
            "micro_batches": self.loss_count,
        }
        if self.loss_sum is not None:
            self.loss_sum = torch.zeros_like(self.loss_sum)
            self.norm_sum = torch.zeros_like(self.loss_sum)
        self.loss_count = self.norm_count = 0
        return stats


def learning_rate(step: int, cfg: OptimSettings, time_fraction: float | None = None) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine decay to
    min_lr_ratio * lr (GPT-3 / Chinchilla), warmup-stable-decay with a 1-sqrt cooldown over the
    last decay_fraction of steps (Hägele et al. 2024), or constant.

    ``time_fraction``: the share of the time budget (``max_time``) used so far; the decay then
    follows whichever of steps and time is further along, so it ends with the run."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = (step - (cfg.max_steps - decay_steps)) / decay_steps
        if time_fraction is not None:
            progress = max(progress, (time_fraction - (1 - cfg.decay_fraction)) / cfg.decay_fraction)
        if progress < 0:
            return peak
        return floor + (peak - floor) * (1 - math.sqrt(min(1.0, progress)))
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max((step - cfg.warmup_steps) / span, time_fraction or 0.0))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


FSDP_PREFIX = "_fsdp_wrapped_module."


def parameter_groups(model: nn.Module, cfg: OptimSettings) -> list[dict[str, Any]]:
    """:func:`optim_groups` of ``cfg``'s optimizer with parameter *names* in place of the
    parameters, taken from the unwrapped model: under FSDP a parameter whose shard lives on
    another rank is an empty 1-D view, so grouping by shape there would differ between ranks and
    world sizes."""
    names = {id(param): name for name, param in model.named_parameters()}
    muon_decay = cfg.muon_weight_decay if cfg.optimizer == "muon" else None
    return [{**group, "params": [names[id(param)] for param in group["params"]]}
            for group in optim_groups(model, cfg.weight_decay, muon_decay)]


def build_optimizer(model: nn.Module, cfg: OptimSettings, device: torch.device,
                    groups: list[dict[str, Any]] | None = None) -> list[torch.optim.Optimizer]:
    """The optimizers of a step, AdamW first: AdamW over the model's trainable decay / no-decay
    groups (the fused kernel on CUDA, one launch for all parameters; the default implementation
    elsewhere) and, with ``optimizer: muon``, :class:`~lmpipe.train.muon.Muon` over the block matrices. ``groups`` (from
    :func:`parameter_groups` on the unwrapped model) names the parameters, as for a model FSDP has
    wrapped. Learning rates are set per step by :func:`set_learning_rate`."""
    params = {name.replace(FSDP_PREFIX, ""): param for name, param in model.named_parameters()}
    resolved = [{**group, "params": [params[name] for name in group["params"]]}
                for group in groups or parameter_groups(model, cfg)]
    adamw = [{k: v for k, v in group.items() if k != "muon"} for group in resolved if not group["muon"]]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        adamw, lr=learning_rate(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type == "cuda" or None)]
    matrices = [param for group in resolved if group["muon"] for param in group["params"]]
    if matrices:
        # torch's defaults, Keller Jordan's: Nesterov momentum, five Newton-Schulz steps (muon_ns_steps), the
        # update scaled by sqrt(max(1, rows / cols)).
        optimizers.append(Muon(matrices, lr=cfg.muon_lr * learning_rate(0, cfg) / cfg.lr,
                               momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                               ns_steps=cfg.muon_ns_steps))
    return optimizers


def set_learning_rate(optimizers: list[torch.optim.Optimizer], step: int, cfg: OptimSettings,
                      time_fraction: float | None = None) -> None:
    """The schedule's learning rate for ``step`` on every group: ``lr``'s for AdamW, scaled to
    ``muon_lr`` for Muon (one schedule, two peaks)."""
    lr = learning_rate(step, cfg, time_fraction)
    for optimizer in optimizers:
        value = lr * cfg.muon_lr / cfg.lr if isinstance(optimizer, torch.optim.Muon) else lr
        for group in optimizer.param_groups:
            group["lr"] = value


class TrainModule(L.LightningModule):
    """Trains ``model`` on ``objective``; ``accumulation`` micro-batches make one optimizer step.

    ``tokens_per_step``: the fixed global batch in tokens (pretraining's windows), for throughput
    and for a resume at another world size; None counts each batch's real tokens instead
    (``length``, padding excluded). ``reseed``: reseed the RNG from (seed, sample index) before
    each micro-batch, so dropout masks are identical after a resume without saving RNG state.
    ``data``: the training stream, unless the stage passes a datamodule to the fit.
    ``record``: kept in every checkpoint next to the run key.
    """

    def __init__(self, model: nn.Module, objective: Objective, cfg: OptimSettings, *, seed: int, run_key: str,
                 accumulation: int = 1, tokens_per_step: int | None = None, reseed: bool = True,
                 compile_model: bool = False, data: Any = None, record: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.objective, self.cfg, self.data = model, objective, cfg, data
        self.seed, self.run_key, self.record, self.reseed = seed, run_key, record or {}, reseed
        self.compile_model = compile_model
        self.accumulation, self.fixed_tokens_per_step = accumulation, tokens_per_step
        self.tokens_per_step = float(tokens_per_step or 0)  # of the last monitor interval when counted
        self._groups = parameter_groups(model, cfg)
        self.automatic_optimization = False
        # Per-step counters live on a plain object: nn.Module.__setattr__ costs microseconds a call.
        self._acc = StepStats()
        self._compiled: Any = None
        self._redirect_eval = False
        self._batch_seed = 0
        self._tokens = self._steps = 0
        self._trainable: list[nn.Parameter] = []
        self.budget: Any = None  # the run's TimeBudget callback when max_time is set (time_fraction)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook call, some 30 times a step;
        # nn.Module.__setattr__ would inspect each string for being a parameter, buffer or module.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def stepped(self) -> bool:
        """True right after the micro-batch that completed an optimizer step."""
        return self._acc.stepped

    # ------------------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        # After the strategy has set the model up, so under FSDP (the model wrapped as the FSDP
        # root) the compiled module is the wrapped one and its forward still gathers the shards.
        # The clipped parameters, listed once rather than filtered every step.
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.compile_model and self._compiled is None:
            # Kept outside the module tree so state_dict keys stay those of the plain model.
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return build_optimizer(self.model, self.cfg, self.device, self._groups)

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None, "no training stream: pass a datamodule to the fit"
        return self.data.dataloader(self.trainer)

    # ------------------------------------------------------------------------------ train

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Still on the host: reading the sample index and counting tokens here costs no device sync.
        if self.reseed and "index" in batch:
            self._batch_seed = int(batch["index"][0])
        if self.fixed_tokens_per_step is None and "length" in batch:
            self._tokens += int(batch["length"].sum())
        return batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        wrapped = self.trainer.strategy.model
        if self.accumulation > 1 and isinstance(wrapped, DistributedDataParallel):
            # All-reduce gradients only on the last micro-batch of a step (what DDP.no_sync does;
            # it must be set before the wrapper's forward, which reads it).
            wrapped.require_backward_grad_sync = self._acc.micro == self.accumulation - 1

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        if self._redirect_eval:  # an FSDP evaluation routed through the wrapper, see eval_sums()
            return self.objective.eval_sums(self.model, batch)
        if self.reseed:
            torch.manual_seed(self.seed * 1_000_003 + self._batch_seed)
        # Not `self._compiled or self.model`: truth-testing a compiled module calls len() on it, which raises.
        model = self._compiled if self._compiled is not None else self.model
        loss = self.objective.loss(model, batch)
        self.manual_backward(loss / self.accumulation if self.accumulation > 1 else loss)
        if self._acc.add_loss(loss, self.accumulation):
            self._steps += 1
            self._optimizer_step()
        return None

    def _optimizer_step(self) -> None:
        wrapped = self.optimizers()
        first, *others = wrapped if isinstance(wrapped, list) else [wrapped]
        if self.cfg.grad_clip > 0:
            self._acc.add_norm(self._clip_gradients(self.cfg.grad_clip))
        fraction = self.budget.time_fraction if self.budget is not None else None
        optimizers = [first.optimizer, *(o.optimizer for o in others)]
        set_learning_rate(optimizers, self.trainer.global_step, self.cfg, fraction)
        # Lightning counts every wrapped optimizer's step as a global step, so only the first
        # steps through its wrapper; the others step directly (no closure or gradient scaler to
        # run: precision is fp32 or bf16).
        for optimizer in optimizers[1:]:
            optimizer.step()
        first.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self, max_norm: float) -> Tensor:
        wrapped = self.trainer.strategy.model
        for fsdp in (self.model, wrapped):  # the model is the FSDP root (ShardedFSDPStrategy) or inside it
            if isinstance(fsdp, FullyShardedDataParallel):
                return fsdp.clip_grad_norm_(max_norm).float()  # norm over all shards
        # No .item(): the clip coefficient is applied on the device, no host sync.
        return torch.nn.utils.clip_grad_norm_(self._trainable, max_norm, foreach=True).float()

    def consume_stats(self) -> dict[str, Any]:
        """Device tensors of the mean train loss and grad norm since the last call, then reset;
        with counted tokens also sets ``tokens_per_step`` for the interval's throughput."""
        if self.fixed_tokens_per_step is None:
            self.tokens_per_step = self._tokens * self.trainer.world_size / max(1, self._steps)
            self._tokens = self._steps = 0
        stats = self._acc.consume()
        stats["parts"] = self.objective.consume_parts()
        return stats

    # ------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, Tensor]) -> Tensor:
        """The objective's evaluation sums of one batch, without gradients (the caller sets eval mode)."""
        wrapped = self.trainer.strategy.model
        if not isinstance(wrapped, FullyShardedDataParallel):
            return self.objective.eval_sums(self.model, batch)
        # FSDP: the root's parameters are sharded, so the forward must enter through the wrapper,
        # which Lightning routes to training_step while fitting.
        self._redirect_eval = True
        try:
            return wrapped(batch, 0)
        finally:
            self._redirect_eval = False

    # ------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmpipe"] = {"run_key": self.run_key, "world_size": self.trainer.world_size, **self.record}
