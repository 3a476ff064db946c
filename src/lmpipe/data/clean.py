"""The ``clean`` stage: data/raw/ -> data/clean/ (+ clean_report.json).

One streaming pass, memory bounded by a few chunks of text plus, per kept document, a MinHash
signature and a dedup key:

* **Filter** (parallel): raw shards are cut into ~4 MB chunks and handed to ``workers`` processes.
  Each chunk is normalised, judged by the document rules (:mod:`lmpipe.data.rules`), checked for
  eval-set n-grams (:mod:`lmpipe.data.decontam`) and PII-redacted; the worker sends back the
  survivors with their exact-dedup keys and MinHash signatures, per-rule counts and examples.
* **Dedup and write** (this process, in input order, while the workers go on): exact duplicates by
  key, then near duplicates with a streaming MinHash LSH index (:mod:`lmpipe.data.dedup`); the first
  document of a cluster is kept. Survivors go straight into the parquet shards.

The report counts every rule's removals overall and per detected language (``by_language``; dedup
runs one language at a time within a chunk, which keeps the first of each cluster all the same).

Everything is built inside :func:`lmpipe.io.atomic_dir`, so an interrupted run leaves the previous
``data/clean`` (or none), never a partial one. Each kept document's ``meta`` gets ``lang``; when
cleaning changed its text, ``id`` is recomputed from the new text and the old one kept as
``meta.raw_id``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from lmpipe.config import Paths
from lmpipe.data.checks import LINE_RULES
from lmpipe.data.config import CleanConfig
from lmpipe.data.decontam import NgramIndex, index_eval_files
from lmpipe.data.dedup import (
    NearDuplicateIndex,
    SpilledNearDuplicateIndex,
    StreamDedup,
    exact_keys,
    index_bytes,
    minhash_signatures,
)
from lmpipe.data.pii import PII_KINDS, redact_pii
from lmpipe.data.rules import (
    bad_char_fraction,
    detect_languages,
    document_rule_names,
    filter_lines,
    judge,
    normalize,
    tokenize_for_rules,
)
from lmpipe.data.segment import markdown_prose
from lmpipe.data.shards import ShardWriter, doc_id, iter_shards, shard_files
from lmpipe.data.textstats import scan_flags
from lmpipe.errors import ConfigError, DataError
from lmpipe.io import atomic_dir, write_json, write_manifest
from lmpipe.progress import Progress

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # text per task: small enough to balance two workers on a few shards
EXAMPLE_CHARS = 200
CORPUS_RULES = ("decontaminate", "exact_dedup", "near_dedup")
REPORT_NAME = "clean_report.json"


def rule_names(cfg: CleanConfig) -> list[str]:
    """Every rule that can remove a document, in the order they apply (the report's keys)."""
    return [*document_rule_names(cfg), *CORPUS_RULES]


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk of raw documents."""

    table: pa.Table  # survivors: id, text, source, meta, lang
    docs: int
    bytes: int
    removed_docs: np.ndarray  # per rule code (0 = kept)
    removed_bytes: np.ndarray
    examples: dict[str, list[dict[str, Any]]]
    normalized: int
    pii_docs: int
    pii_matches: dict[str, int]
    keys: np.ndarray  # exact-dedup key per survivor
    signatures: np.ndarray | None  # MinHash signature per survivor
    cpu_seconds: float = 0.0  # CPU time the chunk took in its worker
    by_language: dict[str, np.ndarray] = field(default_factory=dict)  # language -> documents per rule code
    lines_removed: np.ndarray = field(default_factory=lambda: np.zeros(len(LINE_RULES), np.int64))


# ------------------------------------------------------------------------------ filter (workers)


def _example(doc_id_: str, text: str, **detail: Any) -> dict[str, Any]:
    return {"id": doc_id_, "text": text[:EXAMPLE_CHARS], **detail}


def _with_lang(meta: str, extra: dict[str, str], where: str, row: int) -> str:
    try:
        obj = json.loads(meta) if meta.strip() else {}
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise DataError(f"row {row}: meta is not a JSON object (re-run collect)", path=where or None)
    return json.dumps({**obj, **extra}, ensure_ascii=False, separators=(",", ":"))


def add_meta(metas: pa.Array | pa.ChunkedArray, langs: list[str], raw_ids: list[str | None], where: str,
             rows: np.ndarray) -> pa.Array:
    """``meta`` JSON objects with ``lang`` (and ``raw_id`` where given) added.

    The usual case, an object without those keys, is spliced as text in one vectorised step (JSON
    parsing per document cost more than all the rules); the rest goes through ``json``.
    Raises DataError naming the shard and row of a meta that is not a JSON object.
    """
    extra = [f'"lang":"{lang}"' + (f',"raw_id":{json.dumps(rid)}' if rid is not None else "")
             for lang, rid in zip(langs, raw_ids, strict=True)]
    frame = pl.DataFrame({"meta": pl.Series(metas, dtype=pl.String).str.strip_chars(), "extra": extra})
    meta, add = pl.col("meta"), pl.col("extra")
    simple = meta.str.starts_with("{") & meta.str.ends_with("}") & ~meta.str.contains(r'"(?:lang|raw_id)"\s*:')
    empty = meta.str.replace_all(r"\s", "") == "{}"
    body = meta.str.strip_suffix("}")
    frame = frame.select(
        pl.when(simple & empty).then(pl.concat_str([pl.lit("{"), add, pl.lit("}")]))
        .when(simple).then(pl.concat_str([body, pl.lit(","), add, pl.lit("}")]))
        .otherwise(pl.lit(None, pl.String)).alias("out"),
        simple.alias("simple"),
    )
    out = frame.get_column("out").to_list()
    for pos in np.flatnonzero(~frame.get_column("simple").to_numpy()):
        extra_obj = {"lang": langs[pos]}
        raw_id = raw_ids[pos]
        if raw_id is not None:
            extra_obj["raw_id"] = raw_id
        out[pos] = _with_lang(str(metas[int(pos)].as_py() or ""), extra_obj, where, int(rows[pos]))
    return pa.array(out, pa.string())


def process_chunk(table: pa.Table, cfg: CleanConfig, index: NgramIndex | None, where: str = "",
                  first_row: int = 0) -> ChunkResult:
    """Filter, decontaminate and redact one chunk of raw documents (``table``, document schema).

    Returns the survivors (with an extra ``lang`` column), their dedup keys and signatures, and
    per-rule counts and examples. Raises DataError for a ``meta`` that is not a JSON object.
    """
    cpu_start = time.process_time()
    names = rule_names(cfg)
    code_of = {name: idx + 1 for idx, name in enumerate(names)}
    n = table.num_rows
    raw = pl.Series("text", table.column("text").combine_chunks(), pl.String).fill_null("")
    ids = table.column("id").to_pylist()
    in_bytes = raw.str.len_bytes().to_numpy().astype(np.int64)
    flags = scan_flags(table.column("text"))
    texts = normalize(raw, cfg.normalize.form, flags) if cfg.normalize.enabled else raw
    rewritten = (texts != raw).to_numpy()
    chars = texts.str.len_chars().to_numpy().astype(np.float64)
    bad = np.zeros(n)
    if cfg.encoding.enabled:
        bad = bad_char_fraction(raw, raw.str.len_chars().to_numpy().astype(np.float64), flags)
    # cld2 is the slowest per-document step: skip documents the earlier rules already drop
    detect = np.ones(n, np.bool_)
    if cfg.encoding.enabled:
        detect &= bad <= cfg.encoding.max_bad_fraction
    if cfg.length.enabled:
        detect &= (chars >= cfg.length.min_chars) & (chars <= cfg.length.max_chars)
    batch = tokenize_for_rules(texts.to_arrow())
    # with clean.markdown the rules (language id included) read the prose; dedup reads the whole text
    judged, rule_batch = texts, batch
    if cfg.markdown.enabled:
        judged = markdown_prose(texts)
        rule_batch = tokenize_for_rules(judged.to_arrow())
    langs, confidence = detect_languages(judged, rule_batch, np.flatnonzero(detect))
    verdict = judge(cfg, chars=chars, bad_fraction=bad, langs=langs, confidence=confidence, batch=rule_batch,
                    texts=judged)
    # C4's line filters rewrite the documents they keep: dedup and decontamination read the new text
    texts, lines_removed, relined = filter_lines(cfg, verdict, texts, langs)
    tok_rows = np.arange(n)  # the chunk row of each document of `batch`
    if len(relined):  # only the documents still in need their tokens again
        tok_rows = np.flatnonzero(verdict.codes == 0)
        batch = tokenize_for_rules(texts.gather(tok_rows).to_arrow())
    codes, values = verdict.codes, verdict.values
    if cfg.decontaminate.enabled and index is not None and len(index):
        rows = np.flatnonzero(codes == 0)
        codes[rows[index.contaminated_batch(batch, np.searchsorted(tok_rows, rows))]] = code_of["decontaminate"]
    kept = np.flatnonzero(codes == 0)

    examples: dict[str, list[dict[str, Any]]] = {}
    for code in np.unique(codes[codes > 0]):
        name = names[code - 1]
        found = []
        for i in np.flatnonzero(codes == code)[: cfg.examples_per_rule]:
            if name == "language":
                detail = {"lang": langs[i], "confidence": round(float(confidence[i]), 3)}
            else:
                detail = {} if name == "decontaminate" else {"value": round(float(values[i]), 4)}
            found.append(_example(ids[i], raw[int(i)], **detail))
        examples[name] = found

    out_texts = texts.gather(kept)
    pii_matches = {kind: 0 for kind, _, _ in PII_KINDS}
    pii_docs = 0
    if cfg.pii.enabled:
        # the raw text's flags hold unless normalisation rewrote it (NFKC turns '＠' into '@')
        pii_flags = flags[kept]
        again = np.flatnonzero(rewritten[kept])
        if len(again):
            pii_flags[again] = scan_flags(out_texts.gather(again).to_arrow())
        out_texts, pii_matches, redacted = redact_pii(out_texts, cfg.pii, pii_flags)
        pii_docs = int(redacted.sum())
    # a text that cleaning changed gets the id of its new content; the old one stays in meta
    changed = np.flatnonzero((out_texts != raw.gather(kept)).to_numpy())
    out_ids = [ids[i] for i in kept]
    raw_ids: list[str | None] = [None] * len(kept)
    for pos in changed:
        raw_ids[pos] = out_ids[pos]
        out_ids[pos] = doc_id(out_texts[int(pos)])
    kept_langs = langs[kept].tolist()
    rows = pa.array(kept)
    out = pa.table({
        "id": pa.array(out_ids, pa.string()), "text": out_texts.to_arrow().cast(pa.string()),
        "source": table.column("source").take(rows),
        "meta": add_meta(table.column("meta").take(rows), kept_langs, raw_ids, where, first_row + kept),
        "lang": pa.array(kept_langs, pa.string()),
    })
    at = np.searchsorted(tok_rows, kept)
    keys = exact_keys(batch, at) if cfg.exact_dedup.enabled else np.zeros(len(kept), np.uint64)
    signatures = None
    if cfg.near_dedup.enabled:
        nd = cfg.near_dedup
        signatures = minhash_signatures(batch, at, nd.num_perm, nd.shingle_size, nd.seed)
    by_language = {str(lang): np.bincount(codes[langs == lang], minlength=len(names) + 1)
                   for lang in np.unique(langs.astype(str))}
    return ChunkResult(
        table=out, docs=n, bytes=int(in_bytes.sum()), by_language=by_language,
        removed_docs=np.bincount(codes, minlength=len(names) + 1),
        removed_bytes=np.bincount(codes, weights=in_bytes, minlength=len(names) + 1).astype(np.int64),
        examples=examples, normalized=int(rewritten.sum()), pii_docs=pii_docs, pii_matches=pii_matches,
        keys=keys, signatures=signatures, cpu_seconds=time.process_time() - cpu_start, lines_removed=lines_removed,
    )


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: CleanConfig, index_file: str | None) -> None:
    # the index travels as a file: start-up arguments of a spawned process go through a pipe
    _WORKER["cfg"] = cfg
    _WORKER["index"] = NgramIndex.load(index_file) if index_file else None


def _run_chunk(table: pa.Table, where: str, first_row: int) -> ChunkResult:
    return process_chunk(table, _WORKER["cfg"], _WORKER["index"], where, first_row)


def _chunks(raw_dir: Path) -> Iterator[tuple[pa.Table, str, int]]:
    """(table, shard path, first row) slices of about CHUNK_BYTES of text, in input order."""
    for path, table in iter_shards(raw_dir):
        if table.num_rows == 0:
            continue
        sizes = pc.binary_length(pc.cast(table.column("text"), pa.large_binary())).to_numpy(zero_copy_only=False)
        ends = np.cumsum(np.nan_to_num(sizes.astype(np.float64)))
        cuts = np.searchsorted(ends, np.arange(CHUNK_BYTES, ends[-1], CHUNK_BYTES), side="right")
        bounds = np.unique(np.r_[0, cuts, table.num_rows])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            yield table.slice(lo, hi - lo), str(path), int(lo)


def _text_bytes(raw_dir: Path) -> int:
    """Uncompressed size of the text column from parquet metadata (no data read)."""
    total = 0
    for path in shard_files(raw_dir):
        meta = pq.ParquetFile(path).metadata
        text = meta.schema.names.index("text")
        total += sum(meta.row_group(rg).column(text).total_uncompressed_size for rg in range(meta.num_row_groups))
    return total


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("docs"), TimeElapsedColumn(), transient=True, unit="docs")


def _process_context() -> multiprocessing.context.BaseContext:
    """Forkserver where there is one: workers fork from a server that imported this module (and
    loaded the compiled kernels) once, instead of paying seconds of start-up each. Never plain fork:
    polars and numba keep thread pools that a fork would copy mid-use."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _results(raw_dir: Path, cfg: CleanConfig, index: NgramIndex | None, workers: int) -> Iterator[ChunkResult]:
    """Process every chunk, in ``workers`` processes; yield the results in input order."""
    chunks = _chunks(raw_dir)
    if workers == 1:
        for table, where, row in chunks:
            yield process_chunk(table, cfg, index, where, row)
        return
    context = _process_context()
    with contextlib.ExitStack() as stack:
        index_file = None
        if index is not None:
            index_file = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmpipe-clean-")), "eval.npy")
            index.save(index_file)
        pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                       initargs=(cfg, index_file)))
        pending: deque[Future[ChunkResult]] = deque()
        try:
            for table, where, row in chunks:
                # a slice pickles with its whole parent buffers: send a compact copy of the rows
                compact = table.take(pa.array(np.arange(table.num_rows)))
                pending.append(pool.submit(_run_chunk, compact, where, row))
                if len(pending) > 2 * workers:  # bounded read-ahead keeps memory flat
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# --------------------------------------------------------------------------------------- report


