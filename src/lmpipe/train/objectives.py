"""What a training run minimises and how it is scored: the objective the one loop is driven by.

An objective gives the loss of a batch (:class:`lmpipe.train.module.TrainModule` steps on it),
summed evaluation statistics of a batch (reduced across ranks, then turned into metrics), and the
metric that early stopping and model selection watch. The objectives:

- :class:`LanguageModelObjective`: next-token (causal LM) or masked-token (masked LM) loss;
  the batch's targets say which tokens count (-100 elsewhere), so one class serves both;
- :class:`lmpipe.train.finetune.sft.SFTObjective`: the language-model loss on answer tokens only,
  with answer perplexity and token accuracy as dev metrics;
- :class:`lmpipe.train.finetune.classify.ClassificationObjective`: cross-entropy on a head;
- :class:`lmpipe.train.distill.stage.DistillObjective`: the weighted distillation terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Objective:
    """Base of the objectives; ``monitor`` is a key of :meth:`metrics`, ``mode`` min or max."""

    monitor: str = "loss"
    mode: str = "min"
    sums_size: int = 2

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """A vector of ``sums_size`` statistics of one batch that add up across batches and ranks."""
        raise NotImplementedError

    def metrics(self, sums: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def consume_parts(self) -> dict[str, Any]:
        """Mean of each loss term since the last call (device tensors) for objectives made of
        several terms, then reset; none by default."""
        return {}


class LanguageModelObjective(Objective):
    """Mean cross-entropy over the tokens whose target is not -100: every next token (clm), the
    masked positions (mlm) or an answer's tokens (sft). Evaluation sums: [loss sum, token count]."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, loss = model(batch["input"], batch["target"])
        return loss

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, loss = model(batch["input"], batch["target"])
        count = (batch["target"] != -100).sum()
        return torch.stack([loss.float() * count, count.float()])

    def metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0)}
