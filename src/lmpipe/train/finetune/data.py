"""Rows in, micro-batches out: the data side of the ``finetune`` stage, shared by every task type.

Reading: :func:`read_rows` yields the rows of a data source (``split`` document shards, local
``files``, or an ``hf`` dataset, read by :mod:`lmpipe.data.sources`) as :class:`Row` objects that
remember where they came from, so a bad value becomes a one-line ``DataError`` naming the file and
line (text files) or 1-based row (parquet, json, datasets). The task modules (:mod:`lmpipe.train.finetune.sft`,
:mod:`lmpipe.train.finetune.classify`) turn rows
into tokenized examples.

Batching: as in pretraining, batches are a pure function of (seed, step). Sample k of the run is
example ``perm_e[k mod n]`` with a fresh permutation per epoch e drawn from (seed, e), and
optimizer step s consumes samples [s*G, (s+1)*G) through :class:`lmpipe.train.data.BatchPlan`. A
run resumed at step s therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lmpipe.config import Paths
from lmpipe.data.shards import iter_shards
from lmpipe.data.sources import files_rows, hf_rows, load_hf
from lmpipe.errors import DataError
from lmpipe.train.data import BatchPlan
from lmpipe.train.finetune.config import DataSource, FilesData, HFData, SplitData

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    """One input row and where it came from. ``line`` is the physical line in a text file (jsonl,
    csv, tsv); other formats have only the 1-based ``row`` number."""

    values: dict[str, Any]
    where: str
    row: int
    line: int | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def error(self, message: str) -> DataError:
        if self.line is not None:
            return DataError(message, path=self.where, line=self.line)
        return DataError(f"row {self.row}: {message}", path=self.where)

    def column(self, name: str) -> str:
        """The source column that holds the task field ``name``."""
        return self.columns.get(name, name)

    def has(self, name: str) -> bool:
        return self.values.get(self.column(name)) is not None

    def get(self, name: str, *, required: bool = True) -> Any:
        """The value of field ``name``; a missing column raises DataError when ``required``."""
        column = self.column(name)
        if column not in self.values:
            if not required:
                return None
            hint = f"; map it with columns: {{{name}: <column>}}" if column == name else ""
            raise self.error(f"missing column '{column}' (columns: {', '.join(map(str, self.values)) or 'none'}){hint}")
        return self.values[column]

    def text(self, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
        """Field ``name`` as a string; missing, non-string or (unless allowed) blank values raise DataError."""
        value = self.get(name, required=required)
        if value is None:
            if required and not allow_empty:
                raise self.error(f"column '{self.column(name)}' is null")
            return ""
        if not isinstance(value, str):
            raise self.error(f"column '{self.column(name)}' must be text, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(f"column '{self.column(name)}' is empty")
        return value


def read_rows(source: DataSource, paths: Paths) -> Iterator[Row]:
    """Yield the rows of ``source`` in a fixed order, at most ``source.max_examples`` of them.

    Raises DataError for missing files or directories, unreadable files and malformed lines.
    """
    if isinstance(source, SplitData):
        rows = _split_rows(source, paths.split / source.split)
    elif isinstance(source, FilesData):
        rows = _file_rows(source, paths.root)
    else:
        rows = _hf_rows(source, paths.root)
    for count, row in enumerate(rows):
        if source.max_examples is not None and count >= source.max_examples:
            return
        yield row


def describe_source(source: DataSource) -> str:
    """A short name of a source for logs and metrics files."""
    if isinstance(source, SplitData):
        return f"data/split/{source.split}" + (f" (kind={source.kind})" if source.kind else "")
    if isinstance(source, FilesData):
        return ", ".join(source.paths)
    return f"hf:{source.path}[{source.split}]"


def _split_rows(source: SplitData, directory: Path) -> Iterator[Row]:
    for path, table in iter_shards(directory):
        texts, metas = table.column("text").to_pylist(), table.column("meta").to_pylist()
        ids, origins = table.column("id").to_pylist(), table.column("source").to_pylist()
        for idx, (text, meta_text) in enumerate(zip(texts, metas, strict=True)):
            try:
                meta = json.loads(meta_text) if meta_text else {}
            except json.JSONDecodeError as err:
                raise DataError(f"row {idx + 1}: meta is not valid JSON: {err}", path=str(path)) from None
            if not isinstance(meta, dict):
                meta = {}
            if source.kind is not None and meta.get("kind") != source.kind:
                continue
            values = {**meta, "id": ids[idx], "text": text, "source": origins[idx]}
            yield Row(values, str(path), idx + 1, columns=source.columns)


def _file_rows(source: FilesData, root: Path) -> Iterator[Row]:
    for row in files_rows(source.paths, root, source.format):
        yield Row(row.values, row.where, (row.row or 0) + 1, row.line, source.columns)


def _hf_rows(source: HFData, root: Path) -> Iterator[Row]:
    dataset, _ = load_hf(source.path, root, config_name=source.config_name, split=source.split,
                         revision=source.revision, data_files=source.data_files)
    for row in hf_rows(dataset, f"hf:{source.path}[{source.split}]"):
        yield Row(row.values, row.where, (row.row or 0) + 1, None, source.columns)


# ----------------------------------------------------------------------------------- batching


class ExampleOrder:
    """Maps the global sample index k to an example: a fresh seeded permutation every epoch."""

    def __init__(self, n_examples: int, seed: int) -> None:
        if n_examples < 1:
            raise ValueError("no training examples")
        self.n, self.seed = n_examples, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, 17, epoch]).permutation(self.n)
        return self._cache[epoch]

    def examples(self, indices: np.ndarray) -> list[int]:
        return [int(self._perm(int(k) // self.n)[int(k) % self.n]) for k in indices]


class ExampleStream(IterableDataset):
    """Micro-batches for steps [start_step, max_steps) of one rank, collated, with ``index``
    holding the global sample indices (the per-batch dropout seed)."""

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], Batch], order: ExampleOrder,
                 plan: BatchPlan, start_step: int, max_steps: int) -> None:
        self.examples, self.collate, self.order, self.plan = examples, collate, order, plan
        self.start_step, self.max_steps = start_step, max_steps

    def batch(self, micro_step: int) -> Batch:
        indices = self.plan.sample_indices(micro_step)
        batch = self.collate([self.examples[i] for i in self.order.examples(indices)])
        batch["index"] = torch.from_numpy(indices)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        for micro_step in range(self.start_step * self.plan.accumulation, self.max_steps * self.plan.accumulation):
            yield self.batch(micro_step)


class TrainBatches:
    """The training stream of a run; :meth:`dataloader` starts it at the trainer's global step
    (restored from a checkpoint before the fit loop asks for its dataloader)."""

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], Batch], *, micro_batch_size: int,
                 accumulation: int, max_steps: int, seed: int) -> None:
        self.examples, self.collate = examples, collate
        self.micro_batch_size, self.accumulation, self.max_steps = micro_batch_size, accumulation, max_steps
        self.order = ExampleOrder(len(examples), seed)

    def stream(self, start_step: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        plan = BatchPlan(self.micro_batch_size, self.accumulation, world_size, rank)
        return ExampleStream(self.examples, self.collate, self.order, plan, start_step, self.max_steps)

    def dataloader(self, trainer: L.Trainer) -> DataLoader:
        stream = self.stream(trainer.global_step, trainer.global_rank, trainer.world_size)
        return DataLoader(stream, batch_size=None, num_workers=0,
                          pin_memory=trainer.strategy.root_device.type == "cuda")


def eval_batches(examples: Sequence[Any], collate: Callable[[list[Any]], Batch], batch_size: int,
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The fixed dev batches of one rank: consecutive examples, batches dealt round-robin."""
    starts = range(0, len(examples), batch_size)
    return [collate(list(examples[s:s + batch_size])) for i, s in enumerate(starts) if i % world_size == rank]


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], value: int) -> torch.Tensor:
    """(B, T) int64 tensor of the rows right-padded with ``value`` to the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out
