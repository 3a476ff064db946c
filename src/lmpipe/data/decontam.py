"""N-gram decontamination: find documents that share a word n-gram with evaluation text.

GPT-3 (Brown et al. 2020, appendix C) searched its training data for 13-gram overlaps with the
test and development sets of its benchmarks. Here a training document is contaminated when it
shares any word n-gram (13 by default) with an evaluation text, and it is dropped whole (GPT-3 cut
out a window around each overlap instead). Words are normalised (lower-cased, punctuation ignored)
by :mod:`lmpipe.data.textstats`. Evaluation texts shorter than ``n`` words contribute nothing.

:class:`NgramIndex` holds the evaluation n-grams as a sorted array of 64-bit hashes behind a bit
filter, so the common case, an n-gram that is not in the index, costs one bit test. The ``clean``
stage uses it against ``decontaminate.eval_files``; ``split`` uses it to drop train documents that
overlap val/test::

    index = NgramIndex.from_texts(held_out_texts, n=13)
    bad = index.contaminated(train_texts)   # bool array, one per text
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from lmpipe.data.sources import detect_format, file_rows, resolve_paths
from lmpipe.data.textstats import NGRAM_BASE, TokenizedBatch, gather_words, mix64, tokenize

log = logging.getLogger(__name__)

_BATCH_DOCS = 2_000


@numba.njit(cache=True, nogil=True)
def _ngram_hashes(tok_hash, tok_flags, tok_offsets, n, out, buf):  # pragma: no cover - compiled
    """Write the n-gram hashes of every document into ``out``; return how many."""
    w = 0
    top = np.uint64(1)
    for _ in range(n - 1):
        top *= NGRAM_BASE
    for d in range(tok_offsets.shape[0] - 1):
        m = gather_words(tok_hash, tok_flags, tok_offsets[d], tok_offsets[d + 1], buf)
        gram = np.uint64(0)
        for p in range(m):
            if p >= n:
                gram -= buf[p - n] * top
            gram = gram * NGRAM_BASE + buf[p]
            if p >= n - 1:
                out[w] = mix64(gram)
                w += 1
    return w


@numba.njit(cache=True, nogil=True)
def _contaminated(tok_hash, tok_flags, tok_offsets, rows, n, bits, shift, table, out, buf):  # pragma: no cover
    top = np.uint64(1)
    for _ in range(n - 1):
        top *= NGRAM_BASE
    for r in range(rows.shape[0]):
        d = rows[r]
        m = gather_words(tok_hash, tok_flags, tok_offsets[d], tok_offsets[d + 1], buf)
        gram = np.uint64(0)
        hit = False
        for p in range(m):
            if p >= n:
                gram -= buf[p - n] * top
            gram = gram * NGRAM_BASE + buf[p]
            if p >= n - 1:
                x = mix64(gram)
                slot = x >> shift
                if bits[slot >> np.uint64(6)] & (np.uint64(1) << (slot & np.uint64(63))):
                    pos = np.searchsorted(table, x)
                    if pos < table.shape[0] and table[pos] == x:
                        hit = True
                        break
        out[r] = hit


def _as_batches(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> Iterable[pa.Array]:
    if isinstance(texts, pa.ChunkedArray | pa.Array):
        for start in range(0, len(texts), _BATCH_DOCS):
            yield texts.slice(start, _BATCH_DOCS)
        return
    for start in range(0, len(texts), _BATCH_DOCS):
        yield pa.array(list(texts[start: start + _BATCH_DOCS]), pa.large_string())


class NgramIndex:
    """Set of word n-gram hashes of some texts, for fast "shares an n-gram?" queries."""

    def __init__(self, hashes: np.ndarray, n: int) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.table = np.unique(np.asarray(hashes, np.uint64))
        # ~16 filter bits per n-gram: a miss is rejected by the filter > 90% of the time
        log_bits = int(np.clip(np.ceil(np.log2(max(len(self.table), 1) * 16)), 10, 32))
        self.shift = np.uint64(64 - log_bits)
        self.bits = np.zeros((1 << log_bits) // 64, np.uint64)
        slots = self.table >> self.shift
        np.bitwise_or.at(self.bits, slots >> np.uint64(6), np.uint64(1) << (slots & np.uint64(63)))

    def __len__(self) -> int:
        return len(self.table)

    def save(self, path: str | Path) -> None:
        """Write the index to an ``.npy`` file (the filter is rebuilt on load)."""
        with open(path, "wb") as handle:
            np.save(handle, np.concatenate([[np.uint64(self.n)], self.table]))

    @classmethod
    def load(cls, path: str | Path) -> NgramIndex:
        data = np.load(path)
        return cls(data[1:], int(data[0]))

    @classmethod
    def from_texts(cls, texts: Sequence[str] | pa.Array | pa.ChunkedArray, n: int = 13) -> NgramIndex:
        """Index every word n-gram of ``texts`` (texts with fewer than ``n`` words add nothing)."""
        parts: list[np.ndarray] = []
        for chunk in _as_batches(texts):
            batch = tokenize(chunk)
            longest = int(np.max(np.diff(batch.tok_offsets))) if len(batch) else 0
            out = np.empty(len(batch.tok_hash), np.uint64)
            used = _ngram_hashes(batch.tok_hash, batch.tok_flags, batch.tok_offsets, n, out,
                                 np.empty(longest + 1, np.uint64))
            parts.append(np.unique(out[:used]))
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.uint64), n)

    def contaminated_batch(self, batch: TokenizedBatch, rows: np.ndarray | None = None) -> np.ndarray:
        """For each selected document of a tokenized batch: does it share an n-gram with the index?"""
        rows = np.arange(len(batch)) if rows is None else np.ascontiguousarray(rows, np.int64)
        out = np.zeros(len(rows), np.bool_)
        if len(self.table) == 0 or len(rows) == 0:
            return out
        longest = int(np.max(np.diff(batch.tok_offsets)))
        _contaminated(batch.tok_hash, batch.tok_flags, batch.tok_offsets, rows, self.n, self.bits, self.shift,
                      self.table, out, np.empty(longest + 1, np.uint64))
        return out

    def contaminated(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Bool array: ``True`` where a text shares a word n-gram with the indexed texts."""
        parts = [self.contaminated_batch(tokenize(chunk)) for chunk in _as_batches(texts)]
        return np.concatenate(parts) if parts else np.zeros(0, np.bool_)


