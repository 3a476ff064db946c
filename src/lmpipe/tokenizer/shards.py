"""The ``tokenize`` stage: token files for each split, and the reader every consumer uses.

Reads ``data/split/{split}/part-*.parquet`` and ``artifacts/tokenizer/``; writes ``data/tokens/``
as a whole (:func:`lmpipe.io.atomic_dir`, so an interrupted run leaves no output):

- ``{split}.bin`` (``layout: single``): the token ids of every document in order, each followed
  by EOS, as one flat little-endian array (uint16 when every id fits, else uint32), nanoGPT-style,
  so training reads any window with a memory map and no index;
- or ``{split}-NNNNN.bin`` (``layout: sharded``): the same ids cut at the split's parquet shards,
  file NNNNN holding the documents of ``part-NNNNN.parquet``, so each shard is written on its own
  (one Ray task each on ``engine.kind: ray``). Appended in order they are the single layout's file;
- ``meta.json``: dtype, per split the token, document and text byte counts (bits per byte =
  loss per token / ln 2 * tokens / bytes) and, sharded, the index of its shards (file, tokens,
  documents, bytes, sha256), the tokenizer fingerprint, vocab size and the special ids (eos, bos,
  pad, unk and the chat markers);
- ``manifest.json``.

Both engines and both layouts give the same ids: changing ``engine.kind`` changes no output byte.
Locally, encoding runs in worker processes (forked from a clean fork server, so no lock held by a
thread of this process is inherited), each loading the model once and encoding batches of about
``batch_bytes`` of text. Results come back in submission order and are appended to the file at
once, with at most two batches per worker in flight: memory stays bounded whatever the corpus
size. On Ray each task reads one parquet shard and writes its token file by path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from lmpipe.config import Paths
from lmpipe.data.shards import iter_shards, read_shard, shard_files
from lmpipe.engine import MAX_RETRIES, collect, connect, current, user_errors
from lmpipe.errors import ConfigError, DataError, FingerprintMismatch
from lmpipe.io import atomic_dir, sha256_bytes, write_json, write_manifest
from lmpipe.progress import Progress
from lmpipe.tokenizer.config import TokenizeConfig
from lmpipe.tokenizer.train import cpu_count, document_total, load_tokenizer, read_tokenizer_info

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = "flat array of token ids, little-endian, EOS after every document"
REPRO_HINT = "re-run `dvc repro tokenize` (or `lmpipe tokenize`) to re-tokenize with the current tokenizer"


def token_dtype(vocab_size: int, choice: str = "auto") -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits in it, else uint32 (little-endian)."""
    if choice == "auto":
        choice = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if choice == "uint16" and vocab_size > 1 << 16:
        raise ConfigError(f"tokenize.dtype: uint16 cannot hold the ids of a {vocab_size}-piece vocabulary; use auto or uint32")
    return np.dtype("<u2" if choice == "uint16" else "<u4")


# ------------------------------------------------------------------------------------ encoding


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str], eos_id: int, dtype: np.dtype,
                     num_threads: int = 1) -> np.ndarray:
    """Token ids of ``texts`` in order, EOS after each, as one array of ``dtype``."""
    if not texts:
        return np.zeros(0, dtype)
    arrays = sp.encode(texts, num_threads=num_threads, return_type="numpy")
    eos = np.array([eos_id], dtype=np.int32)
    return np.concatenate([part for ids in arrays for part in (ids, eos)]).astype(dtype, copy=False)


_worker_state: tuple[spm.SentencePieceProcessor, int, np.dtype] | None = None
_worker_model: tuple[str, str] | None = None  # (model file, fingerprint) of the loaded state


def _init_worker(model_file: str, fingerprint: str, eos_id: int, dtype: str) -> None:
    """Load the model once per worker; refuse a model file changed since the stage checked it."""
    global _worker_state, _worker_model
    model_bytes = Path(model_file).read_bytes()
    if sha256_bytes(model_bytes) != fingerprint:
        raise FingerprintMismatch(f"{model_file} changed while tokenizing; {REPRO_HINT}")
    _worker_state = (spm.SentencePieceProcessor(model_proto=model_bytes), eos_id, np.dtype(dtype))
    _worker_model = (model_file, fingerprint)


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_state is not None, "worker not initialised"
    sp, eos_id, dtype = _worker_state
    return encode_documents(sp, texts, eos_id, dtype)


