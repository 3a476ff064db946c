"""The GPT: causality, position encodings, KV-cache generation, sampling filters, init, accounting."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from lmpipe.model.gpt import GPT, GPTConfig, estimate_flops_per_token, optim_groups, sample_next


def small(**overrides: object) -> GPTConfig:
    values: dict = {"vocab_size": 61, "block_size": 24, "n_layer": 2, "n_head": 4, "n_embd": 32}
    values.update(overrides)
    return GPTConfig(**values)


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    # One thread: on a shared machine OpenMP's spin-waiting makes these tiny models many times slower.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", [
    {}, {"pos_encoding": "sinusoidal"}, {"pos_encoding": "learned", "bias": True},
    {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2}, {"n_kv_head": 1, "tie_weights": False},
    {"qk_norm": True, "mlp": "relu2", "embed_scale": True, "n_kv_head": 2},
])
def test_causal_model_ignores_future_tokens(variant: dict) -> None:
    model = GPT(small(**variant)).eval()
    idx = torch.randint(0, 61, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 61
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert logits.shape == (2, 16, 61)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10])
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


def test_bidirectional_model_sees_future_tokens_and_has_mlm_head() -> None:
    model = GPT(small(bidirectional=True)).eval()
    assert model.mlm_head is not None
    idx = torch.randint(0, 61, (1, 12))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 61
    assert not torch.allclose(model(idx)[0][:, 0], model(changed)[0][:, 0])
    with pytest.raises(ValueError, match="cannot generate"):
        model.generate(idx, 2)


def test_loss_ignores_minus_100_targets_and_starts_near_uniform() -> None:
    model = GPT(small())
    idx = torch.randint(0, 61, (4, 16))
    labels = torch.randint(0, 61, (4, 16))
    targets = labels.clone()
    targets[:, ::2] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[:, 1::2].reshape(-1, 61), labels[:, 1::2].reshape(-1))
    torch.testing.assert_close(loss, manual)
    # GPT-2 init gives near-uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(61)) < 0.1


@pytest.mark.parametrize("variant", [{}, {"n_kv_head": 2, "norm": "rmsnorm", "mlp": "swiglu"},
                                     {"pos_encoding": "learned"}, {"pos_encoding": "sinusoidal"},
                                     {"qk_norm": True, "n_kv_head": 2}])
def test_cached_greedy_generation_equals_recomputing_everything(variant: dict) -> None:
    model = GPT(small(**variant)).eval()
    prompt = torch.randint(0, 61, (3, 5))
    # 30 new tokens overflow block_size 24, so the sliding window is exercised too.
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (3, 35)
    assert torch.equal(cached, uncached)


def test_cached_forward_matches_full_forward_logits() -> None:
    from lmpipe.model.gpt import KVCache

    model = GPT(small(n_kv_head=2)).eval()
    idx = torch.randint(0, 61, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, idx.device, torch.float32)
    first, _ = model(idx[:, :7], cache=cache)  # prefill of 7, then chunks with a spelled-out mask
    second, _ = model(idx[:, 7:10], cache=cache)
    third, _ = model(idx[:, 10:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_filters_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {2, 3}
    # p(2) ~ 0.71 < 0.9, so the nucleus needs token 3 too, never 0 or 1.
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {2, 3}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {2}
    assert sample_next(logits[:1], 0.0).tolist() == [2]

    model = GPT(small()).eval()
    prompt = torch.randint(1, 61, (2, 3))
    free = model.generate(prompt, 6, temperature=0)
    stop = int(free[0, 4])  # the row-0 token at the second generated position
    out = model.generate(prompt, 6, temperature=0, stop_tokens=[stop])
    row = out[0, 3:].tolist()
    assert stop in row
    assert all(t == stop for t in row[row.index(stop):])


def test_init_and_weight_decay_groups() -> None:
    cfg = small(n_layer=8, n_embd=64)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.blocks])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.blocks])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.001
    assert abs(fc.std().item() - 0.02) < 0.001
    decay, no_decay = optim_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.wte.weight) not in decayed  # embedding (and the tied head) not decayed
    assert all(id(b.ln_1.weight) not in decayed for b in model.blocks)
    assert id(model.blocks[0].mlp.c_fc.weight) in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

    # Muon: every matrix inside the blocks, nothing else; the tied embedding stays with AdamW.
    untied = GPT(small(tie_weights=False, qk_norm=True))
    muon, decay, no_decay = optim_groups(untied, 0.1, muon_weight_decay=0.01)
    assert (muon["muon"], decay["muon"], no_decay["muon"]) == (True, False, False) and muon["weight_decay"] == 0.01
    block_matrices = [p for b in untied.blocks for p in b.parameters() if p.dim() == 2]
    assert [id(p) for p in muon["params"]] == [id(p) for p in block_matrices] and len(block_matrices) == 2 * 4
    assert [id(p) for p in decay["params"]] == [id(untied.lm_head.weight)]  # the untied head: AdamW, decayed
    assert {id(untied.wte.weight), id(untied.blocks[0].attn.q_norm.weight)} <= {id(p) for p in no_decay["params"]}
    torch.optim.Muon(muon["params"])  # which refuses anything but matrices


@pytest.mark.parametrize("option", [{"qk_norm": True}, {"mlp": "relu2"}, {"embed_scale": True},
                                    {"tie_weights": False}])
def test_each_recipe_option_trains_a_tiny_model(option: dict) -> None:
    model = GPT(small(**option))
    optimizer = torch.optim.AdamW(optim_groups(model, 0.1), lr=1e-2)
    data = torch.arange(61).repeat(4)[None, :].expand(4, -1)  # a cycle: each token fixes the next
    losses = []
    for step in range(8):
        window = data[:, step:step + 25]
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5, losses


def test_flops_per_token_follows_palm_formula() -> None:
    cfg = small()
    model = GPT(cfg)
    n = model.num_parameters(non_embedding=True) + cfg.vocab_size * cfg.n_embd
    assert estimate_flops_per_token(cfg) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


@pytest.mark.parametrize(("overrides", "message"), [
    ({"n_embd": 30}, "divisible by n_head"),
    ({"n_kv_head": 3}, "multiple of n_kv_head"),
    ({"pos_encoding": "alibi"}, "pos_encoding must be one of"),
    ({"n_embd": 24, "n_head": 8}, "even head size"),
])
def test_config_rejects_impossible_shapes(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_sequence_longer_than_block_size_is_refused() -> None:
    model = GPT(small())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))
