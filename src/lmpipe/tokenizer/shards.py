"""The ``tokenize`` stage: flat token files for each split, and the reader every consumer uses.

Reads ``data/split/{split}/part-*.parquet`` and ``artifacts/tokenizer/``; writes ``data/tokens/``
as a whole (:func:`lmpipe.io.atomic_dir`, so an interrupted run leaves no output):

- ``{split}.bin``: the token ids of every document in order, each followed by EOS, as one flat
  little-endian array (uint16 when every id fits, else uint32), nanoGPT-style, so training reads
  any window with a memory map and no index;
- ``meta.json``: dtype, per split the token, document and text byte counts (bits per byte =
  loss per token / ln 2 * tokens / bytes), the tokenizer fingerprint, vocab size and the special
  ids (eos, bos, pad, unk and the chat markers);
- ``manifest.json``.

Encoding runs in worker processes (forked from a clean fork server, so no lock held by a thread of
this process is inherited), each loading the model once and encoding batches of about ``batch_bytes`` of text. Results come
back in submission order and are appended to the file at once, with at most two batches per
worker in flight: memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow.compute as pc
import sentencepiece as spm
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from lmpipe.config import Paths
from lmpipe.data.shards import iter_shards
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


def _init_worker(model_file: str, fingerprint: str, eos_id: int, dtype: str) -> None:
    """Load the model once per worker; refuse a model file changed since the stage checked it."""
    global _worker_state
    model_bytes = Path(model_file).read_bytes()
    if sha256_bytes(model_bytes) != fingerprint:
        raise FingerprintMismatch(f"{model_file} changed while tokenizing; {REPRO_HINT}")
    _worker_state = (spm.SentencePieceProcessor(model_proto=model_bytes), eos_id, np.dtype(dtype))


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
    file: str
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0


def text_batches(split_dir: Path, batch_bytes: int, stats: SplitStats) -> Iterator[tuple[list[str], int]]:
    """Yield (texts, documents read) in order: non-empty documents, about ``batch_bytes`` each.

    Empty documents are skipped (they would only add an EOS) and counted in ``stats``.
    """
    for _, table in iter_shards(split_dir):
        column = table.column("text")
        sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
        texts = column.to_pylist()
        start, size = 0, 0
        for idx, text_size in enumerate(sizes.tolist()):
            size += text_size
            if size >= batch_bytes or idx == len(texts) - 1:
                batch = [t for t in texts[start:idx + 1] if t]
                stats.empty_documents += idx + 1 - start - len(batch)
                stats.bytes += size
                yield batch, idx + 1 - start
                start, size = idx + 1, 0


def tokenize_split(split_dir: Path, out: BinaryIO, executor: Executor, window: int, batch_bytes: int,
                   stats: SplitStats, progress: Progress) -> None:
    """Encode one split into ``out`` in document order, ``window`` batches in flight at most."""
    task = progress.add_task(f"tokenize {split_dir.name}", total=document_total(split_dir))
    pending: deque[tuple[Future[np.ndarray], int, int]] = deque()

    def write_oldest() -> None:
        future, docs, n_docs = pending.popleft()
        tokens = future.result()
        out.write(tokens.tobytes())
        stats.tokens += int(tokens.size)
        stats.documents += docs
        progress.advance(task, n_docs)

    for texts, n_docs in text_batches(split_dir, batch_bytes, stats):
        pending.append((executor.submit(_encode_in_worker, texts), len(texts), n_docs))
        if len(pending) >= window:
            write_oldest()
    while pending:
        write_oldest()


# ----------------------------------------------------------------------------------- the stage


def run(cfg: TokenizeConfig, paths: Paths) -> dict[str, Any]:
    """Tokenize ``cfg.splits`` of ``paths.split`` with ``paths.tokenizer`` into ``paths.tokens``.

    Raises DataError for a missing split, an unreadable shard or a tokenizer whose model file does
    not match its fingerprint; on any error ``paths.tokens`` is left as it was.
    """
    _, info = load_tokenizer(paths.tokenizer)  # checks the model file against its fingerprint
    dtype = token_dtype(info.vocab_size, cfg.dtype)
    for split in cfg.splits:
        if not (paths.split / split).is_dir():
            raise DataError(f"split '{split}' not found (run the split stage, or remove it from tokenize.splits)",
                            path=str(paths.split / split))
    workers = cfg.workers or cpu_count()
    initargs = (str(info.model_file), info.fingerprint, info.eos_id, dtype.str)
    executor: Executor
    if workers == 1:
        executor = _InlineExecutor(*initargs)
    else:
        executor = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_init_worker, initargs=initargs)
    started = time.perf_counter()
    results: dict[str, SplitStats] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with atomic_dir(paths.tokens) as tmp, Progress(*columns, transient=True, console=Console(stderr=True), unit="docs") as progress:
            for split in cfg.splits:
                stats = SplitStats(file=f"{split}.bin")
                with open(tmp / stats.file, "wb") as out:
                    tokenize_split(paths.split / split, out, executor, 2 * workers, cfg.batch_bytes, stats, progress)
                    out.flush()
                    os.fsync(out.fileno())
                results[split] = stats
                log.info("%s: %d documents, %d tokens (%.2f bytes/token)", split, stats.documents, stats.tokens,
                         stats.bytes / max(stats.tokens - stats.documents, 1))
            meta = {
                "format": FORMAT,
                "dtype": dtype.name,
                "tokenizer_fingerprint": info.fingerprint,
                "vocab_size": info.vocab_size,
                "eos_id": info.eos_id,
                "bos_id": info.bos_id,
                "pad_id": info.pad_id,
                "unk_id": info.unk_id,
                "special_tokens": info.special_tokens,
                "splits": {name: asdict(stats) for name, stats in results.items()},
            }
            write_json(tmp / META_FILE, meta)
            counts = {f"{name}_tokens": s.tokens for name, s in results.items()}
            write_manifest(tmp, stage="tokenize", config=cfg, inputs={"split": paths.split, "tokenizer": paths.tokenizer},
                           counts=counts, extra={"tokenizer_fingerprint": info.fingerprint})
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    total_bytes = sum(s.bytes for s in results.values())
    summary: dict[str, Any] = {"seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds if seconds else 0.0}
    for name, stats in results.items():
        summary.update({f"{name}_tokens": stats.tokens, f"{name}_documents": stats.documents, f"{name}_bytes": stats.bytes})
    summary["artifacts"] = [str(paths.tokens / META_FILE)]
    return summary


# -------------------------------------------------------------------------------------- reading


class TokenShardReader:
    """The token files of ``data/tokens/``, refused unless made with the expected tokenizer.

    ``TokenShardReader(paths.tokens, expected_fingerprint)`` reads ``meta.json`` and raises
    FingerprintMismatch if the shards' tokenizer fingerprint differs, DataError if the directory
    is incomplete. ``reader.tokens("train")`` is a read-only ``np.memmap`` of the split's ids.
    """

    def __init__(self, directory: str | os.PathLike[str], expected_fingerprint: str) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise DataError(f"no {META_FILE}: tokenize the splits first (`dvc repro tokenize`)", path=str(self.directory))
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        found = self.meta["tokenizer_fingerprint"]
        if found != expected_fingerprint:
            raise FingerprintMismatch(
                f"{self.directory}: token shards were made with tokenizer {found}, but the tokenizer in use is "
                f"{expected_fingerprint}; {REPRO_HINT}"
            )
        self.dtype = np.dtype("<u2" if self.meta["dtype"] == "uint16" else "<u4")
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def tokens(self, split: str) -> np.ndarray:
        """The ids of ``split`` as a read-only memory map (an empty array for an empty split).

        Raises DataError if the split was not tokenized or its file size disagrees with meta.json.
        """
        if split not in self.meta["splits"]:
            raise DataError(f"split '{split}' was not tokenized (have: {', '.join(self.splits)}); "
                            "add it to tokenize.splits", path=str(self.directory))
        entry = self.meta["splits"][split]
        path = self.directory / entry["file"]
        expected = entry["tokens"] * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{entry['file']} is missing or not {expected} bytes long: the output is incomplete; "
                            f"{REPRO_HINT}", path=str(self.directory))
        if entry["tokens"] == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")


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
