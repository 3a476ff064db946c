"""The ``collect`` stage's reading on Ray Data (``engine.kind: ray``): the same records, read by many tasks.

A source is split into *parts*, one Ray task each: every file of a ``files`` source, row ranges
of an HF split, or the whole source (a streamed HF dataset, a URL, the synthetic generator). A task runs the local engine's reader,
:func:`lmpipe.data.collect.read_part`, so a record has the same text, meta, line numbers and errors
on both engines (``ray.data.read_json`` / ``read_text`` would number and report lines their own
way). The dataset keeps input order, and the driver stages the records exactly as the local
engine does, so data/raw and its manifest are byte-identical.

Each record row carries its part's count of skipped empty texts so far, and a part announces the
files and datasets it reads before its first record: when ``max_docs`` stops reading early, the
counts and manifest inputs are those of the local engine at the same record. Workers read the
files by path: on a multi-node cluster the project directory must be on a filesystem every node
mounts. A task lost with its worker is re-run ``MAX_RETRIES`` times; a DataError a task raises
reaches the driver as itself, and nothing appears at data/raw.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lmpipe.data.config import Source
from lmpipe.data.sources import SourceStats
from lmpipe.engine import MAX_RETRIES, connect, current, user_errors

if TYPE_CHECKING:
    from lmpipe.data.collect import Part

_BATCH = 4096
# text/meta: one record; info (JSON, no text): the files and datasets a part reads, or its end
ROW_SCHEMA = pa.schema([("text", pa.string()), ("meta", pa.string()), ("skipped", pa.int64()),
                        ("info", pa.string())])


def _info(stats: SourceStats, end: bool = False) -> str:
    return json.dumps({"inputs": {k: str(v) for k, v in stats.inputs.items()}, "datasets": stats.datasets,
                       "end": end})


class _Rows:
    """Record rows of one part, each with its part's skipped count so far, flushed as tables."""

    def __init__(self, stats: SourceStats) -> None:
        self.stats = stats
        self.columns: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}

    def add(self, text: str | None, meta: str | None, info: str | None = None) -> None:
        for name, value in zip(ROW_SCHEMA.names, (text, meta, self.stats.skipped_empty, info), strict=True):
            self.columns[name].append(value)

    def __len__(self) -> int:
        return len(self.columns["text"])

    def flush(self) -> pa.Table:
        table = pa.table(self.columns, schema=ROW_SCHEMA)
        for values in self.columns.values():
            values.clear()
        return table


def read_parts(batch: pa.Table, source: Source, parts: list[Part], root: Path, seed: int) -> Iterator[pa.Table]:
    """Ray task: the record rows of the ``parts`` whose indices ``batch`` holds (column ``part``),
    in batches of rows of :data:`ROW_SCHEMA`."""
    from lmpipe.data.collect import encode_meta, read_part

    for index in batch.column("part").to_pylist():
        part = parts[index]
        stats = SourceStats()
        rows = _Rows(stats)
        seen = (0, 0)
        for text, meta in read_part(source, part, root, seed, stats):
            if (len(stats.inputs), len(stats.datasets)) != seen:  # announced before the first record
                seen = (len(stats.inputs), len(stats.datasets))
                rows.add(None, None, _info(stats))
            rows.add(text, encode_meta(meta))
            if len(rows) >= _BATCH:
                yield rows.flush()
        rows.add(None, None, _info(stats, end=True))
        yield rows.flush()


def encoded_records(source: Source, parts: list[Part], root: Path, seed: int,
                    stats: SourceStats) -> Generator[tuple[str, str], None, None]:
    """(text, encoded meta) of every record of ``source``'s ``parts``, in order, read on Ray;
    ``stats`` is kept as the local engine keeps it. Raises the DataError a task raised."""
    ray = connect(current())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True
    dataset = ray.data.from_items([{"part": i} for i in range(len(parts))], override_num_blocks=len(parts)).map_batches(
        read_parts, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"source": source, "parts": parts, "root": root, "seed": seed}, max_retries=MAX_RETRIES)
    finished = 0
    with user_errors("collect"):
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            columns = [batch.column(name).to_pylist() for name in ROW_SCHEMA.names]
            for text, meta, skipped, info in zip(*columns, strict=True):
                if info is None:
                    stats.skipped_empty = finished + skipped
                    yield text, meta
                    continue
                found = json.loads(info)
                stats.inputs.update({k: Path(v) for k, v in found["inputs"].items()})
                stats.datasets.update(found["datasets"])
                if found["end"]:
                    finished += skipped
                stats.skipped_empty = finished