def worker_context() -> multiprocessing.context.BaseContext:
    """Fork server with this module preloaded (a worker starts in milliseconds and inherits no
    thread of this process), or spawn where there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _InlineExecutor(Executor):
    """Runs each call at once in this process (``workers: 1``); same interface as the pool."""

    def __init__(self, *initargs: Any) -> None:
        _init_worker(*initargs)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@dataclass
class SplitStats:
    """Counts of one token file: a split's ``{split}.bin`` or one of its shards."""

    file: str
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0

    def add(self, other: SplitStats) -> None:
        self.tokens += other.tokens
        self.documents += other.documents
        self.bytes += other.bytes
        self.empty_documents += other.empty_documents


@dataclass
class TextBatch:
    """Documents of one parquet shard (number ``shard`` of the split) sent to a worker at once."""

    shard: int
    texts: list[str]  # the non-empty documents
    read: int  # documents read, empty ones included
    bytes: int
    empty: int


def table_batches(shard: int, table: pa.Table, batch_bytes: int) -> Iterator[TextBatch]:
    """Batches of about ``batch_bytes`` of ``table``'s text in order; one empty batch for an empty table.

    Empty documents are skipped (they would only add an EOS) and counted.
    """
    if table.num_rows == 0:
        yield TextBatch(shard, [], 0, 0, 0)
        return
    column = table.column("text")
    sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
    texts = column.to_pylist()
    start, size = 0, 0
    for idx, text_size in enumerate(sizes.tolist()):
        size += text_size
        if size >= batch_bytes or idx == len(texts) - 1:
            batch = [t for t in texts[start:idx + 1] if t]
            yield TextBatch(shard, batch, idx + 1 - start, size, idx + 1 - start - len(batch))
            start, size = idx + 1, 0


def text_batches(split_dir: Path, batch_bytes: int) -> Iterator[TextBatch]:
    """The batches of every parquet shard of ``split_dir``, shard after shard."""
    for shard, (_, table) in enumerate(iter_shards(split_dir)):
        yield from table_batches(shard, table, batch_bytes)


def shard_file_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.bin"