@dataclass
class _Tally:
    """Counts of the whole run, accumulated chunk by chunk."""

    names: list[str]
    worker_cpu: float = 0.0
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    normalized: int = 0
    pii_docs: int = 0
    pii: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind, _, _ in PII_KINDS})
    removed_docs: np.ndarray | None = None
    removed_bytes: np.ndarray | None = None
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    # language -> documents per rule code (0: passed the document rules), and removed by dedup
    by_language: dict[str, np.ndarray] = field(default_factory=dict)
    dedup_by_language: dict[str, dict[str, int]] = field(default_factory=dict)
    lines_removed: np.ndarray = field(default_factory=lambda: np.zeros(len(LINE_RULES), np.int64))

    def add(self, result: ChunkResult, kept: pa.Table, limit: int, dedup_removed: dict[str, dict[str, int]]) -> None:
        self.worker_cpu += result.cpu_seconds
        for lang, counts in result.by_language.items():
            prior = self.by_language.get(lang)
            self.by_language[lang] = counts if prior is None else prior + counts
        for lang, removed in dedup_removed.items():
            slot = self.dedup_by_language.setdefault(lang, {})
            for name, docs in removed.items():
                slot[name] = slot.get(name, 0) + docs
        self.docs_in += result.docs
        self.bytes_in += result.bytes
        self.normalized += result.normalized
        self.lines_removed = self.lines_removed + result.lines_removed
        self.pii_docs += result.pii_docs
        for kind, count in result.pii_matches.items():
            self.pii[kind] += count
        self.removed_docs = result.removed_docs if self.removed_docs is None else self.removed_docs + result.removed_docs
        self.removed_bytes = result.removed_bytes if self.removed_bytes is None else self.removed_bytes + result.removed_bytes
        for name, found in result.examples.items():
            have = self.examples.setdefault(name, [])
            have.extend(found[: max(0, limit - len(have))])
        self.docs_out += kept.num_rows
        self.bytes_out += int(pc.sum(pc.binary_length(pc.cast(kept.column("text"), pa.large_binary()))).as_py() or 0)
        langs, counts = np.unique(kept.column("lang").to_numpy(zero_copy_only=False).astype(str), return_counts=True)
        for lang, count in zip(langs.tolist(), counts.tolist(), strict=True):
            self.languages[lang] = self.languages.get(lang, 0) + count


