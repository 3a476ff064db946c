"""Distillation losses: hand-computed KL values, top-k precomputed targets against the online
teacher, hidden-state matching and the layer maps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.train.distill.losses import (
    DistillLoss,
    block_outputs,
    forward_kl_per_position,
    hard_ce,
    hidden_layer_map,
    hidden_loss,
    make_projections,
    precompute_windows,
    reverse_kl,
    soft_kl,
    teacher_topk,
)


def test_soft_kl_with_temperature_matches_hand_computed_value() -> None:
    # At T = 2 the teacher logits [2 ln 3, 0] become p = [3/4, 1/4]; the student's [0, 0] is q = [1/2, 1/2].
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))  # T^2 * KL(p || q)
    assert soft_kl(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    expected_reverse = 4 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))  # T^2 * KL(q || p)
    assert reverse_kl(student, teacher, 2.0).item() == pytest.approx(expected_reverse, rel=1e-6)
    assert soft_kl(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_kl_averages_only_unmasked_positions() -> None:
    teacher = torch.tensor([[[2 * math.log(3.0), 0.0], [5.0, -5.0]]])  # (B=1, T=2, V=2)
    student = torch.zeros(1, 2, 2)
    mask = torch.tensor([[True, False]])
    alone = soft_kl(student[:, :1], teacher[:, :1], 2.0)
    assert soft_kl(student, teacher, 2.0, mask).item() == pytest.approx(alone.item())
    assert soft_kl(student, teacher, 2.0).item() > alone.item()  # the second, far more confident position counts


def test_hard_ce_ignores_padding_targets() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    targets = torch.tensor([[0, -100]])
    assert hard_ce(logits, targets).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_topk_with_the_whole_vocabulary_is_exact() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    top = teacher_topk(teacher, 11, 1.5)
    assert soft_kl(student, top, 1.5).item() == pytest.approx(soft_kl(student, teacher, 1.5).item(), rel=1e-5)
    assert reverse_kl(student, top, 1.5).item() == pytest.approx(reverse_kl(student, teacher, 1.5).item(), rel=1e-5)


def confident_teacher(vocab: int = 64) -> GPT:
    """A random GPT made confident (its final norm scaled up), as trained LMs are: most of the
    probability sits on a few tokens, which is what makes top-k targets a good approximation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.ln_f.weight.mul_(30.0)
    return model.eval()


def test_precomputed_topk_targets_reproduce_the_online_loss(tmp_path: Path) -> None:
    teacher, block, windows, k, temperature = confident_teacher(), 16, 6, 8, 2.0
    tokens = np.random.default_rng(0).integers(0, 64, size=windows * block + 1).astype(np.uint16)
    cache = precompute_windows(tmp_path / "cache", teacher, tokens, block, windows, k, temperature, batch_size=4,
                               progress=False)
    rows = np.array([4, 0, 5])
    idx = torch.from_numpy(tokens[rows[:, None] * block + np.arange(block)].astype(np.int64))
    with torch.no_grad():
        teacher_logits = teacher(idx)[0]
    torch.manual_seed(1)
    student_logits = torch.randn(3, block, 64, requires_grad=True)
    logp, ids = cache.rows(rows)
    assert logp.shape == (3, block, k) and ids.dtype == torch.int64
    mass = logp.exp().sum(-1)
    assert float(mass.mean()) > 0.9  # the top 8 of 64 tokens hold most of the confident teacher's mass

    from lmpipe.train.distill.losses import TopKTargets

    cached = soft_kl(student_logits, TopKTargets(logp, ids), temperature)
    online = soft_kl(student_logits, teacher_logits, temperature)
    assert cached.item() == pytest.approx(online.item(), rel=0.02)
    # The gradient the student gets is close too (cosine similarity of the two gradients).
    g_cached = torch.autograd.grad(cached, student_logits)[0].flatten()
    g_online = torch.autograd.grad(soft_kl(student_logits, teacher_logits, temperature), student_logits)[0].flatten()
    assert torch.nn.functional.cosine_similarity(g_cached, g_online, dim=0).item() > 0.98
    # A second call finds the complete cache instead of recomputing it.
    again = precompute_windows(tmp_path / "cache", teacher, tokens, block, windows, k, temperature, batch_size=4,
                               progress=False)
    assert np.array_equal(np.asarray(again.logp), np.asarray(cache.logp))


def test_bucketed_kl_is_zero_for_the_teacher_itself() -> None:
    teacher = confident_teacher()(torch.arange(16)[None, :])[0].detach()
    per_position = forward_kl_per_position(teacher, teacher_topk(teacher, 4, 1.0), 1.0)
    assert per_position.abs().max().item() < 1e-3  # only fp32 rounding of the tail bucket remains


def test_hidden_matching_layer_map_projection_and_capture() -> None:
    assert hidden_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert hidden_layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert hidden_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    same = make_projections(32, 32, 2)
    assert all(isinstance(p, torch.nn.Identity) for p in same)
    states = [torch.randn(2, 5, 32)]
    assert hidden_loss(states, states, same[:1], "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_loss(states, states, same[:1], "mse").item() == pytest.approx(0.0, abs=1e-9)
    narrow = make_projections(16, 32, 1)
    loss = hidden_loss([torch.randn(2, 5, 16)], states, narrow, "mse")
    loss.backward()
    assert narrow[0].weight.grad is not None and narrow[0].weight.grad.abs().sum() > 0

    model = confident_teacher()
    with block_outputs(model, [1]) as captured:
        model(torch.arange(6)[None, :])
    assert list(captured) == [1] and captured[1].shape == (1, 6, 32)
    assert not model.blocks[1]._forward_hooks  # hooks removed afterwards


def test_distill_loss_weights_and_terms() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    loss = DistillLoss(soft=1.0, hard=0.5, reverse_kl=0.25, temperature=2.0)
    total, parts = loss(student, targets, teacher)
    assert set(parts) == {"soft", "hard", "reverse_kl"}
    expected = parts["soft"] + 0.5 * parts["hard"] + 0.25 * parts["reverse_kl"]
    assert total.item() == pytest.approx(expected.item())
    baseline_total, baseline_parts = DistillLoss(soft=0.0, hard=1.0)(student, targets, None)
    assert set(baseline_parts) == {"hard"} and baseline_total.item() == pytest.approx(hard_ce(student, targets).item())
    with pytest.raises(ValueError, match="no teacher"):
        loss(student, targets, None)
