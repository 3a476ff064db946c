"""The ``clean`` stage on Ray Data (``engine.kind: ray``): same rules, same output, many machines.

The output is the local engine's, byte for byte: the same documents, the same shards of
``clean.shard_docs`` rows, the same report and manifest. Each step is a Ray Data operator:

1. **Filter** (``map_batches``, one task per raw row group): :func:`lmpipe.data.clean.process_chunk`,
   the local engine's kernel, judges, decontaminates and redacts; it gives each survivor its exact
   key and MinHash signature. A survivor's *order key* is ``chunk << 32 | row``: input order.
   The task writes its survivors' documents to a *stage file* of the chunk (``.stage/`` in the
   output's temporary directory) and returns only what dedup needs (order key, id, language,
   bytes, exact key, signature, LSH band hashes): the text never passes through Ray's object store or a shuffle.
2. **Exact dedup** (hash shuffle): ``groupby`` on the exact key modulo the partition count puts
   every copy of a document in one partition; there, of each key's documents the one with the
   smallest order key is kept.
3. **Near dedup**: each exact survivor emits one row per LSH band (band hash, order key, signature);
   ``groupby`` on the band hash modulo the partition count puts candidates together. A first
   shuffle moves band hashes and order keys only and finds the candidates (documents sharing a
   bucket); a second moves the candidates' rows with their signatures, and each partition emits
   the verified pairs of its buckets (estimated Jaccard >= threshold). The driver resolves the pair graph's connected components with
   the local engine's rule, in order-key order: a document is removed when it matches an earlier
   *kept* one. The driver holds the candidates' order keys (8 bytes each) and the verified pairs,
   never a signature.
4. **Write**: the kept order keys are grouped by chunk (a shuffle of 8 bytes a document) into a
   *keep file* per chunk, which also gives each chunk's count and so each document's global row
   number and shard; each shard is written by one task, which reads the stage and keep files of
   the chunks it spans. The ``.stage/`` directory is removed before the manifest is written.

Workers read the raw shards and write the stage files and the clean shards by path: on a
multi-node cluster the project directory must be on a filesystem every node mounts. Output goes into :func:`lmpipe.io.atomic_dir`
as on the local engine, so a failed task (after Ray's retries, ``MAX_RETRIES``) or a lost worker
fails the stage and leaves no partial ``data/clean``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmpipe.config import Paths
from lmpipe.data.clean import (
    EXAMPLE_CHARS,
    REPORT_NAME,
    ChunkResult,
    _check,
    _Tally,
    add_throughput,
    process_chunk,
    rule_names,
    run_inputs,
    write_report,
)
from lmpipe.data.config import CleanConfig
from lmpipe.data.decontam import NgramIndex
from lmpipe.data.dedup import (
    EDGE_SCHEMA,
    NearDuplicateIndex,
    StreamDedup,
    band_column,
    band_rows,
    partition_pairs,
    resolve_near,
    shared_buckets,
    signature_column,
)
from lmpipe.data.shards import COLUMNS, SCHEMA, conform
from lmpipe.engine import MAX_RETRIES, EngineConfig, connect, current, user_errors
from lmpipe.engine import collect as _collect
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, atomic_write

log = logging.getLogger(__name__)

ROW_BITS = 32
SHUFFLE_BYTES = 256 << 20  # raw (uncompressed) bytes per shuffle partition, at most

ROW_MASK = (1 << ROW_BITS) - 1
STAGE_NAME = ".stage"
DOC_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("lang", pa.string()), ("key", pa.uint64()), ("sig", pa.binary()),
    ("bands", pa.binary()), ("bytes", pa.int64()), ("stats", pa.binary()),
])
ORDER_SCHEMA = pa.schema([("order", pa.int64())])
CHUNK_SCHEMA = pa.schema([("chunk", pa.int64()), ("rows", pa.int64()), ("bytes", pa.int64()),
                          ("languages", pa.string())])
SHARD_SCHEMA = pa.schema([("shard", pa.int64()), ("rows", pa.int64())])

# ------------------------------------------------------------------------------------- 1. filter

_INDEX: dict[str, Any] = {}


def _eval_index(box: list[Any]) -> NgramIndex | None:
    if not box:
        return None
    if "index" not in _INDEX:  # once per worker process
        import ray

        _INDEX["index"] = ray.get(box[0])
    return _INDEX["index"]


def _stage_file(stage: str | Path, chunk: int) -> Path:
    return Path(stage) / f"chunk-{chunk:06d}.parquet"


def _keep_file(stage: str | Path, chunk: int) -> Path:
    return Path(stage) / f"keep-{chunk:06d}.npy"


def filter_chunks(batch: pa.Table, cfg: CleanConfig, index_box: list[Any], stage: str,
                  lsh: tuple[int, int] = (0, 0)) -> pa.Table:
    """Run the local engine's kernel on the raw row groups named in ``batch`` (path, row_group,
    chunk, first_row); write each chunk's survivors to its stage file. Returns one row per
    survivor (no text; its signature and, ``lsh`` = (bands, rows), its LSH band hashes) plus one
    ``stats`` row per chunk."""
    index = _eval_index(index_box)
    out = []
    for item in batch.to_pylist():
        path = item["path"]
        try:
            table = pq.ParquetFile(path).read_row_group(item["row_group"])
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a readable parquet file: {err}", path=path) from None
        result = process_chunk(conform(table, where=path), cfg, index, path, item["first_row"])
        kept = result.table
        n = kept.num_rows
        texts = kept.column("text")
        sig = result.signatures
        # an empty table, not a zero-row slice: a pickled slice carries its whole buffers (the chunk)
        stats = dataclasses.replace(result, table=kept.schema.empty_table(), keys=np.zeros(0, np.uint64), signatures=None)
        # scratch, renamed into place whole (a retried task never leaves half a file); not fsynced
        with atomic_write(_stage_file(stage, item["chunk"]), "wb", durable=False) as handle:
            pq.write_table(conform(kept, where=path), handle, compression="lz4")
        docs = {
            "order": pa.array((item["chunk"] << ROW_BITS) + np.arange(n, dtype=np.int64)),
            "id": kept.column("id"), "lang": kept.column("lang"), "key": pa.array(result.keys, pa.uint64()),
            "sig": signature_column(sig) if sig is not None else pa.array([b""] * n, pa.binary()),
            "bands": band_column(sig, *lsh) if sig is not None and lsh[0] else pa.array([b""] * n, pa.binary()),
            "bytes": pc.binary_length(pc.cast(texts, pa.large_binary())).cast(pa.int64()),
            "stats": pa.nulls(n, pa.binary()),
        }
        out.append(pa.table(docs, schema=DOC_SCHEMA))
        marker = {name: pa.nulls(1, DOC_SCHEMA.field(name).type) for name in DOC_SCHEMA.names}
        marker["order"] = pa.array([item["chunk"] << ROW_BITS], pa.int64())
        marker["stats"] = pa.array([pickle.dumps(stats)], pa.binary())
        out.append(pa.table(marker, schema=DOC_SCHEMA))
    return pa.concat_tables(out) if out else DOC_SCHEMA.empty_table()


def _documents(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("stats"))).drop_columns(["stats"])


def _stats(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("stats"))).select(["order", "stats"])


# ---------------------------------------------------------------------------------- 2. exact dedup


def with_part(batch: pa.Table, column: str, parts: int) -> pa.Table:
    """``batch`` with ``part``: its ``column`` (a hash) modulo ``parts``, the key of a shuffle.

    The shuffles group by this coarse key, not by the hash itself: a Ray ``map_groups`` call per
    exact key or per LSH bucket would be a Python call per document (per band, for LSH), which
    costs far more than the work done in it."""
    values = batch.column(column).to_numpy()
    return batch.append_column("part", pa.array((values % np.uint64(parts)).astype(np.int64)))


def exact_partition(group: pa.Table) -> pa.Table:
    """Documents of one shuffle partition, any number of exact keys: of each key's documents the
    first by order key gets a null ``dup_id``, every other one the first's id: a duplicate."""
    group = group.sort_by([("key", "ascending"), ("order", "ascending")]).combine_chunks()
    keys = group.column("key").to_numpy()
    n = len(keys)
    first = np.ones(n, np.bool_)
    first[1:] = keys[1:] != keys[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    dup_id = pc.if_else(pa.array(first), pa.nulls(n, pa.string()), group.column("id").take(pa.array(head)))
    return group.drop_columns(["part"]).append_column("dup_id", dup_id)


def shared_orders(group: pa.Table) -> pa.Table:
    """Order keys of the documents of one shuffle partition of band keys that share a bucket."""
    orders = group.column("order").to_numpy()[shared_buckets(group.column("bucket").to_numpy())]
    return pa.table({"order": pa.array(np.unique(orders))}, schema=ORDER_SCHEMA)


def near_partition(group: pa.Table, num_perm: int, min_equal: int) -> pa.Table:
    """Verified pairs of one shuffle partition of band rows (any number of LSH buckets)."""
    return partition_pairs(group.combine_chunks(), num_perm, min_equal)


def _unique(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("dup_id"))).drop_columns(["dup_id"])


