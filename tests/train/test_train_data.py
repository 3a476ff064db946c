"""Token shards -> batches: contract checks, window order, rank/accumulation split, MLM masking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmpipe.errors import DataError, FingerprintMismatch
from lmpipe.train.data import (
    BatchPlan,
    TokenDataModule,
    WindowOrder,
    mask_for_mlm,
    open_token_split,
    unigram_entropy,
    write_synthetic_shards,
)


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    write_synthetic_shards(tmp_path, vocab_size=40, train_tokens=2000, val_tokens=300)
    return tmp_path


def datamodule(tokens_dir: Path, accumulation: int = 1, shuffle: bool = True) -> TokenDataModule:
    return TokenDataModule(open_token_split(tokens_dir, "train"), open_token_split(tokens_dir, "val"),
                           block_size=16, micro_batch_size=4, accumulation=accumulation, max_steps=40, seed=3,
                           shuffle=shuffle)


def test_random_order_visits_every_window_once_per_epoch() -> None:
    order = WindowOrder(n_tokens=1000, block_size=10, seed=1, shuffle=True)
    assert order.windows == 99
    epoch0, epoch1 = order.starts(np.arange(99)), order.starts(np.arange(99, 198))
    for starts in (epoch0, epoch1):
        offset = starts.min() % 10
        assert sorted(starts) == [offset + 10 * j for j in range(99)]  # each window exactly once
        assert starts.max() + 11 <= 1000
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(order.starts(np.arange(150, 160)), WindowOrder(1000, 10, 1, True).starts(np.arange(150, 160)))
    sequential = WindowOrder(1000, 10, 1, shuffle=False).starts(np.arange(3))
    assert sequential.tolist() == [0, 10, 20]


def test_global_batch_is_the_same_for_any_split_across_ranks() -> None:
    single = [BatchPlan(4, accumulation=4, world_size=1, rank=0).sample_indices(m) for m in range(8)]
    ddp = [[BatchPlan(4, accumulation=2, world_size=2, rank=r).sample_indices(m) for r in range(2)] for m in range(4)]
    for step in range(2):
        expected = np.concatenate(single[4 * step:4 * step + 4])
        got = np.concatenate([ddp[2 * step + a][r] for a in range(2) for r in range(2)])
        assert sorted(got) == sorted(expected) == list(range(16 * step, 16 * step + 16))


def test_stream_resumed_at_a_step_continues_the_uninterrupted_stream(tokens_dir: Path) -> None:
    data = datamodule(tokens_dir, accumulation=2)
    full = list(data.train_stream(0))
    resumed = list(data.train_stream(5))
    assert len(full) == 80 and len(resumed) == 70
    for a, b in zip(full[10:], resumed, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["index"], b["index"])
    first = full[0]
    assert torch.equal(first["input"][:, 1:], first["target"][:, :-1])  # targets are inputs shifted by one
    # Workers deal micro-batches round-robin: the loader's order is the stream's order.
    # spawn, not fork: the test process may already run threads (numba, polars, MLflow) that a
    # forked worker would inherit mid-lock
    loader = DataLoader(data.train_stream(5), batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert [b["index"].tolist() for b in loader] == [b["index"].tolist() for b in resumed]


def test_val_batches_are_fixed_and_split_across_ranks(tokens_dir: Path) -> None:
    data = datamodule(tokens_dir)
    single = [b["input"] for b in data.val_batches(3, rank=0, world_size=1)]
    ranks = [b["input"] for r in range(2) for b in data.val_batches(3, rank=r, world_size=2)]
    assert len(single) == 3
    assert sorted(t.sum().item() for t in single) == sorted(t.sum().item() for t in ranks)


def test_contract_errors_name_the_file(tmp_path: Path, tokens_dir: Path) -> None:
    with pytest.raises(DataError, match="nothing: no meta.json.*lmpipe tokenize"):
        open_token_split(tmp_path / "nothing", "train")
    meta = json.loads((tokens_dir / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] += 1
    del meta["eos_id"]
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json: missing key 'eos_id'"):
        open_token_split(tokens_dir, "train")
    meta["eos_id"] = 0
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train.bin is missing or not 4002 bytes long"):
        open_token_split(tokens_dir, "train")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    info = {"fingerprint": "other", "vocab_size": 40, "model_type": "bpe", "special_tokens": {},
            "special_ids": {"unk": 1, "bos": 2, "eos": 0, "pad": 3}}
    (tokenizer / "tokenizer.json").write_text(json.dumps(info))
    with pytest.raises(FingerprintMismatch, match="made with tokenizer synthetic, but the tokenizer in use is other"):
        open_token_split(tokens_dir, "val", tokenizer)
    (tokenizer / "tokenizer.json").write_text(json.dumps({**info, "fingerprint": "synthetic"}))
    assert open_token_split(tokens_dir, "val", tokenizer).n_tokens == 300


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([1, 2, 3, 4] * 50, dtype=np.uint16), 8) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(10, dtype=np.uint16), 8) == 0.0


def test_mlm_masking_follows_bert_80_10_10() -> None:
    tokens = torch.randint(1, 100, (200, 100))
    tokens[:, ::10] = 0  # EOS separators
    inputs, targets = mask_for_mlm(tokens, np.random.default_rng(0), mask_id=100, vocab_size=101,
                                   probability=0.15, special_ids=(0,))
    selected = targets != -100
    assert abs(selected.float().mean().item() - 0.15 * 0.9) < 0.01
    assert not selected[:, ::10].any()
    assert torch.equal(targets[selected], tokens[selected])
    masked = (inputs == 100) & selected
    kept = (inputs == tokens) & selected
    assert abs(masked.sum().item() / selected.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / selected.sum().item() - 0.1) < 0.02
    assert torch.equal(inputs[~selected], tokens[~selected])
