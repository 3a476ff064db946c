"""Rows in, micro-batches out: the data side of the ``finetune`` stage, shared by every task type.

Reading: :func:`read_rows` yields the rows of a data source (``split`` document shards, local
``files``, or an ``hf`` dataset) as :class:`Row` objects that remember where they came from, so a
bad value becomes a one-line ``DataError`` naming the file and line (text files) or row (parquet,
datasets). The task modules (:mod:`lmpipe.train.finetune.sft`, :mod:`lmpipe.train.finetune.classify`) turn rows
into tokenized examples.

Batching: as in pretraining, batches are a pure function of (seed, step). Sample k of the run is
example ``perm_e[k mod n]`` with a fresh permutation per epoch e drawn from (seed, e), and
optimizer step s consumes samples [s*G, (s+1)*G) through :class:`lmpipe.train.data.BatchPlan`. A
run resumed at step s therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import csv
import glob
import json
import os
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
from lmpipe.errors import DataError
from lmpipe.io import jsonl_objects
from lmpipe.train.data import BatchPlan
from lmpipe.train.finetune.config import DataSource, FilesData, HFData, SplitData

Batch = dict[str, torch.Tensor]
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet"}


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


def _expand(patterns: Sequence[str], root: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(root / pattern)
        matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"no file matches {pattern!r} (paths are relative to the project root {root})")
        files.extend(matches)
    return files


def _file_rows(source: FilesData, root: Path) -> Iterator[Row]:
    for path in _expand(source.paths, root):
        fmt = source.format if source.format != "auto" else FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"cannot tell the format from the extension; set format: ({', '.join(sorted(set(FORMATS.values())))})",
                            path=str(path))
        yield from _READERS[fmt](path, source.columns)


def _jsonl_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    for row, (line_no, values) in enumerate(jsonl_objects(path), start=1):
        yield Row(values, str(path), row, line_no, columns)


def _json_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg}", path=str(path), line=err.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects (or {\"data\": [...]})", path=str(path))
    for idx, values in enumerate(data, start=1):
        if not isinstance(values, dict):
            raise DataError(f"row {idx}: expected a JSON object, got {type(values).__name__}", path=str(path))
        yield Row(values, str(path), idx, None, columns)


def _delimited_rows(path: Path, columns: dict[str, str], delimiter: str) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as handle:
        # TSV corpora (GLUE and most NLP releases) do not quote fields: a '"' is part of the text.
        reader = (csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if delimiter == "\t"
                  else csv.reader(handle, delimiter=delimiter))
        header = next(reader, None)
        if header is None:
            raise DataError("empty file: expected a header row naming the columns", path=str(path), line=1)
        row = 0
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if len(record) != len(header):
                raise DataError(f"{len(record)} fields, but the header has {len(header)} ({', '.join(header)})",
                                path=str(path), line=reader.line_num)
            row += 1
            yield Row(dict(zip(header, record, strict=True)), str(path), row, reader.line_num, columns)


def _parquet_rows(path: Path, columns: dict[str, str]) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", path=str(path)) from None
    for idx, values in enumerate(table.to_pylist(), start=1):
        yield Row(values, str(path), idx, None, columns)


_READERS: dict[str, Callable[[Path, dict[str, str]], Iterator[Row]]] = {
    "jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows,
    "csv": lambda p, c: _delimited_rows(p, c, ","), "tsv": lambda p, c: _delimited_rows(p, c, "\t"),
}


def _hf_rows(source: HFData, root: Path) -> Iterator[Row]:
    import datasets

    data_files: Any = source.data_files
    if data_files is not None:  # builder datasets ('json', 'csv') read files relative to the project root
        files = [data_files] if isinstance(data_files, str) else data_files
        data_files = [str(p) for p in _expand(files, root)]
    path = source.path
    if (root / path).is_dir():
        path = str(root / path)
    where = f"hf:{source.path}[{source.split}]"
    try:
        dataset = datasets.load_dataset(path, name=source.config_name, split=source.split,
                                        revision=source.revision, data_files=data_files)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"cannot load the dataset: {str(err).splitlines()[0]}", path=where) from None
    for idx, values in enumerate(dataset, start=1):
        yield Row(dict(values), where, idx, None, source.columns)


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