# -------------------------------------------------------------------------------- eval file input


def read_eval_texts(path: Path, text_field: str) -> list[str]:
    """Texts of one eval file (:func:`lmpipe.data.sources.file_rows`): txt paragraphs, or the
    ``text_field`` of jsonl/json/parquet/csv/tsv rows (a non-string value as its JSON, nulls skipped).

    Raises DataError naming the file and line (or row) for a malformed file or a missing field.
    """
    fmt = detect_format(path, "auto")
    field = "text" if fmt == "txt" else text_field
    texts: list[str] = []
    for row in file_rows(path, fmt, columns=[field] if fmt == "parquet" else None,
                         required=() if fmt == "txt" else (field,), setting="clean.decontaminate.eval_text_field"):
        value = row.values[field]
        if value is not None:
            texts.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return texts


def index_eval_files(patterns: list[str], root: Path, text_field: str, n: int) -> tuple[NgramIndex, list[Path]]:
    """Build the n-gram index of every configured eval file; return it with the files read."""
    files = resolve_paths(patterns, root, "clean.decontaminate.eval_files")
    texts: list[str] = []
    for path in files:
        texts.extend(read_eval_texts(path, text_field))
    index = NgramIndex.from_texts(texts, n)
    log.info("decontamination index: %d %d-grams from %d texts in %d files", len(index), n, len(texts), len(files))
    return index, files