REMOVED_SCHEMA = pa.schema([("docs", pa.int64()), ("bytes", pa.int64()), ("languages", pa.string()),
                            ("firsts", pa.string())])


def removed_summary(batch: pa.Table, limit: int, exact: bool = False) -> pa.Table:
    """One row summing the documents a dedup rule removes in ``batch`` (for ``exact``, those with
    a ``dup_id``; otherwise every row): count, bytes, documents per language, and the first
    ``limit`` by order key as [order, id, duplicate's id] (candidates for the report's examples)."""
    if exact:
        batch = batch.filter(pc.is_valid(batch.column("dup_id")))
    langs = collections.Counter(batch.column("lang").to_pylist())
    firsts = batch.sort_by("order").slice(0, limit)
    dup_ids = firsts.column("dup_id").to_pylist() if exact else [None] * firsts.num_rows
    return pa.table({"docs": [batch.num_rows], "bytes": [int(pc.sum(batch.column("bytes")).as_py() or 0)],
                     "languages": [json.dumps(langs)],
                     "firsts": [json.dumps([[o, i, d] for o, i, d in zip(firsts.column("order").to_pylist(),
                                                                       firsts.column("id").to_pylist(), dup_ids,
                                                                       strict=True)])]},
                    schema=REMOVED_SCHEMA)


