"""Muon on CPU: torch's update rule, with the Newton-Schulz iteration in float32."""

from __future__ import annotations

import torch

from lmpipe.train.muon import Muon, orthogonalize


def test_cpu_muon_takes_torchs_step_with_a_float32_iteration() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 48)]  # tall and wide: both scalings of the update
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    optimizers = (Muon(ours, lr=0.05, weight_decay=0.1), torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1))
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in zip((ours, theirs), optimizers, strict=True):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for mine, torchs, start in zip(ours, theirs, weights, strict=True):
        step_mine, step_torch = (mine - start).detach(), (torchs - start).detach()
        # torch iterates in bfloat16 (about 3 significant digits), so the steps agree to that
        assert torch.linalg.norm(step_mine - step_torch) < 0.02 * torch.linalg.norm(step_torch)
    states = [optimizer.state_dict()["state"] for optimizer in optimizers]
    for key in (0, 1):  # the same state, so checkpoints do not depend on the device
        assert torch.equal(states[0][key]["momentum_buffer"], states[1][key]["momentum_buffer"])


def test_orthogonalize_brings_singular_values_near_one() -> None:
    torch.manual_seed(0)
    update = torch.randn(32, 96) * torch.logspace(-2, 1, 96)  # badly conditioned
    singular = torch.linalg.svdvals(orthogonalize(update, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert singular.min() > 0.3 and singular.max() < 1.3, singular
