"""Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) as ``torch.optim.Muon``,
with its Newton-Schulz iteration in float32 on CPU.

torch runs the iteration in bfloat16, which is fast on GPUs and on CPUs with bf16 matrix units,
but most CPUs emulate bf16 matmuls: on this project's 2-core x86 machine a 128 x 512 bf16 matmul
is about 20x slower than in float32, and one Muon step of the tiny preset took 1.35 s against
AdamW's 4 ms. In float32 the same step costs a few milliseconds and the iteration is, if
anything, more exact. Everything else (parameter checks, defaults, state, the update rule) is
torch's, so checkpoints hold the same state either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def orthogonalize(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """About U V^T of ``update`` = U S V^T, in float32: the quintic Newton-Schulz iteration
    x <- a x + (b G + c G^2) x with G = x x^T, after scaling x to spectral norm <= 1 (torch's
    coefficients, tuned to converge in five steps; the singular values end near, not at, 1)."""
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon``; parameters on CPU take the float32 iteration (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if not any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"Muon on CPU supports adjust_lr_fn 'original' only, got {group['adjust_lr_fn']!r}")
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                rows, cols = param.shape[:2]
                param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                # "original" scaling: the same update RMS for tall and wide matrices
                param.add_(update.to(param.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
        return loss