def merge_removed(table: pa.Table, limit: int) -> tuple[int, int, dict[str, int], list[list[Any]]]:
    """The rows of :func:`removed_summary` as one: (docs, bytes, per language, first ``limit``)."""
    langs: collections.Counter[str] = collections.Counter()
    for value in table.column("languages").to_pylist():
        langs.update(json.loads(value))
    firsts = sorted(row for value in table.column("firsts").to_pylist() for row in json.loads(value))[:limit]
    return (int(sum(table.column("docs").to_pylist())), int(sum(table.column("bytes").to_pylist())), dict(langs),
            firsts)


def staged_docs(stage: Path, orders: Any) -> dict[int, tuple[str, str]]:
    """(id, first ``EXAMPLE_CHARS`` characters) of a few staged documents, by order key: the
    report's examples, read on the driver from the stage files of their chunks."""
    by_chunk: dict[int, list[int]] = collections.defaultdict(list)
    for order in {int(o) for o in orders}:
        by_chunk[order >> ROW_BITS].append(order)
    out: dict[int, tuple[str, str]] = {}
    for chunk, wanted in sorted(by_chunk.items()):
        table = pq.read_table(_stage_file(stage, chunk), columns=["id", "text"])
        rows = table.take(pa.array([order & ROW_MASK for order in wanted]))
        heads = pc.utf8_slice_codeunits(rows.column("text"), 0, EXAMPLE_CHARS).to_pylist()
        out.update(zip(wanted, zip(rows.column("id").to_pylist(), heads, strict=True), strict=True))
    return out


