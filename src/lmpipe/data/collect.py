"""The ``collect`` stage: read every source, mix them by weight, write ``data/raw/``.

How the mixture is drawn. Source *i* has weight w_i, so share p_i = w_i / sum(w), and
``avail_i`` documents (after its own ``max_docs``). The mixture is as large as the sources allow
at those proportions: N = min_i avail_i / p_i, capped by ``collect.max_docs``. Source *i*
contributes n_i ~ N * p_i documents (largest-remainder rounding, so the n_i add up to floor(N)
and never exceed ``max_docs``), chosen by a seeded sample without replacement that keeps the
source's original order. The sources are then interleaved evenly (document j of source i sits
at position (j + 0.5) / n_i of the stream), so any prefix of data/raw has the same mix.

Memory stays bounded whatever the corpus size: each source is streamed into a temporary
parquet file inside the atomic output directory while it is counted, and the sample is then
read back batch by batch into the final shards. Nothing appears at ``data/raw`` unless every
source was read successfully (:func:`lmpipe.io.atomic_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import shutil
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from lmpipe.config import Paths
from lmpipe.data.config import CollectConfig, FilesSource, HFSource, Source, SyntheticSource
from lmpipe.data.download import read_url_source
from lmpipe.data.shards import ShardWriter, doc_id, make_table
from lmpipe.data.sources import (
    Record,
    SourceStats,
    load_hf,
    read_files_source,
    read_hf_source,
    read_source_file,
    source_files,
)
from lmpipe.data.synthetic import check_kinds, chinese_count, generate
from lmpipe.engine import current
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, write_manifest
from lmpipe.progress import Progress

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
_STAGING_SCHEMA = pa.schema([("text", pa.string()), ("meta", pa.string())])
_BATCH = 4096


@dataclass
class StagedSource:
    """One source after reading: its temporary parquet file and what reading it found."""

    source: Source
    path: Path
    available: int
    stats: SourceStats


def source_seed(seed: int, name: str) -> int:
    """Per-source seed from the stage seed and the source name (stable across runs and machines)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "big")


def read_source(source: Source, root: Path, seed: int, stats: SourceStats,
                progress: Progress | None = None) -> Generator[Record, None, None]:
    """The (text, meta) records of one configured source; see :mod:`lmpipe.data.sources`."""
    if isinstance(source, SyntheticSource):
        check_kinds(source.kinds, f"collect.sources.{source.name}.kinds")
        return generate(source.num_docs, noise_fraction=source.noise_fraction, kinds=source.kinds,
                        seed=source_seed(seed, source.name), zh_fraction=source.zh_fraction,
                        entity_fraction=source.entity_fraction)
    if isinstance(source, FilesSource):
        return read_files_source(source, root, stats)
    if isinstance(source, HFSource):
        return read_hf_source(source, root, stats)
    return read_url_source(source, root, stats, progress)


HF_PART_ROWS = 100_000  # rows of a (not streamed) HF dataset split that one Ray task reads
Part = Path | range | None


def source_parts(source: Source, root: Path) -> list[Part]:
    """The pieces of a source that are read independently (one Ray task each on the ``ray``
    engine): each file of a ``files`` source, row ranges of an HF split that is not streamed (its
    length is read here, where the split is loaded), else the whole source (None)."""
    if isinstance(source, FilesSource):
        return list(source_files(source, root))
    if isinstance(source, HFSource) and not source.streaming:
        dataset, _ = load_hf(source.path, root, config_name=source.config_name, split=source.split,
                             revision=source.revision, data_files=source.data_files)
        size = dataset.num_rows
        return [range(start, min(start + HF_PART_ROWS, size)) for start in range(0, size, HF_PART_ROWS)] or [None]
    return [None]


def read_part(source: Source, part: Part, root: Path, seed: int, stats: SourceStats,
              progress: Progress | None = None) -> Iterator[Record]:
    """The records of one part of a source (:func:`source_parts`)."""
    if isinstance(part, Path):
        assert isinstance(source, FilesSource)
        return read_source_file(source, part, root, stats)
    if isinstance(part, range):
        assert isinstance(source, HFSource)
        return read_hf_source(source, root, stats, part)
    return read_source(source, root, seed, stats, progress)


