"""Token shards in, training and validation batches out.

Reads ``data/tokens/`` (flat uint16/uint32 ids, EOS between documents: ``{split}.bin``, or the
sharded layout's ``{split}-NNNNN.bin`` read as one array) and ``meta.json`` through the tokenize
stage's reader, which checks the tokenizer fingerprint. Batches are a pure function of (seed, step): the k-th training sample is the
window at ``WindowOrder.starts(k)``, and optimizer step s consumes samples [s*G, (s+1)*G) for a
global batch of G sequences, split across gradient-accumulation micro-steps and ranks. Nothing
about the data position has to be saved: resuming at step s rebuilds the stream from s, so a
resumed run sees exactly the samples an uninterrupted one would, each once, and the same holds
for any number of devices with the same global batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmpipe.errors import DataError
from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.tokenizer.shards import DTYPES, ShardedTokens, TokenShardReader, read_token_meta, unigram_entropy
from lmpipe.tokenizer.train import read_tokenizer_info

# with the shard reader, where the register stage finds them too
__all__ = ["DTYPES", "read_token_meta", "unigram_entropy"]


@dataclass
class TokenSplit:
    """One split's tokens (a read-only memmap, or a :class:`ShardedTokens` over the sharded
    layout's files: both index the same way) and the shards' meta.json."""

    name: str
    tokens: np.ndarray | ShardedTokens
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_bytes(self) -> int | None:
        """UTF-8 bytes of the text behind these tokens (for bits per byte), if meta.json has it."""
        value = self.meta.get("splits", {}).get(self.name, {}).get("bytes")
        return int(value) if value else None


def open_token_split(tokens_dir: Path, split: str, tokenizer_dir: Path | None = None) -> TokenSplit:
    """Memory-map one split, either layout, through the tokenize stage's ``TokenShardReader``.

    The shards must have been made with the tokenizer in ``tokenizer_dir`` (its tokenizer.json
    fingerprint) when that directory holds one; without it (synthetic shards in tests and
    benchmarks) meta.json is trusted. Raises DataError (missing/short files, malformed meta.json)
    or FingerprintMismatch.
    """
    expected = None
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        expected = read_tokenizer_info(tokenizer_dir).fingerprint
    reader = TokenShardReader(tokens_dir, expected)
    return TokenSplit(split, reader.tokens(split), reader.meta)


class WindowOrder:
    """Maps the global sample index k to the start offset of its window of block_size + 1 tokens.

    An epoch is every window once: ``windows`` non-overlapping windows starting at
    ``offset + j * block_size``. ``random`` draws a fresh offset and permutation each epoch from
    (seed, epoch), so no state but k is needed; ``sequential`` uses offset 0 and corpus order.
    """

    def __init__(self, n_tokens: int, block_size: int, seed: int, shuffle: bool) -> None:
        # Same window count for every offset in [0, block_size): start + block_size + 1 <= n_tokens.
        self.windows = (n_tokens - block_size) // block_size
        if self.windows < 1:
            raise ValueError(f"{n_tokens} tokens do not fill one window of {block_size + 1}")
        self.block_size, self.seed, self.shuffle = block_size, seed, shuffle
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.block_size))
            self._epochs[epoch] = (offset, rng.permutation(self.windows))
        return self._epochs[epoch]

    def starts(self, indices: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return (indices % self.windows) * self.block_size
        out = np.empty(indices.shape[0], dtype=np.int64)
        epochs = indices // self.windows
        for epoch in np.unique(epochs):
            offset, perm = self._epoch(int(epoch))
            sel = epochs == epoch
            out[sel] = offset + perm[indices[sel] % self.windows] * self.block_size
        return out


def gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """(len(starts), length) int64 tensor of tokens[start:start + length] for each start."""
    rows = tokens[starts[:, None] + np.arange(length)]
    return torch.from_numpy(rows.astype(np.int64))


def mask_for_mlm(
    window: torch.Tensor, rng: np.random.Generator, *, mask_id: int, vocab_size: int, probability: float,
    special_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, 3.1): select ``probability`` of the tokens; of those 80%
    become the mask token, 10% a random token, 10% stay. Targets are -100 except at selected
    positions. Special tokens (EOS separators) are never selected."""
    tokens = window.numpy()
    selected = rng.random(tokens.shape) < probability
    for special in special_ids:
        selected &= tokens != special
    roll = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[selected & (roll < 0.8)] = mask_id
    randomize = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = rng.integers(0, vocab_size, size=int(randomize.sum()))
    targets = np.where(selected, tokens, IGNORE_INDEX)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of sequences is cut into micro-batches and ranks."""

    micro_batch_size: int
    accumulation: int
    world_size: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    def sample_indices(self, micro_step: int) -> np.ndarray:
        """Global sample indices of this rank's micro-batch number ``micro_step`` (counted over the run).

        Step s holds samples [s*G, (s+1)*G); its micro-step a gives rank r the slice starting at
        s*G + (a*world + r)*b, so one process accumulating world*A micro-batches of b sees the
        same global batch as world processes accumulating A each.
        """
        step, micro = divmod(micro_step, self.accumulation)
        first = step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)


class TrainStream(IterableDataset):
    """Micro-batches for steps [start_step, max_steps) of one rank: dicts of ``input``,
    ``target`` (B, T) int64 and ``index`` (B,) global sample indices."""

    def __init__(self, split: TokenSplit, order: WindowOrder, plan: BatchPlan, block_size: int,
                 start_step: int, max_steps: int, seed: int, mlm: dict[str, Any] | None = None) -> None:
        self.split, self.order, self.plan, self.block_size = split, order, plan, block_size
        self.start_step, self.max_steps, self.seed, self.mlm = start_step, max_steps, seed, mlm

    def batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        indices = self.plan.sample_indices(micro_step)
        window = gather_windows(self.split.tokens, self.order.starts(indices), self.block_size + 1)
        if self.mlm is None:
            return {"input": window[:, :-1], "target": window[:, 1:], "index": torch.from_numpy(indices)}
        rng = np.random.default_rng([self.seed, 7, int(indices[0])])  # masking depends on the samples only
        inputs, targets = mask_for_mlm(window[:, :-1], rng, **self.mlm)
        return {"input": inputs, "target": targets, "index": torch.from_numpy(indices)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first = self.start_step * self.plan.accumulation
        last = self.max_steps * self.plan.accumulation
        worker = get_worker_info()
        # DataLoader reads workers round-robin, so worker w taking every n-th micro-batch keeps the order.
        step_by = worker.num_workers if worker is not None else 1
        first += worker.id if worker is not None else 0
        for micro_step in range(first, last, step_by):
            yield self.batch(micro_step)


def val_batches(split: TokenSplit, block_size: int, micro_batch_size: int, max_batches: int, rank: int,
                world_size: int, seed: int, mlm: dict[str, Any] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The fixed validation set: the first ``max_batches`` micro-batches of consecutive windows of
    the val split, dealt round-robin to ranks. Raises DataError if the split is shorter than a window."""
    windows = (split.n_tokens - 1) // block_size
    if windows < 1:
        raise DataError(f"val split has {split.n_tokens} tokens, fewer than one window of {block_size + 1}")
    n_batches = min(max_batches, math.ceil(windows / micro_batch_size))
    for batch in range(rank, n_batches, world_size):
        starts = np.arange(batch * micro_batch_size, min((batch + 1) * micro_batch_size, windows)) * block_size
        window = gather_windows(split.tokens, starts, block_size + 1)
        if mlm is None:
            yield {"input": window[:, :-1], "target": window[:, 1:]}
        else:
            inputs, targets = mask_for_mlm(window[:, :-1], np.random.default_rng([seed, 11, batch]), **mlm)
            yield {"input": inputs, "target": targets}