# ----------------------------------------------------------------------------------- 3. near dedup


# ----------------------------------------------------------------------------------------- 4. write


def write_keep(group: pa.Table, stage: str) -> pa.Table:
    """The kept order keys of one chunk, ascending, to its keep file; its count, bytes and languages."""
    group = group.sort_by("order")
    chunk = int(group.column("chunk")[0].as_py())
    orders = group.column("order").to_numpy()
    with atomic_write(_keep_file(stage, chunk), "wb", durable=False) as handle:
        np.save(handle, orders)
    langs, counts = np.unique(group.column("lang").to_numpy(zero_copy_only=False).astype(str), return_counts=True)
    return pa.table({"chunk": [chunk], "rows": [len(orders)], "bytes": [int(pc.sum(group.column("bytes")).as_py())],
                     "languages": [json.dumps(dict(zip(langs.tolist(), counts.tolist(), strict=True)))]},
                    schema=CHUNK_SCHEMA)


def shard_plan(rows: dict[int, int], shard_docs: int) -> list[dict[str, Any]]:
    """Which kept rows of which chunks each output shard holds: the kept documents in order-key
    order, ``shard_docs`` a shard, as on the local writer. ``rows``: kept documents per chunk."""
    plan: list[dict[str, Any]] = []
    pieces: list[list[int]] = []
    room = shard_docs
    for chunk in sorted(rows):
        lo, count = 0, rows[chunk]
        while lo < count:
            take = min(room, count - lo)
            pieces.append([chunk, lo, lo + take])
            lo, room = lo + take, room - take
            if room == 0:
                plan.append({"shard": len(plan), "pieces": json.dumps(pieces)})
                pieces, room = [], shard_docs
    if pieces:
        plan.append({"shard": len(plan), "pieces": json.dumps(pieces)})
    return plan


def write_shards(batch: pa.Table, stage: str, directory: str) -> pa.Table:
    """Write the output shards of ``batch`` (rows of :func:`shard_plan`) from the stage and keep
    files (the local engine's name, columns and compression)."""
    out = []
    for item in batch.to_pylist():
        parts = []
        for chunk, lo, hi in json.loads(item["pieces"]):
            keep = np.load(_keep_file(stage, chunk))[lo:hi] & ROW_MASK
            parts.append(pq.read_table(_stage_file(stage, chunk), columns=list(COLUMNS)).take(pa.array(keep)))
        table = conform(pa.concat_tables(parts), where=directory).combine_chunks()
        pq.write_table(table, Path(directory) / f"part-{item['shard']:05d}.parquet", compression="zstd")
        out.append(pa.table({"shard": [item["shard"]], "rows": [table.num_rows]}, schema=SHARD_SCHEMA))
    return pa.concat_tables(out) if out else SHARD_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------- the stage


def _chunks(files: list[Path]) -> list[dict[str, Any]]:
    """One task per row group of the raw shards, in input order (parquet metadata only)."""
    items: list[dict[str, Any]] = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        first = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                items.append({"path": str(path), "row_group": rg, "chunk": len(items), "first_row": first,
                              "bytes": meta.row_group(rg).total_byte_size})
            first += rows
    return items


def _order_set(wanted: pa.Array | list[Any]) -> pa.Array:
    if isinstance(wanted, list):  # a broadcast object: fetched once per worker
        import ray

        if "drop" not in _INDEX or _INDEX["drop"][0] != wanted[0].hex():
            _INDEX["drop"] = (wanted[0].hex(), pa.array(ray.get(wanted[0])))
        return _INDEX["drop"][1]
    return wanted