class TokenFile:
    """One token file being written: the ids of batches appended in order, counted, and with
    ``digest`` their sha256 (the sharded layout's index records it)."""

    def __init__(self, directory: Path, name: str, digest: bool) -> None:
        self.stats = SplitStats(file=name)
        self._out = open(directory / name, "wb")  # noqa: SIM115 - closed by close()
        self._sha = hashlib.sha256() if digest else None

    def write(self, batch: TextBatch, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self._out.write(data)
        if self._sha is not None:
            self._sha.update(data)
        self.stats.add(SplitStats(self.stats.file, int(tokens.size), len(batch.texts), batch.bytes, batch.empty))

    def close(self) -> dict[str, Any]:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        entry = asdict(self.stats)
        if self._sha is not None:
            entry["sha256"] = self._sha.hexdigest()
        return entry


class SplitWriter:
    """The token files of one split in ``directory``: ``{split}.bin`` (single layout), or one
    ``{split}-NNNNN.bin`` per parquet shard (sharded). ``close()`` gives its meta.json entry."""

    def __init__(self, directory: Path, split: str, layout: str) -> None:
        self.directory, self.split, self.sharded = directory, split, layout == "sharded"
        self.total = SplitStats(file=f"{split}.bin")
        self.shards: list[dict[str, Any]] = []
        self._file = None if self.sharded else TokenFile(directory, self.total.file, digest=False)

    def write(self, batch: TextBatch, tokens: np.ndarray) -> None:
        if self.sharded:
            while len(self.shards) + (self._file is not None) <= batch.shard:  # the batch opens a new shard
                self._close_shard()
                self._file = TokenFile(self.directory, shard_file_name(self.split, len(self.shards)), digest=True)
        assert self._file is not None
        self._file.write(batch, tokens)
        self.total.add(SplitStats(self.total.file, int(tokens.size), len(batch.texts), batch.bytes, batch.empty))

    def _close_shard(self) -> None:
        if self._file is not None:
            self.shards.append(self._file.close())
            self._file = None

    def close(self) -> dict[str, Any]:
        if not self.sharded:
            assert self._file is not None
            return self._file.close()
        self._close_shard()
        return split_entry(self.shards)


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """meta.json's entry of a sharded split: its totals and the index of its shards, in order."""
    keys = ("tokens", "documents", "bytes", "empty_documents")
    return {**{key: sum(int(s[key]) for s in shards) for key in keys}, "shards": shards}


def tokenize_split(split_dir: Path, out: SplitWriter, executor: Executor, window: int, batch_bytes: int,
                   progress: Progress) -> None:
    """Encode one split into ``out`` in document order, ``window`` batches in flight at most."""
    task = progress.add_task(f"tokenize {split_dir.name}", total=document_total(split_dir))
    pending: deque[tuple[Future[np.ndarray], TextBatch]] = deque()

    def write_oldest() -> None:
        future, batch = pending.popleft()
        out.write(batch, future.result())
        progress.advance(task, batch.read)

    for batch in text_batches(split_dir, batch_bytes):
        pending.append((executor.submit(_encode_in_worker, batch.texts), batch))
        if len(pending) >= window:
            write_oldest()
    while pending:
        write_oldest()


# ------------------------------------------------------------------------------------- on Ray


def encode_shards(batch: pa.Table, initargs: tuple[str, str, int, str], batch_bytes: int) -> pa.Table:
    """Ray task: encode each parquet shard named in ``batch`` (split, shard, path, out) into its
    token file ``out``; one row per shard with its meta.json entry (JSON)."""
    model_file, fingerprint = initargs[0], initargs[1]
    if _worker_state is None or _worker_model != (model_file, fingerprint):
        _init_worker(*initargs)
    rows = []
    for item in batch.to_pylist():
        out = Path(item["out"])
        token_file = TokenFile(out.parent, out.name, digest=True)
        for text_batch in table_batches(item["shard"], read_shard(item["path"]), batch_bytes):
            token_file.write(text_batch, _encode_in_worker(text_batch.texts))
        rows.append({"split": item["split"], "shard": item["shard"], "entry": json.dumps(token_file.close())})
    return pa.Table.from_pylist(rows, schema=RAY_SCHEMA)


RAY_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.int64()), ("entry", pa.string())])


def tokenize_on_ray(cfg: TokenizeConfig, paths: Paths, tmp: Path, initargs: tuple[str, str, int, str]) \
        -> dict[str, dict[str, Any]]:
    """Encode ``cfg.splits`` on the Ray cluster of ``engine``, one task per parquet shard (one
    block each), into ``tmp``: the files and meta.json entries of the local engine, byte for byte.

    Each task writes its shard's ``{split}-NNNNN.bin`` by path (on a cluster ``tmp`` must be on a
    filesystem every node mounts); the driver orders the entries by shard number, so the order
    tasks finish in never matters. The single layout appends the shards into ``{split}.bin``.
    """
    ray = connect(current())
    scratch = tmp if cfg.layout == "sharded" else tmp / ".shards"
    scratch.mkdir(exist_ok=True)
    items = [{"split": split, "shard": shard, "path": str(path), "out": str(scratch / shard_file_name(split, shard))}
             for split in cfg.splits for shard, path in enumerate(shard_files(paths.split / split))]
    log.info("tokenize on Ray: %d parquet shards, %s CPUs", len(items), ray.cluster_resources().get("CPU"))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # a task's DataError reaches the driver as itself
    rows = RAY_SCHEMA.empty_table()
    if items:
        with user_errors("tokenize"):
            rows = collect(ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                encode_shards, batch_size=1, batch_format="pyarrow", max_retries=MAX_RETRIES,
                fn_kwargs={"initargs": initargs, "batch_bytes": cfg.batch_bytes}), RAY_SCHEMA)
    done: dict[str, dict[int, dict[str, Any]]] = {split: {} for split in cfg.splits}
    for row in rows.to_pylist():
        done[row["split"]][row["shard"]] = json.loads(row["entry"])
    entries: dict[str, dict[str, Any]] = {}
    for split in cfg.splits:
        expected = sum(1 for item in items if item["split"] == split)
        if sorted(done[split]) != list(range(expected)):
            raise DataError(f"Ray returned shards {sorted(done[split])} of split '{split}', expected {expected}",
                            path=str(paths.split / split))
        shards = [done[split][shard] for shard in range(expected)]
        entries[split] = split_entry(shards) if cfg.layout == "sharded" else _append(tmp, split, scratch, shards)
    if scratch != tmp:
        shutil.rmtree(scratch)
    return entries


