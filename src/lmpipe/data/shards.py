"""Parquet document shards: the on-disk format of data/raw, data/clean and data/split.

Schema (DESIGN.md): ``id`` (stable content hash of the text), ``text``, ``source`` and ``meta``
(a JSON object as a string), all non-null strings. Shards are named ``part-00000.parquet`` ... and
read back in name order, so a directory of shards is one ordered stream of documents.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.errors import DataError

COLUMNS = ("id", "text", "source", "meta")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])
SHARD_GLOB = "part-*.parquet"


def doc_id(text: str) -> str:
    """Stable content hash of a document: 16 hex chars of blake2b(text).

    Identical texts share an id, so exact duplicates always land in the same split.
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def doc_ids(texts: Iterable[str]) -> list[str]:
    return [doc_id(t) for t in texts]


def make_table(ids: list[str], texts: list[str], sources: list[str], metas: list[str]) -> pa.Table:
    return pa.table(
        {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
         "source": pa.array(sources, pa.string()), "meta": pa.array(metas, pa.string())},
        schema=SCHEMA,
    )


class ShardWriter:
    """Write documents into ``directory/part-NNNNN.parquet``, ``shard_docs`` rows per shard.

    Meant to write inside an :func:`lmpipe.io.atomic_dir` temporary directory; it does not rename.
    """

    def __init__(self, directory: str | os.PathLike[str], shard_docs: int = 20_000, prefix: str = "part") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_docs = shard_docs
        self.prefix = prefix
        self.files: list[Path] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append a table with the document schema (columns in any order)."""
        table = conform(table, where=str(self.directory))
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_docs:
            self._flush(self.shard_docs)

    def _flush(self, rows: int) -> None:
        combined = pa.concat_tables(self._pending)
        head, tail = combined.slice(0, rows), combined.slice(rows)
        path = self.directory / f"{self.prefix}-{len(self.files):05d}.parquet"
        # one chunk: parquet's page boundaries follow the table's chunks, and a shard's bytes must
        # not depend on how its rows arrived (the Ray engine writes the same shard from other chunks)
        pq.write_table(head.combine_chunks(), path, compression="zstd")
        self.files.append(path)
        self.rows += head.num_rows
        self._pending = [tail] if tail.num_rows else []
        self._pending_rows = tail.num_rows

    def close(self) -> list[Path]:
        """Flush the last partial shard; an empty stream still writes one empty shard."""
        if self._pending_rows or not self.files:
            self._pending = self._pending or [SCHEMA.empty_table()]
            self._flush(self._pending_rows)
        return self.files


def conform(table: pa.Table, where: str = "") -> pa.Table:
    """Check a table has the document columns as strings; return it in schema order."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}", path=where or None)
    out = table.select(list(COLUMNS))
    for name in COLUMNS:
        if out.schema.field(name).type not in (pa.string(), pa.large_string()):
            raise DataError(f"column '{name}' has type {out.schema.field(name).type}, expected string", path=where or None)
    return out.cast(SCHEMA)


def shard_files(directory: str | os.PathLike[str]) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("directory not found (run the stage that produces it first)", path=str(directory))
    return sorted(directory.glob(SHARD_GLOB))


def read_shard(path: str | os.PathLike[str]) -> pa.Table:
    """One shard, its schema checked; DataError naming the file when it is not readable parquet."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", path=str(path)) from None
    return conform(table, where=str(path))


def iter_shards(directory: str | os.PathLike[str]) -> Iterator[tuple[Path, pa.Table]]:
    """Yield (path, table) for each shard in order, checking the schema of each."""
    for path in shard_files(directory):
        yield path, read_shard(path)


def read_documents(directory: str | os.PathLike[str]) -> pa.Table:
    """All shards of a directory as one table (for small data: tests, validation, split)."""
    tables = [table for _, table in iter_shards(directory)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def count_documents(directory: str | os.PathLike[str]) -> int:
    total = 0
    for path in shard_files(directory):
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a readable parquet file: {err}", path=str(path)) from None
    return total