def encode_meta(meta: dict[str, Any]) -> str:
    """A record's meta as stored in data/raw: compact JSON, non-ASCII kept."""
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"))


def _encoded_records(source: Source, root: Path, seed: int, stats: SourceStats,
                     progress: Progress) -> Generator[tuple[str, str], None, None]:
    """(text, encoded meta) of every record of ``source``, read on the configured engine."""
    if current().kind == "ray":
        from lmpipe.data import ray_collect

        yield from ray_collect.encoded_records(source, source_parts(source, root), root, seed, stats)
        return
    with contextlib.closing(read_source(source, root, seed, stats, progress)) as records:
        for text, meta in records:
            yield text, encode_meta(meta)


def _expected_docs(source: Source) -> int | None:
    if isinstance(source, SyntheticSource):
        total = source.num_docs + round(source.noise_fraction * source.num_docs) \
            + chinese_count(source.num_docs, source.noise_fraction, source.zh_fraction) \
            + round(source.entity_fraction * source.num_docs)
        return min(total, source.max_docs) if source.max_docs else total
    return source.max_docs


def packed(records: Iterator[tuple[str, str]], pack_chars: int | None) -> Iterator[tuple[str, str]]:
    """``records`` joined one per line into documents of at least ``pack_chars`` characters (the
    last one may be shorter); each keeps the meta of its first record, with ``records``, how many
    it joins. None: the records as they are."""
    if pack_chars is None:
        yield from records
        return
    lines: list[str] = []
    size, first = 0, ""
    for text, meta in records:
        if not lines:
            first = meta
        lines.append(text)
        size += len(text) + 1
        if size - 1 >= pack_chars:
            yield "\n".join(lines), _with_count(first, len(lines))
            lines, size = [], 0
    if lines:
        yield "\n".join(lines), _with_count(first, len(lines))


def _with_count(meta: str, count: int) -> str:
    return encode_meta({**json.loads(meta), "records": count})


def stage_source(source: Source, root: Path, seed: int, path: Path, progress: Progress) -> StagedSource:
    """Stream one source into the parquet file ``path`` (columns text, meta) and count it.

    Stops after the source's ``max_docs``. Raises DataError when the source yields no document.
    """
    stats = SourceStats()
    task = progress.add_task(f"read {source.name}", total=_expected_docs(source))
    count = 0
    texts: list[str] = []
    metas: list[str] = []
    with pq.ParquetWriter(path, _STAGING_SCHEMA) as writer:

        def flush() -> None:
            writer.write_table(pa.table({"text": texts, "meta": metas}, schema=_STAGING_SCHEMA))
            texts.clear()
            metas.clear()
            progress.update(task, completed=count)

        with contextlib.closing(_encoded_records(source, root, seed, stats, progress)) as records:
            for text, meta in packed(records, source.pack_chars):
                texts.append(text)
                metas.append(meta)
                count += 1
                if len(texts) >= _BATCH:
                    flush()
                if source.max_docs is not None and count >= source.max_docs:
                    break
        flush()
    if count == 0:
        raise DataError(f"source '{source.name}' produced no documents ({stats.skipped_empty} empty texts skipped); "
                        "check its paths and text_field, or remove it from collect.sources")
    log.info("source %s: %d documents read, %d empty skipped", source.name, count, stats.skipped_empty)
    return StagedSource(source, path, count, stats)


def mixture_sizes(available: list[int], weights: list[float], max_docs: int | None = None) -> list[int]:
    """Documents to take from each source: the largest mix at the weights' proportions.

    N = min_i available_i / p_i (capped by ``max_docs``); n_i is N * p_i rounded by largest
    remainder so that sum(n_i) == floor(N); never more than ``available_i``.
    """
    shares = [w / sum(weights) for w in weights]
    size = min(a / p for a, p in zip(available, shares, strict=True))
    if max_docs is not None:
        size = min(size, max_docs)
    total = math.floor(size + 1e-9)
    exact = [size * p for p in shares]
    counts = [min(math.floor(x + 1e-9), a) for x, a in zip(exact, available, strict=True)]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder:
        if sum(counts) >= total:
            break
        if counts[i] < available[i]:
            counts[i] += 1
    return counts