def _append(tmp: Path, split: str, scratch: Path, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The single layout from shards: their files appended, in order, into ``{split}.bin``."""
    name = f"{split}.bin"
    with open(tmp / name, "wb") as out:
        for shard in shards:
            with open(scratch / shard["file"], "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
        out.flush()
        os.fsync(out.fileno())
    totals = split_entry(shards)
    del totals["shards"]
    return {"file": name, **totals}


# ----------------------------------------------------------------------------------- the stage


def run(cfg: TokenizeConfig, paths: Paths) -> dict[str, Any]:
    """Tokenize ``cfg.splits`` of ``paths.split`` with ``paths.tokenizer`` into ``paths.tokens``,
    on this machine's processes or, with ``engine.kind: ray``, on Ray Data (the same output).

    Raises DataError for a missing split, an unreadable shard or a tokenizer whose model file does
    not match its fingerprint; on any error ``paths.tokens`` is left as it was.
    """
    _, info = load_tokenizer(paths.tokenizer)  # checks the model file against its fingerprint
    dtype = token_dtype(info.vocab_size, cfg.dtype)
    for split in cfg.splits:
        if not (paths.split / split).is_dir():
            raise DataError(f"split '{split}' not found (run the split stage, or remove it from tokenize.splits)",
                            path=str(paths.split / split))
    initargs = (str(info.model_file), info.fingerprint, info.eos_id, dtype.str)
    started = time.perf_counter()
    with atomic_dir(paths.tokens) as tmp:
        if current().kind == "ray":
            results = tokenize_on_ray(cfg, paths, tmp, initargs)
        else:
            results = tokenize_locally(cfg, paths, tmp, initargs)
        for split, stats in results.items():
            log.info("%s: %d documents, %d tokens (%.2f bytes/token)", split, stats["documents"], stats["tokens"],
                     stats["bytes"] / max(stats["tokens"] - stats["documents"], 1))
        meta = {
            "format": FORMAT,
            "layout": cfg.layout,
            "dtype": dtype.name,
            "tokenizer_fingerprint": info.fingerprint,
            "vocab_size": info.vocab_size,
            "eos_id": info.eos_id,
            "bos_id": info.bos_id,
            "pad_id": info.pad_id,
            "unk_id": info.unk_id,
            "special_tokens": info.special_tokens,
            "splits": results,
        }
        write_json(tmp / META_FILE, meta)
        counts = {f"{name}_tokens": s["tokens"] for name, s in results.items()}
        write_manifest(tmp, stage="tokenize", config=cfg, inputs={"split": paths.split, "tokenizer": paths.tokenizer},
                       counts=counts, extra={"tokenizer_fingerprint": info.fingerprint})
    seconds = time.perf_counter() - started
    total_bytes = sum(s["bytes"] for s in results.values())
    summary: dict[str, Any] = {"seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds if seconds else 0.0}
    for name, stats in results.items():
        summary.update({f"{name}_tokens": stats["tokens"], f"{name}_documents": stats["documents"],
                        f"{name}_bytes": stats["bytes"]})
    summary["artifacts"] = [str(paths.tokens / META_FILE)]
    return summary


def tokenize_locally(cfg: TokenizeConfig, paths: Paths, tmp: Path, initargs: tuple[str, str, int, str]) \
        -> dict[str, dict[str, Any]]:
    """Encode ``cfg.splits`` with this machine's worker processes into ``tmp``; meta.json's entries."""
    workers = cfg.workers or cpu_count()
    executor: Executor
    if workers == 1:
        executor = _InlineExecutor(*initargs)
    else:
        executor = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_init_worker, initargs=initargs)
    results: dict[str, dict[str, Any]] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, transient=True, console=Console(stderr=True), unit="docs") as progress:
            for split in cfg.splits:
                out = SplitWriter(tmp, split, cfg.layout)
                tokenize_split(paths.split / split, out, executor, 2 * workers, cfg.batch_bytes, progress)
                results[split] = out.close()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return results


# -------------------------------------------------------------------------------------- reading


DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_token_meta(tokens_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``meta.json``; raise DataError naming the file and key when it is missing or malformed."""
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"no {META_FILE}: token shards are missing (run `lmpipe tokenize` or `dvc repro tokenize`)",
                        path=str(tokens_dir))
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err}", path=str(path)) from None
    for key in ("dtype", "vocab_size", "eos_id", "tokenizer_fingerprint", "splits"):
        if key not in meta:
            raise DataError(f"missing key '{key}' (re-run `lmpipe tokenize`)", path=str(path))
    if meta["dtype"] not in DTYPES:
        raise DataError(f"dtype: expected uint16 or uint32, got {meta['dtype']!r}", path=str(path))
    return meta