def _report(cfg: CleanConfig, tally: _Tally, dedup: StreamDedup) -> dict[str, Any]:
    removed: dict[str, dict[str, Any]] = {}
    for idx, name in enumerate(tally.names, start=1):
        docs = int(tally.removed_docs[idx]) if tally.removed_docs is not None else 0
        size = int(tally.removed_bytes[idx]) if tally.removed_bytes is not None else 0
        removed[name] = dedup.removed[name] if name in dedup.removed else \
            {"docs": docs, "bytes": size, "examples": tally.examples.get(name, [])}
    groups: dict[str, dict[str, Any]] = {}
    for name, entry in removed.items():
        group = name.split(".")[0]
        slot = groups.setdefault(group, {"enabled": bool(getattr(cfg, group).enabled), "docs": 0, "bytes": 0})
        slot["docs"] += entry["docs"]
        slot["bytes"] += entry["bytes"]
    lsh: dict[str, Any] = {"enabled": cfg.near_dedup.enabled}
    if dedup.near is not None:
        lsh.update(bands=dedup.near.bands, rows=dedup.near.rows)
    return {
        "input": {"docs": tally.docs_in, "bytes": tally.bytes_in},
        "output": {"docs": tally.docs_out, "bytes": tally.bytes_out},
        "removed": removed,
        "groups": groups,
        "normalize": {"enabled": cfg.normalize.enabled, "form": cfg.normalize.form, "docs_modified": tally.normalized},
        "pii": {"enabled": cfg.pii.enabled, "docs_modified": tally.pii_docs, "matches": tally.pii},
        "lines": {"enabled": cfg.lines.enabled,
                  "lines_removed": {c.name: int(k) for c, k in zip(LINE_RULES, tally.lines_removed, strict=True)}},
        "lsh": lsh,
        "languages": dict(sorted(tally.languages.items())),
        "by_language": _by_language(tally),
    }