def _rows_in(batch: pa.Table, wanted: pa.Array | list[Any]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("order"), value_set=_order_set(wanted)))


def _kept(batch: pa.Table, drop: list[Any]) -> pa.Table:
    """Drop the near duplicates; add each document's chunk."""
    if drop:
        batch = batch.filter(pc.invert(pc.is_in(batch.column("order"), value_set=_order_set(drop))))
    return batch.append_column("chunk", pc.shift_right(batch.column("order"), ROW_BITS))


def _phase(what: str, started: float, *args: Any) -> None:
    log.info("clean on Ray: " + what + " (%.1f s)", *args, time.perf_counter() - started)


def run(cfg: CleanConfig, paths: Paths, engine: EngineConfig | None = None) -> dict[str, Any]:
    """Clean ``paths.raw`` into ``paths.clean`` on Ray; the same output and summary keys as
    :func:`lmpipe.data.clean.run` (``workers`` is the cluster's CPU count).

    Raises the same ConfigError/DataError as the local engine, also when a Ray task raised it.
    """
    _check(cfg)
    ray = connect(engine or current())
    with user_errors("clean"):
        return _run(ray, cfg, paths)


def clean_locally(cfg: CleanConfig, paths: Paths) -> dict[str, Any]:
    from lmpipe.data import clean
    from lmpipe.engine import EngineConfig, use

    with use(EngineConfig()):
        return clean.run(cfg, paths)