def sample_indices(available: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row indices out of ``available``, sorted (original order kept)."""
    if size >= available:
        return np.arange(available, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(available, size=size, replace=False, shuffle=False)).astype(np.int64)


def _selected_rows(staged: StagedSource, rows: np.ndarray, order: int) -> Iterator[tuple[float, int, str, str]]:
    """(position key, source order, text, meta) for the chosen rows, reading one batch at a time."""
    start, done = 0, 0
    for batch in pq.ParquetFile(staged.path).iter_batches(batch_size=_BATCH):
        end = start + batch.num_rows
        hi = int(np.searchsorted(rows, end))
        if hi > done:
            picked = batch.take(pa.array(rows[done:hi] - start))
            texts, metas = picked.column(0).to_pylist(), picked.column(1).to_pylist()
            for j, (text, meta) in enumerate(zip(texts, metas, strict=True)):
                yield (done + j + 0.5) / len(rows), order, text, meta
            done = hi
        start = end


def run(cfg: CollectConfig, paths: Paths) -> dict[str, Any]:
    """Collect every source of ``cfg`` into ``paths.raw``.

    Reads the sources' files, datasets and URLs (downloads go to ``data/downloads/``); writes
    ``data/raw/part-*.parquet`` (columns id, text, source, meta) and ``manifest.json``, atomically.
    Raises DataError (or ChecksumError / ConfigError) naming the file and line for bad input, in
    which case nothing is written at ``data/raw``. Returns the summary logged to MLflow.
    """
    with atomic_dir(paths.raw) as out:
        staging = out / STAGING_DIR
        staging.mkdir()
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns) as progress:
            staged = [stage_source(src, paths.root, cfg.seed, staging / f"{i:03d}.parquet", progress)
                      for i, src in enumerate(cfg.sources)]
        sizes = mixture_sizes([s.available for s in staged], [s.source.weight for s in staged], cfg.max_docs)
        streams = [
            _selected_rows(s, sample_indices(s.available, n, source_seed(cfg.seed, s.source.name)), i)
            for i, (s, n) in enumerate(zip(staged, sizes, strict=True)) if n
        ]
        writer = ShardWriter(out, cfg.shard_docs)
        names = [s.source.name for s in staged]
        total_bytes, batch = 0, []
        for row in heapq.merge(*streams):
            batch.append(row)
            if len(batch) >= _BATCH:
                total_bytes += _write_rows(writer, batch, names)
                batch = []
        total_bytes += _write_rows(writer, batch, names)
        shards = writer.close()
        shutil.rmtree(staging)
        per_source = {
            s.source.name: {"type": s.source.type, "available": s.available, "selected": n,
                            "skipped_empty": s.stats.skipped_empty, "weight": s.source.weight}
            for s, n in zip(staged, sizes, strict=True)
        }
        counts = {"docs": sum(sizes), "bytes": total_bytes, "shards": len(shards), "sources": per_source}
        inputs = {name: path for s in staged for name, path in s.stats.inputs.items()}
        datasets = {name: info for s in staged for name, info in s.stats.datasets.items()}
        write_manifest(out, stage="collect", config=cfg, inputs=inputs, counts=counts,
                       extra={"seed": cfg.seed, "datasets": datasets})
    log.info("collected %d documents (%d bytes) from %d source(s) into %s",
             sum(sizes), total_bytes, len(staged), paths.raw)
    summary: dict[str, Any] = {"docs": sum(sizes), "bytes": total_bytes, "shards": len(shards),
                               "skipped_empty": sum(s.stats.skipped_empty for s in staged)}
    for name, info in per_source.items():
        summary[f"docs.{name}"] = info["selected"]
        summary[f"available.{name}"] = info["available"]
        summary[f"skipped_empty.{name}"] = info["skipped_empty"]
    summary["artifacts"] = [str(paths.raw / "manifest.json")]
    return summary


def _write_rows(writer: ShardWriter, rows: list[tuple[float, int, str, str]], names: list[str]) -> int:
    """Write merged rows as documents; return their UTF-8 byte count."""
    if not rows:
        return 0
    texts = [r[2] for r in rows]
    table = make_table([doc_id(t) for t in texts], texts, [names[r[1]] for r in rows], [r[3] for r in rows])
    writer.write(table)
    return int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)