def _by_language(tally: _Tally) -> dict[str, dict[str, Any]]:
    """Per detected language ("und": not detected, as for documents an earlier rule dropped):
    documents in and out, and the documents each rule removed (rules that removed none left out)."""
    out: dict[str, dict[str, Any]] = {}
    for lang in sorted(tally.by_language):
        counts = tally.by_language[lang]
        removed = {name: int(counts[idx]) for idx, name in enumerate(tally.names, start=1) if counts[idx]}
        removed.update({name: docs for name, docs in tally.dedup_by_language.get(lang, {}).items() if docs})
        removed = {name: removed[name] for name in tally.names if name in removed}
        out[lang] = {"input": int(counts.sum()), "output": tally.languages.get(lang, 0), "removed": removed}
    return out


def dedup_by_language(dedup: StreamDedup, result: ChunkResult) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """``dedup.filter`` of a chunk's survivors, one language at a time, so the report can say how
    many documents of each language each dedup rule removed. A duplicate has its original's
    language, so keep-first within each language is keep-first overall; rows keep their order."""
    table = result.table
    langs = table.column("lang").to_numpy(zero_copy_only=False).astype(str)
    order = list(dict.fromkeys(langs.tolist()))
    removed: dict[str, dict[str, int]] = {}
    parts = []
    for lang in order:
        rows = np.flatnonzero(langs == lang) if len(order) > 1 else np.arange(len(langs))
        part = table if len(order) == 1 else table.take(pa.array(rows)).append_column("_row", pa.array(rows))
        before = {name: entry["docs"] for name, entry in dedup.removed.items()}
        signatures = None if result.signatures is None else result.signatures[rows]
        parts.append(dedup.filter(part, result.keys[rows], signatures))
        removed[lang] = {name: entry["docs"] - before[name] for name, entry in dedup.removed.items()}
    if len(parts) == 1:
        return parts[0], removed
    if not parts:
        return table, removed
    merged = pa.concat_tables(parts)
    merged = merged.take(pa.array(np.argsort(merged.column("_row").to_numpy(), kind="stable")))
    return merged.drop_columns(["_row"]), removed