class TokenDataModule(L.LightningDataModule):
    """Lightning's view of the shards: a training stream that starts at the trainer's global step
    (restored from a checkpoint before ``train_dataloader`` is called) and the fixed val batches."""

    def __init__(self, train: TokenSplit, val: TokenSplit, *, block_size: int, micro_batch_size: int,
                 accumulation: int, max_steps: int, seed: int, shuffle: bool, num_workers: int = 0,
                 mlm: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.train, self.val, self.block_size = train, val, block_size
        self.micro_batch_size, self.accumulation, self.max_steps = micro_batch_size, accumulation, max_steps
        self.seed, self.num_workers, self.mlm = seed, num_workers, mlm
        try:
            self.order = WindowOrder(train.n_tokens, block_size, seed, shuffle)
        except ValueError as err:
            raise DataError(f"train split too small: {err}") from None

    def plan(self, rank: int, world_size: int) -> BatchPlan:
        return BatchPlan(self.micro_batch_size, self.accumulation, world_size, rank)

    def train_stream(self, start_step: int, rank: int = 0, world_size: int = 1) -> TrainStream:
        return TrainStream(self.train, self.order, self.plan(rank, world_size), self.block_size,
                           start_step, self.max_steps, self.seed, self.mlm)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        assert trainer is not None
        stream = self.train_stream(trainer.global_step, trainer.global_rank, trainer.world_size)
        pin = trainer.strategy.root_device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    def val_batches(self, max_batches: int, rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
        return val_batches(self.val, self.block_size, self.micro_batch_size, max_batches, rank, world_size,
                           self.seed, self.mlm)


def write_synthetic_shards(directory: Path, *, vocab_size: int, train_tokens: int, val_tokens: int,
                           seed: int = 0) -> dict[str, Any]:
    """Write train.bin, val.bin and meta.json in the tokenize stage's format, for tests and
    benchmarks that must not depend on the earlier stages. Documents are runs of consecutive ids
    (a, a+1, ..., a+k) ended by EOS = 0: easy to learn, far from the unigram entropy once learnt."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        tokens: list[int] = []
        docs = 0
        while len(tokens) < n:
            start = int(rng.integers(1, max(2, vocab_size - 12)))
            tokens.extend(range(start, min(vocab_size, start + int(rng.integers(4, 12)))))
            tokens.append(0)
            docs += 1
        array = np.asarray(tokens[:n], dtype=np.uint16 if vocab_size <= 65536 else np.uint32)
        array.tofile(directory / f"{split}.bin")
        # Pretend each token is 3 bytes of text so bits per byte is defined.
        splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": docs, "bytes": 3 * n}
    meta = {"dtype": "uint16" if vocab_size <= 65536 else "uint32", "vocab_size": vocab_size, "eos_id": 0,
            "tokenizer_fingerprint": "synthetic", "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