def _dedup_and_write(ray: Any, cfg: CleanConfig, items: list[dict[str, Any]], index: NgramIndex | None,
                     stage: Path, tmp: Path, cpus: int, shuffle_parts: int, started: float) -> tuple[_Tally, StreamDedup]:
    """Steps 1-4 of the module docstring; the output shards go to ``tmp``. The tally and the
    dedup rules' report entries, for :func:`lmpipe.data.clean.write_report`."""
    parts = max(2, cpus)
    remote = {"max_retries": MAX_RETRIES}
    rdata = ray.data
    index_box = [ray.put(index)] if index is not None and len(index) else []
    nd = cfg.near_dedup
    dedup = StreamDedup(cfg.exact_dedup.enabled, NearDuplicateIndex(nd.threshold, nd.num_perm) if nd.enabled else None,
                        cfg.examples_per_rule, EXAMPLE_CHARS)
    lsh = (dedup.near.bands, dedup.near.rows) if dedup.near is not None else (0, 0)
    filtered = rdata.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        filter_chunks, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"cfg": cfg, "index_box": index_box, "stage": str(stage), "lsh": lsh}, **remote).materialize()
    _phase("filtered %d raw chunks", started, len(items))
    stats_rows = _collect(filtered.map_batches(_stats, batch_format="pyarrow", **remote), pa.schema(
        [("order", pa.int64()), ("stats", pa.binary())])).sort_by("order")
    docs = filtered.map_batches(_documents, batch_format="pyarrow", **remote)
    limit = cfg.examples_per_rule

    survivors = docs.select_columns(["order", "id", "lang", "bytes", "bands"], **remote)
    judged = None
    by_lang: dict[str, dict[str, int]] = {}  # dedup rule -> language -> documents removed (the report's by_language)
    if cfg.exact_dedup.enabled:
        # the hash shuffle: every document's dedup row (no text, no signature) moves once, to the
        # group of its exact key
        judged = docs.select_columns(["order", "id", "lang", "bytes", "bands", "key"], **remote).map_batches(
            with_part, batch_format="pyarrow", fn_kwargs={"column": "key", "parts": shuffle_parts}, **remote) \
            .groupby("part", num_partitions=shuffle_parts).map_groups(
                exact_partition, batch_format="pyarrow", **remote).materialize()
        _phase("exact dedup over %d partitions", started, shuffle_parts)
        survivors = judged.map_batches(_unique, batch_format="pyarrow", **remote)
        count, size, langs, firsts = merge_removed(_collect(judged.map_batches(
            removed_summary, batch_format="pyarrow", fn_kwargs={"limit": limit, "exact": True}, **remote), REMOVED_SCHEMA),
            limit)
        heads = staged_docs(stage, [order for order, _, _ in firsts])
        dedup.removed["exact_dedup"] = {"docs": count, "bytes": size, "examples": [
            {"id": doc_id, "duplicate_of": dup_id, "text": heads[order][1]} for order, doc_id, dup_id in firsts]}
        by_lang["exact_dedup"] = langs
    drop: list[Any] = []  # near duplicates, broadcast to the tasks that filter them out
    if dedup.near is not None:
        near = dedup.near
        bands = {"num_perm": nd.num_perm, "bands": near.bands, "rows": near.rows}
        # two band shuffles: the first moves only (band hash, order key) and finds the candidates,
        # the documents sharing a bucket with another; the second moves the candidates'
        # signatures only, to verify their pairs. Most documents share no bucket, so their
        # signatures (num_perm * 4 bytes per band row) never cross the network: the filter's
        # output holds them, and only the candidates' are read from it.
        candidates = _collect(
            survivors.select_columns(["order", "bands"], **remote)
            .map_batches(band_rows, batch_format="pyarrow", fn_kwargs={**bands, "signatures": False}, **remote)
            .map_batches(with_part, batch_format="pyarrow", fn_kwargs={"column": "bucket", "parts": shuffle_parts},
                         **remote)
            .groupby("part", num_partitions=shuffle_parts)
            .map_groups(shared_orders, batch_format="pyarrow", **remote),
            ORDER_SCHEMA).column("order").to_numpy()
        candidates = np.unique(candidates)  # a document shares buckets in several partitions
        _phase("near dedup: %d candidate documents", started, len(candidates))
        edges = EDGE_SCHEMA.empty_table()
        if len(candidates):
            edges = _collect(
                docs.select_columns(["order", "sig"], **remote)
                .map_batches(_rows_in, batch_format="pyarrow", fn_kwargs={"wanted": [ray.put(candidates)]}, **remote)
                .map_batches(band_rows, batch_format="pyarrow", fn_kwargs=bands, **remote)
                .map_batches(with_part, batch_format="pyarrow", fn_kwargs={"column": "bucket", "parts": shuffle_parts},
                         **remote)
                .groupby("part", num_partitions=shuffle_parts)
                .map_groups(near_partition, batch_format="pyarrow",
                            fn_kwargs={"num_perm": nd.num_perm, "min_equal": near.min_equal}, **remote),
                EDGE_SCHEMA)
        removed, dup_of = resolve_near(edges)
        _phase("near dedup: %d verified pairs", started, edges.num_rows)
        entry: dict[str, Any] = {"docs": len(removed), "bytes": 0, "examples": []}
        if len(removed):
            drop = [ray.put(removed)]
            _, entry["bytes"], by_lang["near_dedup"], _ = merge_removed(_collect(
                survivors.select_columns(["order", "id", "lang", "bytes"], **remote)
                .map_batches(_rows_in, batch_format="pyarrow", fn_kwargs={"wanted": drop}, **remote)
                .map_batches(removed_summary, batch_format="pyarrow", fn_kwargs={"limit": 0}, **remote), REMOVED_SCHEMA), 0)
            shown = removed[:limit]
            info = staged_docs(stage, np.concatenate([shown, dup_of[: len(shown)]]))
            entry["examples"] = [{"id": info[int(k)][0], "duplicate_of": info[int(d)][0], "text": info[int(k)][1]}
                                 for k, d in zip(shown, dup_of, strict=False)]
        dedup.removed["near_dedup"] = entry
    del filtered  # the object store keeps the blocks a live dataset references
    # the kept documents' order keys, grouped by chunk into keep files (8 bytes a document)
    chunks = _collect(survivors.select_columns(["order", "lang", "bytes"], **remote).map_batches(
        _kept, batch_format="pyarrow", fn_kwargs={"drop": drop}, **remote)
        .groupby("chunk", num_partitions=parts).map_groups(
            write_keep, batch_format="pyarrow", fn_kwargs={"stage": str(stage)}, **remote), CHUNK_SCHEMA)
    survivors = judged = docs = None
    _phase("kept documents listed", started)

    tally = _Tally(rule_names(cfg))
    empty = pa.table({"text": pa.array([], pa.string()), "lang": pa.array([], pa.string())})
    for blob in stats_rows.column("stats").to_pylist():
        result: ChunkResult = pickle.loads(blob)
        tally.add(result, empty, cfg.examples_per_rule, {})
    for rule, counts in by_lang.items():  # in dedup.removed's order, as the local engine's tally
        for lang, n in counts.items():
            slot = tally.dedup_by_language.setdefault(lang, {})
            slot[rule] = slot.get(rule, 0) + n
    rows = dict(zip(chunks.column("chunk").to_pylist(), chunks.column("rows").to_pylist(), strict=True))
    total = sum(rows.values())
    if total:
        plan = shard_plan(rows, cfg.shard_docs)
        shards = _collect(rdata.from_items(plan, override_num_blocks=len(plan)).map_batches(
            write_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"stage": str(stage), "directory": str(tmp)},
            **remote), SHARD_SCHEMA)
        if shards.num_rows != len(plan) or sum(shards.column("rows").to_pylist()) != total:
            raise DataError(f"Ray wrote {shards.num_rows} shards of {sum(shards.column('rows').to_pylist())} rows, "
                            f"expected {total} rows", path=str(tmp))
        tally.docs_out = total
        tally.bytes_out = int(sum(chunks.column("bytes").to_pylist()))
        for langs in chunks.column("languages").to_pylist():
            for lang, count in json.loads(langs).items():
                tally.languages[lang] = tally.languages.get(lang, 0) + count
        _phase("%d shards written", started, len(plan))
    else:  # as the local writer: an empty stream still writes one empty shard
        pq.write_table(SCHEMA.empty_table(), tmp / "part-00000.parquet", compression="zstd")
    return tally, dedup