# ---------------------------------------------------------------------------------------- the stage


def near_index(cfg: CleanConfig, docs: int, spill_dir: Any) -> tuple[Any, Path | None]:
    """The near-dedup index for ``docs`` raw documents: in memory while its estimated size fits
    ``near_dedup.memory_mb``, else spilled to ``spill_dir()`` (then also the directory where the
    survivors wait for the verdicts)."""
    nd = cfg.near_dedup
    if not nd.enabled:
        return None, None
    memory = NearDuplicateIndex(nd.threshold, nd.num_perm)
    need = docs * index_bytes(nd.num_perm, memory.bands)
    budget = nd.memory_mb << 20
    if need <= budget:
        return memory, None
    directory = spill_dir()
    # a partition's band rows (28 bytes each, a few copies while sorted) in a quarter of the budget
    partitions = -(-docs * memory.bands * 28 * 4 // budget)
    log.info("clean: near-dedup index for %d documents (~%d MB) exceeds near_dedup.memory_mb=%d: spilling to %d "
             "partitions in %s", docs, need >> 20, nd.memory_mb, partitions, directory)
    return SpilledNearDuplicateIndex(nd.threshold, nd.num_perm, directory / "bands", partitions), directory


def drop_spilled(near: SpilledNearDuplicateIndex, staged: list[Path], writer: ShardWriter, tally: _Tally,
                 dedup: StreamDedup) -> None:
    """Second pass of a spilled near dedup: resolve the verdicts, write the staged survivors that
    are kept to ``writer`` and move the removed ones from the tally's output to near_dedup's counts,
    as the in-memory index would have counted them. The examples' originals (of both dedup rules)
    are staged rows: their ids are read here."""
    removed, dup_of = near.resolve()
    limit = dedup.examples_per_rule
    shown = {int(k): int(d) for k, d in zip(removed[:limit], dup_of[:limit], strict=True)}
    wanted = np.array(sorted(set(shown) | set(shown.values()) | {pos for _, pos in dedup.unnamed}), np.int64)
    info: dict[int, tuple[str, str]] = {}
    entry: dict[str, Any] = {"docs": len(removed), "bytes": 0, "examples": []}
    for path in staged:
        table = pq.read_table(path)
        pos = table.column("_pos").to_numpy()
        for i in np.flatnonzero(np.isin(pos, wanted)).tolist():
            info[int(pos[i])] = (table.column("id")[i].as_py(), table.column("text")[i].as_py())
        drop = np.isin(pos, removed)
        gone = table.filter(pa.array(drop))
        size = int(pc.sum(pc.binary_length(pc.cast(gone.column("text"), pa.large_binary()))).as_py() or 0)
        entry["bytes"] += size
        tally.docs_out -= gone.num_rows
        tally.bytes_out -= size
        langs, counts = np.unique(gone.column("lang").to_numpy(zero_copy_only=False).astype(str), return_counts=True)
        for lang, count in zip(langs.tolist(), counts.tolist(), strict=True):
            tally.languages[lang] -= count
            if not tally.languages[lang]:
                del tally.languages[lang]
            slot = tally.dedup_by_language.setdefault(lang, {})
            slot["near_dedup"] = slot.get("near_dedup", 0) + count
        writer.write(table.filter(pa.array(~drop)).select(["id", "text", "source", "meta"]))
        path.unlink()
    entry["examples"] = [{"id": info[k][0], "duplicate_of": info[d][0], "text": info[k][1][:dedup.example_chars]}
                         for k, d in shown.items()]
    dedup.removed["near_dedup"] = entry
    dedup.name({pos: doc[0] for pos, doc in info.items()})


def _check(cfg: CleanConfig) -> None:
    for key in ("top_ngram_char_fraction", "dup_ngram_char_fraction"):
        bad = [n for n in getattr(cfg.repetition, key) if n < 1]
        if bad:
            raise ConfigError(f"clean.repetition.{key}: n-gram sizes must be >= 1 (got {bad[0]})")


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """Flat numeric summary of a clean report: docs/bytes in and out, ``removed.<rule>`` per rule
    (these add up to docs_in - docs_out), normalisation and PII counts."""
    summary: dict[str, Any] = {
        "docs_in": report["input"]["docs"], "bytes_in": report["input"]["bytes"],
        "docs_out": report["output"]["docs"], "bytes_out": report["output"]["bytes"],
        "normalize.docs_modified": report["normalize"]["docs_modified"],
        "pii.docs_modified": report["pii"]["docs_modified"],
    }
    summary.update({f"pii.{kind}": count for kind, count in report["pii"]["matches"].items()})
    summary.update({f"removed.{name}": entry["docs"] for name, entry in report["removed"].items()})
    return summary


def run_inputs(cfg: CleanConfig, paths: Paths) -> tuple[list[Path], NgramIndex | None, list[Path]]:
    """The raw shards of a clean run, and the index of the eval sets to decontaminate against (with
    their files). Raises DataError when there are no shards."""
    files = shard_files(paths.raw)
    if not files:
        raise DataError("no part-*.parquet shards (run `lmpipe collect` first)", path=str(paths.raw))
    if not (cfg.decontaminate.enabled and cfg.decontaminate.eval_files):
        return files, None, []
    d = cfg.decontaminate
    index, eval_files = index_eval_files(d.eval_files, paths.root, d.eval_text_field, d.ngram)
    return files, index, eval_files


def write_report(cfg: CleanConfig, tally: _Tally, dedup: StreamDedup, tmp: Path, paths: Paths,
                 eval_files: list[Path]) -> dict[str, Any]:
    """Write a clean run's report and manifest into its staging dir ``tmp``; its summary (both engines)."""
    report = _report(cfg, tally, dedup)
    write_json(tmp / REPORT_NAME, report)
    inputs: dict[str, Path] = {"raw": paths.raw}
    for path in eval_files:
        inputs[f"eval:{path.relative_to(paths.root) if path.is_relative_to(paths.root) else path}"] = path
    summary = summary_of(report)
    write_manifest(tmp, stage="clean", config=cfg, inputs=inputs,
                   counts={k: v for k, v in summary.items() if k.startswith(("docs_", "bytes_"))})
    return summary


def add_throughput(summary: dict[str, Any], started: float, cpu_started: float, workers: int) -> None:
    """Add wall and CPU seconds and MB/s to ``summary``; CPU time counts from ``cpu_started`` (lower it
    by the CPU seconds spent in other processes to count them)."""
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    summary.update(seconds=round(seconds, 3), cpu_seconds=round(cpu, 3), workers=workers,
                   mb_per_s=round(summary["bytes_in"] / 1e6 / max(seconds, 1e-9), 3),
                   mb_per_cpu_s=round(summary["bytes_in"] / 1e6 / max(cpu, 1e-9), 3))


def run(cfg: CleanConfig, paths: Paths) -> dict[str, Any]:
    """Clean ``paths.raw`` into ``paths.clean`` (parquet shards, clean_report.json, manifest.json).

    Reads the raw shards and ``decontaminate.eval_files``; writes ``paths.clean`` atomically.
    Returns the flat summary (see :func:`summary_of`) plus ``seconds``, ``mb_per_s`` and
    ``artifacts`` (the report). Raises ConfigError/DataError for bad settings or input.
    """
    from lmpipe.engine import current

    if current().kind == "ray":  # the same rules and output on Ray Data
        from lmpipe.data import ray_clean

        return ray_clean.run(cfg, paths)
    _check(cfg)
    started, cpu_started = time.perf_counter(), time.process_time()
    files, index, eval_files = run_inputs(cfg, paths)
    # a process per core, but never more than there are chunks (starting one costs a second or two)
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, -(-_text_bytes(paths.raw) // CHUNK_BYTES)))
    tally = _Tally(rule_names(cfg))
    total_docs = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    with atomic_dir(paths.clean) as tmp, contextlib.ExitStack() as stack:
        near, staged = near_index(cfg, total_docs, lambda: Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=".clean-spill-", dir=paths.clean.parent))))
        dedup = StreamDedup(cfg.exact_dedup.enabled, near, cfg.examples_per_rule, EXAMPLE_CHARS, positions=bool(staged))
        writer = ShardWriter(tmp, cfg.shard_docs)
        waiting: list[Path] = []  # spilled: the survivors of exact dedup, until the near verdicts
        with _progress() as progress:
            task = progress.add_task("clean", total=total_docs)
            for result in _results(paths.raw, cfg, index, workers):
                kept, dedup_removed = dedup_by_language(dedup, result)
                if staged:
                    waiting.append(staged / f"staged-{len(waiting):06d}.parquet")
                    pq.write_table(kept.select(["id", "text", "source", "meta", "lang", "_pos"]), waiting[-1])
                else:
                    writer.write(kept.select(["id", "text", "source", "meta"]))
                tally.add(result, kept, cfg.examples_per_rule, dedup_removed)
                progress.advance(task, result.docs)
        if staged:
            assert isinstance(near, SpilledNearDuplicateIndex)
            drop_spilled(near, waiting, writer, tally, dedup)
        writer.close()
        summary = write_report(cfg, tally, dedup, tmp, paths, eval_files)
    # CPU time of this process plus the workers' chunks: throughput per core even on a busy machine
    add_throughput(summary, started, cpu_started + (-tally.worker_cpu if workers > 1 else 0.0), workers)
    log.info("clean: %d -> %d documents (%.1f MB/s)", summary["docs_in"], summary["docs_out"], summary["mb_per_s"])
    return {**summary, "artifacts": [str(paths.clean / REPORT_NAME)]}