class ShardedTokens:
    """The token ids of several files as one read-only 1-D array: a memory map per shard and the
    global offset of each, never concatenated in memory.

    Indexing reads only the positions asked for: an int, a slice (a new array) or an integer array
    of any shape (fancy indexing, the training reader's windows; a window may span two shards).
    ``np.asarray`` of it concatenates the shards: meant for small splits only.
    """

    ndim = 1

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [part for part in parts if part.shape[0]]
        self.dtype = parts[0].dtype
        self.offsets = np.cumsum([0, *(part.shape[0] for part in self.parts)], dtype=np.int64)
        self.shape = (int(self.offsets[-1]),)

    @property
    def size(self) -> int:
        return self.shape[0]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Memory maps are pickled as their paths (a DataLoader worker maps them again), not their ids."""
        files = [getattr(part, "filename", None) for part in self.parts]
        if None in files:
            return ShardedTokens, ([np.asarray(part) for part in self.parts],)
        return _open_parts, ([str(name) for name in files], self.dtype.str)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> Any:
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            pieces = []
            for shard in range(max(first, 0), len(self.parts)):
                offset = int(self.offsets[shard])
                if offset >= stop:
                    break
                pieces.append(np.asarray(self.parts[shard][max(start - offset, 0):stop - offset]))
            return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)
        if isinstance(key, (int, np.integer)):
            index = int(key) + n if key < 0 else int(key)
            if not 0 <= index < n:
                raise IndexError(f"index {key} is out of bounds for {n} tokens")
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return self.parts[shard][index - self.offsets[shard]]
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"token shards are indexed by int, slice or integer array, not {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of bounds for {n} tokens")
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, self.dtype)
        for shard in np.unique(shard_of).tolist():
            sel = shard_of == shard
            out[sel] = self.parts[shard][flat[sel] - self.offsets[shard]]
        return out.reshape(index.shape)


def _open_parts(files: list[str], dtype: str) -> ShardedTokens:
    return ShardedTokens([np.memmap(path, dtype=np.dtype(dtype), mode="r") for path in files])


class TokenShardReader:
    """The token files of ``data/tokens/``, either layout, refused unless made with the expected tokenizer.

    ``TokenShardReader(paths.tokens, expected_fingerprint)`` reads ``meta.json`` and raises
    FingerprintMismatch if the shards' tokenizer fingerprint differs (None trusts meta.json: synthetic
    shards), DataError if meta.json is missing or malformed. ``reader.tokens("train")`` is the
    split's ids: a read-only ``np.memmap`` of ``{split}.bin`` (single layout, or a sharded split of
    one shard), else a :class:`ShardedTokens` over its shards.
    """

    def __init__(self, directory: str | os.PathLike[str], expected_fingerprint: str | None) -> None:
        self.directory = Path(directory)
        self.meta: dict[str, Any] = read_token_meta(self.directory)
        found = self.meta["tokenizer_fingerprint"]
        if expected_fingerprint is not None and found != expected_fingerprint:
            raise FingerprintMismatch(
                f"{self.directory}: token shards were made with tokenizer {found}, but the tokenizer in use is "
                f"{expected_fingerprint}; {REPRO_HINT}"
            )
        self.dtype = DTYPES[self.meta["dtype"]]
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def _map(self, entry: dict[str, Any], where: str) -> np.ndarray:
        """One token file of meta.json's ``entry`` as a memory map, after checking its size."""
        try:
            name, tokens = str(entry["file"]), int(entry["tokens"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: expected 'file' and 'tokens' (re-run `lmpipe tokenize`)",
                            path=str(self.directory / META_FILE)) from None
        path = self.directory / name
        expected = tokens * self.dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{name} is missing or not {expected} bytes long ({found}, the size {META_FILE} gives): "
                            f"the output is incomplete; {REPRO_HINT}", path=str(self.directory))
        if tokens == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The ids of ``split``, memory-mapped (an empty array for an empty split).

        Raises DataError if the split was not tokenized, or one of its files is missing or has a
        size other than meta.json's, naming the file.
        """
        if split not in self.meta["splits"]:
            raise DataError(f"split '{split}' was not tokenized (have: {', '.join(self.splits)}); "
                            "add it to tokenize.splits", path=str(self.directory))
        entry = self.meta["splits"][split]
        if "shards" not in entry:
            return self._map(entry, f"splits.{split}")
        parts = [self._map(shard, f"splits.{split}.shards[{i}]") for i, shard in enumerate(entry["shards"])]
        total = sum(part.shape[0] for part in parts)
        if total != entry.get("tokens", total):
            raise DataError(f"splits.{split}: its shards hold {total} tokens, the split {entry['tokens']}; "
                            f"{REPRO_HINT}", path=str(self.directory / META_FILE))
        nonempty = [part for part in parts if part.shape[0]]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else np.zeros(0, self.dtype)
        return ShardedTokens(nonempty)


def open_tokens(tokens_dir: str | os.PathLike[str], split: str,
                tokenizer_dir: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The memory-mapped ids of ``split`` and the meta, checked against ``tokenizer_dir``'s fingerprint."""
    reader = TokenShardReader(tokens_dir, read_tokenizer_info(tokenizer_dir).fingerprint)
    return reader.tokens(split), reader.meta


def unigram_entropy(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Entropy in nats/token of the split's token frequencies: the loss of the best model that
    ignores context. A trained LM must land far below it (the register stage's floor for a
    first champion, :func:`unigram_bits_per_byte`)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, tokens.shape[0], chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unigram_bits_per_byte(tokens_dir: str | os.PathLike[str], split: str, tokenizer_dir: str | os.PathLike[str]) -> float:
    """The unigram entropy of ``split`` in bits per UTF-8 byte of its text: the bits/byte of the
    best model that ignores context, comparable with a model's ``val_bpb``. Raises DataError when
    the shards are missing or meta.json has no byte count for the split, FingerprintMismatch for
    shards of another tokenizer."""
    reader = TokenShardReader(tokens_dir, read_tokenizer_info(tokenizer_dir).fingerprint)
    tokens = reader.tokens(split)
    n_bytes = reader.meta["splits"][split].get("bytes")
    if not n_bytes or tokens.shape[0] == 0:
        raise DataError(f"split '{split}' has no tokens or no byte count in {META_FILE}", path=str(reader.directory))
    return unigram_entropy(tokens, reader.vocab_size) * tokens.shape[0] / n_bytes / math.log(2)
