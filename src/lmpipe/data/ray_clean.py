"""The ``clean`` stage on Ray Data (``engine.kind: ray``): same rules, same output, many machines.

The output is the local engine's, byte for byte: the same documents, the same shards of
``clean.shard_docs`` rows, the same report and manifest. Each step is a Ray Data operator:

1. **Filter** (``map_batches``, one task per raw row group): :func:`lmpipe.data.clean.process_chunk`,
   the local engine's kernel, judges, decontaminates and redacts; it gives each survivor its exact
   key and MinHash signature. A survivor's *order key* is ``chunk << 32 | row``: input order.
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
4. **Write** (two shuffles): kept documents are counted per chunk, which gives each its global
   row number and so its shard; each shard is written by one task, sorted by order key.

Workers read the raw shards and write the clean ones by path: on a multi-node cluster the project
directory must be on a filesystem every node mounts. Output goes into :func:`lmpipe.io.atomic_dir`
as on the local engine, so a failed task (after Ray's retries, ``MAX_RETRIES``) or a lost worker
fails the stage and leaves no partial ``data/clean``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pickle
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
from lmpipe.io import atomic_dir

log = logging.getLogger(__name__)

ROW_BITS = 32
SHUFFLE_BYTES = 256 << 20  # raw (uncompressed) bytes per shuffle partition, at most

DOC_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
    ("meta", pa.string()), ("lang", pa.string()), ("key", pa.uint64()), ("sig", pa.binary()),
    ("bytes", pa.int64()), ("head", pa.string()), ("stats", pa.binary()),
])
DUP_SCHEMA = pa.schema([("order", pa.int64()), ("id", pa.string()), ("dup_id", pa.string()),
                        ("bytes", pa.int64()), ("head", pa.string())])
INFO_SCHEMA = pa.schema([("order", pa.int64()), ("id", pa.string()), ("bytes", pa.int64()), ("head", pa.string())])
ORDER_SCHEMA = pa.schema([("order", pa.int64())])
SHARD_SCHEMA = pa.schema([("shard", pa.int64()), ("rows", pa.int64()), ("bytes", pa.int64()),
                          ("languages", pa.string())])

# ------------------------------------------------------------------------------------- 1. filter

_INDEX: dict[str, Any] = {}


def _eval_index(box: list[Any]) -> NgramIndex | None:
    if not box:
        return None
    if "index" not in _INDEX:  # once per worker process
        import ray

        _INDEX["index"] = ray.get(box[0])
    return _INDEX["index"]


def filter_chunks(batch: pa.Table, cfg: CleanConfig, index_box: list[Any]) -> pa.Table:
    """Run the local engine's kernel on the raw row groups named in ``batch`` (path, row_group,
    chunk, first_row). Returns one row per survivor plus one ``stats`` row per chunk."""
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
        stats = dataclasses.replace(result, table=kept.slice(0, 0), keys=np.zeros(0, np.uint64), signatures=None)
        docs = {
            "order": pa.array((item["chunk"] << ROW_BITS) + np.arange(n, dtype=np.int64)),
            "id": kept.column("id"), "text": texts, "source": kept.column("source"), "meta": kept.column("meta"),
            "lang": kept.column("lang"), "key": pa.array(result.keys, pa.uint64()),
            "sig": signature_column(sig) if sig is not None else pa.array([b""] * n, pa.binary()),
            "bytes": pc.binary_length(pc.cast(texts, pa.large_binary())).cast(pa.int64()),
            "head": pc.utf8_slice_codeunits(texts, 0, EXAMPLE_CHARS),
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


def _duplicates(batch: pa.Table, limit: int | None = None) -> pa.Table:
    """Duplicates of a batch (all, or the ``limit`` first by order key: candidates for examples)."""
    dups = batch.filter(pc.is_valid(batch.column("dup_id"))).select(DUP_SCHEMA.names)
    return dups if limit is None else dups.sort_by("order").slice(0, limit)


def _duplicate_langs(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("dup_id"))).select(["lang"])


def _lang_counts(ds: Any) -> dict[str, int]:
    """Documents per language of a dataset with a ``lang`` column (removed duplicates: small)."""
    langs = _collect(ds, pa.schema([("lang", pa.string())])).column("lang").to_pylist()
    return dict(collections.Counter(langs))


def _removed(dups: Any, firsts: Any, limit: int) -> dict[str, Any]:
    """Report entry of a dedup rule: count and bytes aggregated on the cluster, the first examples."""
    examples = _collect(firsts, DUP_SCHEMA).sort_by("order").slice(0, limit).to_pylist()
    return {"docs": int(dups.count()), "bytes": int(dups.sum("bytes") or 0),
            "examples": [{"id": row["id"], "duplicate_of": row["dup_id"], "text": row["head"]} for row in examples]}


# ----------------------------------------------------------------------------------- 3. near dedup


# ----------------------------------------------------------------------------------------- 4. write


def assign_shards(group: pa.Table, offsets: dict[int, int], shard_docs: int) -> pa.Table:
    """The kept documents of one chunk with their shard: global row number // shard_docs."""
    group = group.sort_by("order")
    chunk = int(group.column("chunk")[0].as_py())
    rows = offsets[chunk] + np.arange(group.num_rows, dtype=np.int64)
    return group.drop_columns(["chunk"]).append_column("shard", pa.array(rows // shard_docs))


def write_shard(group: pa.Table, directory: str) -> pa.Table:
    """Write one output shard (the local engine's name, columns and compression)."""
    group = group.sort_by("order")
    shard = int(group.column("shard")[0].as_py())
    table = conform(group, where=directory).combine_chunks()
    pq.write_table(table, Path(directory) / f"part-{shard:05d}.parquet", compression="zstd")
    langs, counts = np.unique(group.column("lang").to_numpy(zero_copy_only=False).astype(str), return_counts=True)
    return pa.table({"shard": [shard], "rows": [table.num_rows], "bytes": [int(pc.sum(group.column("bytes")).as_py())],
                     "languages": [json.dumps(dict(zip(langs.tolist(), counts.tolist(), strict=True)))]},
                    schema=SHARD_SCHEMA)


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


def _run(ray: Any, cfg: CleanConfig, paths: Paths) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    files, index, eval_files = run_inputs(cfg, paths)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = max(2, cpus)
    remote = {"max_retries": MAX_RETRIES}
    rdata = ray.data
    from ray.data.context import ShuffleStrategy

    ctx = rdata.DataContext.get_current()
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
    index_box = [ray.put(index)] if index is not None and len(index) else []
    filtered = rdata.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        filter_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "index_box": index_box},
        **remote).materialize()
    _phase("filtered %d raw chunks", started, len(items))
    stats_rows = _collect(filtered.map_batches(_stats, batch_format="pyarrow"), pa.schema(
        [("order", pa.int64()), ("stats", pa.binary())])).sort_by("order")
    docs = filtered.map_batches(_documents, batch_format="pyarrow")

    nd = cfg.near_dedup
    dedup = StreamDedup(cfg.exact_dedup.enabled, NearDuplicateIndex(nd.threshold, nd.num_perm) if nd.enabled else None,
                        cfg.examples_per_rule, EXAMPLE_CHARS)
    survivors, judged, dups = docs, None, None
    by_lang: dict[str, dict[str, int]] = {}  # dedup rule -> language -> documents removed (the report's by_language)
    if cfg.exact_dedup.enabled:
        # the hash shuffle: every document moves once, to the group of its exact key
        judged = docs.map_batches(with_part, batch_format="pyarrow", fn_kwargs={"column": "key", "parts": shuffle_parts}) \
            .groupby("part", num_partitions=shuffle_parts).map_groups(
                exact_partition, batch_format="pyarrow", **remote).materialize()
        _phase("exact dedup over %d partitions", started, shuffle_parts)
        survivors = judged.map_batches(_unique, batch_format="pyarrow")
        dups = judged.map_batches(_duplicates, batch_format="pyarrow", fn_kwargs={"limit": cfg.examples_per_rule})
        dedup.removed["exact_dedup"] = _removed(judged.map_batches(_duplicates, batch_format="pyarrow"),
                                                dups, cfg.examples_per_rule)
        by_lang["exact_dedup"] = _lang_counts(judged.map_batches(_duplicate_langs, batch_format="pyarrow"))
    # the object store keeps the blocks a live dataset references: let each copy go once used
    del filtered, docs
    drop: list[Any] = []  # near duplicates, broadcast to the tasks that filter them out
    if dedup.near is not None:
        near = dedup.near
        bands = {"num_perm": nd.num_perm, "bands": near.bands, "rows": near.rows}
        sigs = survivors.select_columns(["order", "sig"])
        # two band shuffles: the first moves only (band hash, order key) and finds the candidates,
        # the documents sharing a bucket with another; the second moves the candidates'
        # signatures only, to verify their pairs. Most documents share no bucket, so their
        # signatures (num_perm * 4 bytes per band row) never cross the network.
        candidates = _collect(
            sigs.map_batches(band_rows, batch_format="pyarrow", fn_kwargs={**bands, "signatures": False}, **remote)
            .map_batches(with_part, batch_format="pyarrow", fn_kwargs={"column": "bucket", "parts": shuffle_parts})
            .groupby("part", num_partitions=shuffle_parts)
            .map_groups(shared_orders, batch_format="pyarrow", **remote),
            ORDER_SCHEMA).column("order").to_numpy()
        candidates = np.unique(candidates)  # a document shares buckets in several partitions
        _phase("near dedup: %d candidate documents", started, len(candidates))
        edges = EDGE_SCHEMA.empty_table()
        if len(candidates):
            edges = _collect(
                sigs.map_batches(_rows_in, batch_format="pyarrow", fn_kwargs={"wanted": [ray.put(candidates)]})
                .map_batches(band_rows, batch_format="pyarrow", fn_kwargs=bands, **remote)
                .map_batches(with_part, batch_format="pyarrow", fn_kwargs={"column": "bucket", "parts": shuffle_parts})
                .groupby("part", num_partitions=shuffle_parts)
                .map_groups(near_partition, batch_format="pyarrow",
                            fn_kwargs={"num_perm": nd.num_perm, "min_equal": near.min_equal}, **remote),
                EDGE_SCHEMA)
        removed, dup_of = resolve_near(edges)
        _phase("near dedup: %d verified pairs", started, edges.num_rows)
        entry: dict[str, Any] = {"docs": len(removed), "bytes": 0, "examples": []}
        if len(removed):
            drop = [ray.put(removed)]
            shown = removed[: cfg.examples_per_rule]
            wanted = pa.array(np.unique(np.concatenate([shown, dup_of[: len(shown)]])))
            info = _collect(survivors.select_columns(["order", "id", "bytes", "head"]).map_batches(
                _rows_in, batch_format="pyarrow", fn_kwargs={"wanted": wanted}), INFO_SCHEMA)
            by_order = {row["order"]: row for row in info.to_pylist()}
            entry["bytes"] = int(survivors.select_columns(["order", "bytes"]).map_batches(
                _rows_in, batch_format="pyarrow", fn_kwargs={"wanted": drop}).sum("bytes") or 0)
            entry["examples"] = [{"id": by_order[int(k)]["id"], "duplicate_of": by_order[int(d)]["id"],
                                  "text": by_order[int(k)]["head"]} for k, d in zip(shown, dup_of, strict=False)]
            by_lang["near_dedup"] = _lang_counts(survivors.select_columns(["order", "lang"]).map_batches(
                _rows_in, batch_format="pyarrow", fn_kwargs={"wanted": drop}).select_columns(["lang"]))
        dedup.removed["near_dedup"] = entry
    kept = survivors.select_columns(["order", *COLUMNS, "lang", "bytes"]).map_batches(
        _kept, batch_format="pyarrow", fn_kwargs={"drop": drop}).materialize()
    survivors = judged = dups = None
    _phase("kept documents listed", started)
    counts = _collect(kept.groupby("chunk", num_partitions=parts).count(),
                      pa.schema([("chunk", pa.int64()), ("count()", pa.int64())]))
    offsets, total = {}, 0
    for chunk, count in sorted(zip(counts.column("chunk").to_pylist(), counts.column("count()").to_pylist(),
                                   strict=True)):
        offsets[int(chunk)] = total
        total += int(count)

    tally = _Tally(rule_names(cfg))
    empty = pa.table({"text": pa.array([], pa.string()), "lang": pa.array([], pa.string())})
    for blob in stats_rows.column("stats").to_pylist():
        result: ChunkResult = pickle.loads(blob)
        tally.add(result, empty, cfg.examples_per_rule, {})
    for rule, counts in by_lang.items():  # in dedup.removed's order, as the local engine's tally
        for lang, docs in counts.items():
            slot = tally.dedup_by_language.setdefault(lang, {})
            slot[rule] = slot.get(rule, 0) + docs
    with atomic_dir(paths.clean) as tmp:
        if total:
            numbered = kept.groupby("chunk", num_partitions=parts).map_groups(
                assign_shards, batch_format="pyarrow", fn_kwargs={"offsets": offsets, "shard_docs": cfg.shard_docs},
                **remote)
            shards = _collect(numbered.groupby("shard", num_partitions=parts).map_groups(
                write_shard, batch_format="pyarrow", fn_kwargs={"directory": str(tmp)}, **remote), SHARD_SCHEMA)
            if shards.num_rows != -(-total // cfg.shard_docs) or sum(shards.column("rows").to_pylist()) != total:
                raise DataError(f"Ray wrote {shards.num_rows} shards of {sum(shards.column('rows').to_pylist())} rows, "
                                f"expected {total} rows", path=str(paths.clean))
            tally.docs_out = total
            tally.bytes_out = int(sum(shards.column("bytes").to_pylist()))
            for langs in shards.column("languages").to_pylist():
                for lang, count in json.loads(langs).items():
                    tally.languages[lang] = tally.languages.get(lang, 0) + count
        else:  # as the local writer: an empty stream still writes one empty shard
            pq.write_table(SCHEMA.empty_table(), tmp / "part-00000.parquet", compression="zstd")
        summary = write_report(cfg, tally, dedup, tmp, paths, eval_files)
    add_throughput(summary, started, cpu_started - tally.worker_cpu, cpus)
    log.info("clean on Ray: %d -> %d documents (%.1f MB/s)", summary["docs_in"], summary["docs_out"],
             summary["mb_per_s"])
    return {**summary, "artifacts": [str(paths.clean / REPORT_NAME)]}