def _run(ray: Any, cfg: CleanConfig, paths: Paths) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    files, index, eval_files = run_inputs(cfg, paths)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ctx.raise_original_map_exception = True  # a task's DataError reaches the driver as itself
    # Ray's task-based sort shuffle for the groupbys: the hash shuffle's aggregator actors take
    # seconds to start per operator, which dominates all but the largest corpora
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    items = _chunks(files)
    # shuffle partitions: a few per CPU, and none holding more than SHUFFLE_BYTES of raw text
    shuffle_parts = max(4 * cpus, -(-sum(item["bytes"] for item in items) // SHUFFLE_BYTES))
    if not items:  # only empty shards: nothing to distribute
        return clean_locally(cfg, paths)
    with atomic_dir(paths.clean) as tmp:
        stage = tmp / STAGE_NAME
        stage.mkdir()
        tally, dedup = _dedup_and_write(ray, cfg, items, index, stage, tmp, cpus, shuffle_parts, started)
        shutil.rmtree(stage)
        summary = write_report(cfg, tally, dedup, tmp, paths, eval_files)
    add_throughput(summary, started, cpu_started - tally.worker_cpu, cpus)
    log.info("clean on Ray: %d -> %d documents (%.1f MB/s)", summary["docs_in"], summary["docs_out"],
             summary["mb_per_s"])
    return {**summary, "artifacts": [str(paths.clean / REPORT_NAME)]}
