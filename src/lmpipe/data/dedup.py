"""Exact and near-duplicate detection: normalised-text hashes and MinHash LSH.

Both work on the token hashes of :mod:`lmpipe.data.textstats`, so "the same text" means the same
sequence of normalised words (case, whitespace and punctuation ignored).

Near duplicates follow Broder (1997) and the LSH banding of Leskovec et al., *Mining of Massive
Datasets*, ch. 3: a document's shingles are its word n-grams; ``num_perm`` hash functions give a
MinHash signature whose agreement rate estimates Jaccard similarity; the signature is cut into
``bands`` bands of ``rows`` values and documents sharing a band become candidates. Every candidate
pair is then verified by its estimated Jaccard, so banding only decides recall, never a removal.

Resolution is sequential and stable, as in datasketch's query-then-insert idiom: documents are
visited in input order and a document is a duplicate when it matches an earlier *kept* document;
otherwise it is kept. The first document of each cluster therefore always survives.

Hashing is multiply-add-shift universal hashing (Dietzfelbinger et al. 1997) over 64-bit shingle
hashes, keeping the high 32 bits: a signature costs ``4 * num_perm`` bytes.

Memory: :class:`NearDuplicateIndex` keeps each kept document's signature and its place in every
band's bucket chain (:func:`index_bytes`, about 1 KB at 128 permutations). Past a budget the local
stage uses :class:`SpilledNearDuplicateIndex` instead: the band rows go to disk partitions by band
hash and are resolved one partition at a time into verified pairs (:func:`bucket_pairs`), and the
pairs into verdicts by the same keep-first rule (:func:`resolve_near`), the path the Ray engine
takes with a shuffle in place of the partitions. Both give the index's removals and references.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmpipe.data.textstats import EMPTY_NORM, NGRAM_BASE, TokenizedBatch, gather_words, mix64
from lmpipe.errors import DataError

_EMPTY_KEY = np.uint64(0)


@numba.njit(cache=True, nogil=True)
def _exact_keys(tok_hash, tok_flags, tok_offsets, rows, out):  # pragma: no cover - compiled
    for r in range(rows.shape[0]):
        d = rows[r]
        acc = np.uint64(0x6A09E667F3BCC909)
        count = 0
        for k in range(tok_offsets[d], tok_offsets[d + 1]):
            if not tok_flags[k] & EMPTY_NORM:
                acc = mix64(acc * NGRAM_BASE + tok_hash[k])
                count += 1
        out[r] = mix64(acc ^ np.uint64(count)) if count else _EMPTY_KEY


def exact_keys(batch: TokenizedBatch, rows: np.ndarray) -> np.ndarray:
    """64-bit hash of each selected document's normalised word sequence (uint64, one per row)."""
    rows = np.ascontiguousarray(rows, np.int64)
    out = np.empty(len(rows), np.uint64)
    _exact_keys(batch.tok_hash, batch.tok_flags, batch.tok_offsets, rows, out)
    return out


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """For each key, the index of the first equal key before it, or -1 if it is the first."""
    keys = np.asarray(keys, np.uint64)
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse].astype(np.int64)
    return np.where(first_of == np.arange(len(keys)), -1, first_of)


# ------------------------------------------------------------------------------------------ MinHash


def hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the ``num_perm`` hash functions h(x) = (a*x + b) >> 32, a odd (uint64)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


@numba.njit(cache=True, nogil=True)
def _minhash(tok_hash, tok_flags, tok_offsets, rows, shingle, a, b, out, buf, acc):  # pragma: no cover
    num_perm = a.shape[0]
    shift = np.uint64(32)
    for r in range(rows.shape[0]):
        d = rows[r]
        m = gather_words(tok_hash, tok_flags, tok_offsets[d], tok_offsets[d + 1], buf)
        sig = out[r]
        for j in range(num_perm):
            sig[j] = np.uint32(0xFFFFFFFF)
            acc[j] = np.uint32(0xFFFFFFFF)
        if m == 0:
            continue
        size = min(shingle, m)  # a document shorter than a shingle is one shingle
        top = np.uint64(1)
        gram = np.uint64(0)
        for q in range(size):
            gram = gram * NGRAM_BASE + buf[q]
            if q > 0:
                top *= NGRAM_BASE
        for p in range(m - size + 1):
            if p > 0:  # rolling polynomial hash of the next word n-gram
                gram = (gram - buf[p - 1] * top) * NGRAM_BASE + buf[p + size - 1]
            x = mix64(gram) >> shift  # 32-bit input: two multiplies instead of three per hash
            for j in range(num_perm):  # branch-free so the loop vectorises
                acc[j] = min(acc[j], np.uint32((a[j] * x + b[j]) >> shift))
        for j in range(num_perm):
            sig[j] = acc[j]


def minhash_signatures(batch: TokenizedBatch, rows: np.ndarray, num_perm: int, shingle_size: int,
                       seed: int) -> np.ndarray:
    """MinHash signatures (uint32 ``[len(rows), num_perm]``) of word ``shingle_size``-grams.

    A document with no word gets all-ones (it matches only other empty documents).
    """
    rows = np.ascontiguousarray(rows, np.int64)
    a, b = hash_params(num_perm, seed)
    out = np.empty((len(rows), num_perm), np.uint32)
    longest = int(np.max(np.diff(batch.tok_offsets))) if len(batch) else 0
    _minhash(batch.tok_hash, batch.tok_flags, batch.tok_offsets, rows, shingle_size, a, b, out,
             np.empty(longest + 1, np.uint64), np.empty(num_perm, np.uint32))
    return out


# -------------------------------------------------------------------------------------------- LSH


# Weights of LSH false positives and negatives when choosing bands and rows. Every candidate is
# verified, so a false positive costs one signature comparison while a false negative keeps a
# duplicate: recall matters more. At threshold 0.8 and 128 permutations this gives 14 bands of 9
# rows, which finds 87% of pairs at Jaccard 0.8 and 99.9% at 0.9 (equal weights: 40% and 93%).
LSH_WEIGHTS = (0.1, 0.9)


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = LSH_WEIGHTS[0],
               fn_weight: float = LSH_WEIGHTS[1]) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false positive and
    negative areas under the S-curve 1 - (1 - s^r)^b, the criterion datasketch uses."""
    best, best_cost = (1, num_perm), float("inf")
    grid_lo = np.linspace(0.0, threshold, 201)
    grid_hi = np.linspace(threshold, 1.0, 201)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - grid_lo**rows) ** bands, grid_lo)
            fn = np.trapezoid((1 - grid_hi**rows) ** bands, grid_hi)
            cost = float(fp_weight * fp + fn_weight * fn)
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 ``[docs, bands]``: one hash per band of ``rows`` signature values."""
    sig = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    weights = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, rows + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        acc = (sig * weights).sum(axis=2, dtype=np.uint64)
        acc ^= np.arange(bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
        acc = (acc ^ (acc >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
    return acc ^ (acc >> np.uint64(29))


@numba.njit(cache=True, nogil=True)
def _slot(keys, heads, key):  # pragma: no cover - compiled
    """Slot of ``key`` in the open-addressing bucket table (an empty slot has head -1)."""
    mask = keys.shape[0] - 1
    i = np.int64(key & np.uint64(mask))
    while heads[i] >= 0 and keys[i] != key:
        i = (i + 1) & mask
    return i


@numba.njit(cache=True, nogil=True)
def _rehash(keys, heads, new_keys, new_heads):  # pragma: no cover - compiled
    for i in range(keys.shape[0]):
        if heads[i] >= 0:
            j = _slot(new_keys, new_heads, keys[i])
            new_keys[j] = keys[i]
            new_heads[j] = heads[i]


def _grown(keys: np.ndarray, heads: np.ndarray, entries: int) -> tuple[np.ndarray, np.ndarray]:
    """The bucket table, rehashed into a larger one if ``entries`` would fill more than half."""
    size = len(keys)
    while size < 2 * entries:
        size *= 2
    if size == len(keys):
        return keys, heads
    new_keys, new_heads = np.zeros(size, np.uint64), np.full(size, -1, np.int64)
    _rehash(keys, heads, new_keys, new_heads)
    return new_keys, new_heads


@numba.njit(cache=True, nogil=True)
def _exact_add(keys, positions, table_keys, table_heads, dup_of):  # pragma: no cover - compiled
    added = 0
    for j in range(keys.shape[0]):
        i = _slot(table_keys, table_heads, keys[j])
        if table_heads[i] >= 0:
            dup_of[j] = table_heads[i]
        else:
            table_keys[i] = keys[j]
            table_heads[i] = positions[j]
            dup_of[j] = -1
            added += 1
    return added


class ExactDuplicateIndex:
    """Streaming exact dedup: the first position seen for each key (16 bytes per kept document)."""

    def __init__(self) -> None:
        self.kept = 0
        self._keys = np.zeros(16, np.uint64)
        self._heads = np.full(16, -1, np.int64)

    def add(self, keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """For each key (in order): the position of its first occurrence, or -1 if this is it."""
        keys = np.ascontiguousarray(keys, np.uint64)
        dup_of = np.empty(len(keys), np.int64)
        self._keys, self._heads = _grown(self._keys, self._heads, self.kept + len(keys))
        self.kept += _exact_add(keys, np.ascontiguousarray(positions, np.int64), self._keys, self._heads, dup_of)
        return dup_of


@numba.njit(cache=True, nogil=True)
def _add(signatures, bands_of, positions, min_equal, kept_sigs, kept_index, n_kept, keys, heads, next_kept,
         dup_of):  # pragma: no cover - compiled
    n_bands = bands_of.shape[1]
    num_perm = signatures.shape[1]
    for j in range(signatures.shape[0]):
        match = -1
        for b in range(n_bands):
            p = heads[_slot(keys, heads, bands_of[j, b])]
            while p >= 0 and match < 0:
                equal = 0
                for k in range(num_perm):
                    equal += signatures[j, k] == kept_sigs[p, k]
                if equal >= min_equal:
                    match = kept_index[p]
                p = next_kept[p * n_bands + b]
            if match >= 0:
                break
        dup_of[j] = match
        if match >= 0:
            continue
        # kept: a reference for every later document sharing one of its band buckets
        kept_sigs[n_kept] = signatures[j]
        kept_index[n_kept] = positions[j]
        for b in range(n_bands):
            i = _slot(keys, heads, bands_of[j, b])
            keys[i] = bands_of[j, b]
            next_kept[n_kept * n_bands + b] = heads[i]
            heads[i] = n_kept
        n_kept += 1
    return n_kept


class NearDuplicateIndex:
    """Streaming MinHash LSH: feed signatures in input order, get each document's verdict.

    Holds, per kept document, its signature and its place in ``bands`` buckets (about
    ``4 * num_perm + 24 * bands`` bytes), so memory grows with the kept documents only.
    """

    def __init__(self, threshold: float, num_perm: int, bands: int | None = None, rows: int | None = None) -> None:
        if bands is None or rows is None:
            bands, rows = lsh_params(threshold, num_perm)
        self.threshold, self.num_perm, self.bands, self.rows = threshold, num_perm, bands, rows
        self.min_equal = int(np.ceil(threshold * num_perm - 1e-9))
        self.seen = 0
        self.kept = 0
        self._sigs = np.zeros((0, num_perm), np.uint32)
        self._index = np.zeros(0, np.int64)
        self._next = np.zeros(0, np.int64)
        self._keys = np.zeros(16, np.uint64)
        self._heads = np.full(16, -1, np.int64)

    def _reserve(self, more: int) -> None:
        need = self.kept + more
        if need > len(self._index):
            size = max(need, 2 * len(self._index), 1024)
            sigs = np.zeros((size, self.num_perm), np.uint32)
            sigs[: self.kept] = self._sigs[: self.kept]
            self._sigs = sigs
            self._index = np.resize(self._index, size)
            self._next = np.resize(self._next, size * self.bands)
        self._keys, self._heads = _grown(self._keys, self._heads, need * self.bands)

    def add(self, signatures: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Judge the next documents: for each, the position of the earlier kept document it
        near-duplicates, or -1 when it is kept. Positions default to the count of documents added
        so far (0, 1, ...); pass your own (increasing) to use another numbering."""
        signatures = np.ascontiguousarray(signatures, np.uint32)
        dup_of = np.full(len(signatures), -1, np.int64)
        if positions is None:
            positions = np.arange(self.seen, self.seen + len(signatures))
        if len(signatures):
            self._reserve(len(signatures))
            self.kept = _add(signatures, band_hashes(signatures, self.bands, self.rows),
                             np.ascontiguousarray(positions, np.int64), self.min_equal, self._sigs, self._index,
                             self.kept, self._keys, self._heads, self._next, dup_of)
            self.seen += len(signatures)
        return dup_of


# ------------------------------------------------------------------ the band graph (Ray and spill)

BAND_SCHEMA = pa.schema([("bucket", pa.uint64()), ("band", pa.int32()), ("order", pa.int64()),
                         ("sig", pa.binary())])
BAND_KEY_SCHEMA = pa.schema([("bucket", pa.uint64()), ("band", pa.int32()), ("order", pa.int64())])
EDGE_SCHEMA = pa.schema([("lo", pa.int64()), ("hi", pa.int64()), ("band", pa.int32())])


def band_rows(batch: pa.Table, num_perm: int, bands: int, rows: int, signatures: bool = True) -> pa.Table:
    """One row per document and LSH band: (band hash, band, order key, signature); without the
    signature (``signatures=False``, ``BAND_KEY_SCHEMA``), a twentieth of the bytes to shuffle.
    Without signatures, the band hashes may come from a ``bands`` column (:func:`band_column`)."""
    n = batch.num_rows
    schema = BAND_SCHEMA if signatures else BAND_KEY_SCHEMA
    if n == 0:
        return schema.empty_table()
    if not signatures and "bands" in batch.column_names:
        keys = signature_matrix(batch.column("bands"), 2 * bands).view(np.uint64)  # [n, bands]
    else:
        keys = band_hashes(signature_matrix(batch.column("sig"), num_perm), bands, rows)
    take = pa.array(np.repeat(np.arange(n), bands))
    columns = {"bucket": pa.array(keys.reshape(-1), pa.uint64()),
               "band": pa.array(np.tile(np.arange(bands, dtype=np.int32), n)),
               "order": batch.column("order").take(take)}
    if signatures:
        columns["sig"] = batch.column("sig").take(take)
    return pa.table(columns, schema=schema)


def bucket_pairs(group: pa.Table, num_perm: int, min_equal: int, cells: int = 1 << 25) -> pa.Table:
    """Verified pairs of one LSH bucket: (earlier, later, the later one's band), estimated Jaccard
    (the fraction of equal signature values) at least the threshold.

    A bucket of n documents costs n^2 signature comparisons, done ``cells`` values at a time so
    memory stays bounded; the local index compares each document with the kept ones only, so a
    bucket of thousands of near-identical documents is where this engine is slower than it.
    """
    n = group.num_rows
    if n < 2:
        return EDGE_SCHEMA.empty_table()
    block = max(1, cells // (n * num_perm))
    group = group.sort_by("order")
    order = group.column("order").to_numpy()
    band = group.column("band").to_numpy()
    sigs = signature_matrix(group.column("sig"), num_perm)
    los, his = [], []
    for start in range(0, n, block):  # n x block x num_perm at a time: a huge bucket stays bounded
        equal = (sigs[start:start + block, None, :] == sigs[None, :, :]).sum(axis=2)
        i, j = np.nonzero(equal >= min_equal)
        i += start
        mask = order[i] < order[j]
        los.append(i[mask])
        his.append(j[mask])
    lo, hi = np.concatenate(los), np.concatenate(his)
    return pa.table({"lo": pa.array(order[lo]), "hi": pa.array(order[hi]), "band": pa.array(band[hi])},
                    schema=EDGE_SCHEMA)


def shared_buckets(buckets: np.ndarray) -> np.ndarray:
    """Rows whose bucket holds at least two rows (a lone document pairs with nothing), grouped by
    bucket, input order kept within each."""
    values, counts = np.unique(buckets, return_counts=True)
    shared = np.flatnonzero(np.isin(buckets, values[counts > 1]))
    return shared[np.argsort(buckets[shared], kind="stable")]


SMALL_BUCKET = 16  # buckets up to this size are verified together, all pairs at once


def signature_matrix(column: pa.Array | pa.ChunkedArray, num_perm: int) -> np.ndarray:
    """A binary column of ``num_perm`` uint32 signatures as an [n, num_perm] array, without a
    Python object per row where the column is one contiguous buffer."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, width = len(arr), num_perm * 4
    if n and arr.null_count == 0 and pa.types.is_binary(arr.type):
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
        if offsets[-1] - offsets[0] == n * width and np.all(np.diff(offsets) == width):
            data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
            return data.view(np.uint32).reshape(n, num_perm)
    return np.frombuffer(b"".join(arr.to_pylist()), np.uint32).reshape(n, num_perm)


def signature_column(signatures: np.ndarray) -> pa.BinaryArray:
    """[n, num_perm] uint32 signatures as a binary column, one value per row (no Python object
    per row): what :func:`signature_matrix` reads back."""
    sigs = np.ascontiguousarray(signatures, np.uint32)
    n, width = sigs.shape[0], sigs.shape[1] * 4 if sigs.ndim == 2 else 0
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(sigs.tobytes())])


def band_column(signatures: np.ndarray, bands: int, rows: int) -> pa.BinaryArray:
    """The LSH band hashes of [n, num_perm] signatures as a binary column (``bands`` uint64 a row):
    an eighth of the signature's bytes, all :func:`band_rows` needs to find candidate pairs."""
    keys = np.ascontiguousarray(band_hashes(signatures, bands, rows))
    return signature_column(keys.view(np.uint32).reshape(len(keys), 2 * bands))


def partition_pairs(table: pa.Table, num_perm: int, min_equal: int, grouped: bool = False,
                    cells: int = 1 << 25) -> pa.Table:
    """Verified pairs of a partition of band rows (``BAND_SCHEMA``) holding any number of buckets,
    as :func:`bucket_pairs` of each bucket with two or more rows. ``grouped``: the rows are
    already those of :func:`shared_buckets`, in its order. Buckets of up to ``SMALL_BUCKET`` rows,
    nearly all of them, are compared together in a few vectorised passes: a call per bucket costs
    more than its comparisons."""
    if not grouped:
        table = table.take(pa.array(shared_buckets(table.column("bucket").to_numpy())))
    buckets = table.column("bucket").to_numpy()
    n = len(buckets)
    if n == 0:
        return EDGE_SCHEMA.empty_table()
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    sizes = np.diff(np.r_[starts, n])
    order = table.column("order").to_numpy()
    band = table.column("band").to_numpy()
    sigs = signature_matrix(table.column("sig"), num_perm)
    edges = [EDGE_SCHEMA.empty_table()]
    step = max(1, cells // num_perm)
    for size in np.unique(sizes[sizes <= SMALL_BUCKET]).tolist():
        base = starts[sizes == size]
        a, b = np.triu_indices(size, 1)
        left, right = (base[:, None] + a).ravel(), (base[:, None] + b).ravel()
        for at in range(0, len(left), step):  # `step` pairs at a time: memory stays bounded
            i, j = left[at: at + step], right[at: at + step]
            hit = (sigs[i] == sigs[j]).sum(axis=1) >= min_equal
            i, j = i[hit], j[hit]
            early = order[i] < order[j]
            lo, hi = np.where(early, i, j), np.where(early, j, i)
            same = order[i] == order[j]
            lo, hi = lo[~same], hi[~same]
            edges.append(pa.table({"lo": pa.array(order[lo]), "hi": pa.array(order[hi]),
                                   "band": pa.array(band[hi])}, schema=EDGE_SCHEMA))
    for start, size in zip(starts[sizes > SMALL_BUCKET].tolist(), sizes[sizes > SMALL_BUCKET].tolist(), strict=True):
        edges.append(bucket_pairs(table.slice(start, size), num_perm, min_equal, cells))
    return pa.concat_tables(edges)


def resolve_near(edges: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(removed order keys, the kept document each duplicates), ascending, by the local rule.

    Documents are visited in order-key order; one is removed when a verified pair joins it to an
    earlier document that was kept. As on the local index (which probes bands in order and, within
    a bucket, the latest kept document first), the reference is the kept partner of the lowest band,
    then the latest such partner.
    """
    if edges.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = edges.column("lo").to_numpy(), edges.column("hi").to_numpy()
    band = edges.column("band").to_numpy()
    idx = np.lexsort((-lo, band, hi))
    removed: dict[int, int] = {}
    last = None
    for h, low in zip(hi[idx].tolist(), lo[idx].tolist(), strict=True):
        if h == last:
            continue  # already decided
        if low not in removed:
            removed[h] = low
            last = h
    keys = np.array(sorted(removed), np.int64)
    return keys, np.array([removed[int(k)] for k in keys], np.int64)



SPILL_SCHEMA = pa.schema([("bucket", pa.uint64()), ("band", pa.int32()), ("order", pa.int64()), ("k", pa.int64())])


class SpilledNearDuplicateIndex:
    """MinHash LSH whose band buckets live on disk: the local index past its memory budget.

    :meth:`add` judges nothing (every document comes back as kept): it appends each document's
    signature to one file and its band rows (band hash, band, position, signature number) to one of
    ``partitions`` parquet files chosen by the band hash. :meth:`resolve` then reads one partition
    at a time, verifies the pairs of each shared bucket (:func:`bucket_pairs`, the signatures of its
    documents read back from the file by :func:`read_rows`) and applies the keep-first rule to the
    verified pairs (:func:`resolve_near`), as the Ray engine does: the same removals and references as
    :class:`NearDuplicateIndex`. Memory: one partition's band rows (28 bytes each) and the verified
    pairs; disk: ``4 * num_perm + 28 * bands`` bytes per document.
    """

    def __init__(self, threshold: float, num_perm: int, directory: Path, partitions: int,
                 buffer_rows: int = 1 << 18) -> None:
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.threshold, self.num_perm = threshold, num_perm
        self.min_equal = int(np.ceil(threshold * num_perm - 1e-9))
        self.directory, self.partitions, self.buffer_rows = Path(directory), max(1, partitions), buffer_rows
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sig_path = self.directory / "signatures.u32"
        self._sigs = self._sig_path.open("wb")
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._pending: dict[int, list[pa.Table]] = {}
        self._held = 0
        self.seen = 0
        self.stored = 0

    def add(self, signatures: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        signatures = np.ascontiguousarray(signatures, np.uint32)
        n = len(signatures)
        if positions is None:
            positions = np.arange(self.seen, self.seen + n)
        self.seen += n
        if n:
            self._sigs.write(signatures.tobytes())
            keys = band_hashes(signatures, self.bands, self.rows).reshape(-1)
            rows = pa.table({"bucket": pa.array(keys, pa.uint64()),
                             "band": pa.array(np.tile(np.arange(self.bands, dtype=np.int32), n)),
                             "order": pa.array(np.repeat(np.asarray(positions, np.int64), self.bands)),
                             "k": pa.array(np.repeat(np.arange(self.stored, self.stored + n), self.bands))},
                            schema=SPILL_SCHEMA)
            self.stored += n
            part = (keys % np.uint64(self.partitions)).astype(np.int64)
            for p in np.unique(part).tolist():
                self._pending.setdefault(p, []).append(rows.filter(pa.array(part == p)))
            self._held += rows.num_rows
            if self._held >= self.buffer_rows:
                self._flush()
        return np.full(n, -1, np.int64)

    def _flush(self) -> None:
        for p, tables in self._pending.items():
            if p not in self._writers:
                self._writers[p] = pq.ParquetWriter(self.directory / f"bands-{p:05d}.parquet", SPILL_SCHEMA)
            self._writers[p].write_table(pa.concat_tables(tables))
        self._pending, self._held = {}, 0

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """(removed positions, the kept position each duplicates), ascending: the verdicts."""
        self._flush()
        self._sigs.close()
        for writer in self._writers.values():
            writer.close()
        edges = [EDGE_SCHEMA.empty_table()]
        with self._sig_path.open("rb", buffering=0) as sig_file:
            for p in sorted(self._writers):
                path = self.directory / f"bands-{p:05d}.parquet"
                table = pq.read_table(path)
                path.unlink()
                shared = shared_buckets(table.column("bucket").to_numpy())
                if not len(shared):
                    continue
                table = table.take(pa.array(shared))
                sig_rows = read_rows(sig_file, table.column("k").to_numpy(), self.num_perm)
                table = pa.table({"bucket": table.column("bucket"), "band": table.column("band"),
                                  "order": table.column("order"),
                                  "sig": signature_column(sig_rows)}, schema=BAND_SCHEMA)
                # one table per partition: a table per bucket costs ~1 KB of Arrow and Python objects
                edges.append(partition_pairs(table, self.num_perm, self.min_equal, grouped=True).combine_chunks())
        self._sig_path.unlink()
        self._writers = {}
        return resolve_near(pa.concat_tables(edges))


def read_rows(file: Any, rows: np.ndarray, num_perm: int) -> np.ndarray:
    """Signatures number ``rows`` (uint32 ``[len(rows), num_perm]``) of a file of back-to-back
    signatures, read by position: one read per run of consecutive rows.

    Not a memory map: every page the kernel maps around a faulting read (fault-around, 64 KB) counts
    in this process's RSS until unmapped, so reads spread over the file would hold nearly all of it.
    """
    size = 4 * num_perm
    wanted, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
    out = np.empty((len(wanted), num_perm), np.uint32)
    flat = out.reshape(-1).view(np.uint8)
    starts = np.flatnonzero(np.r_[True, np.diff(wanted) != 1])
    for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(wanted)], strict=True):
        file.seek(int(wanted[lo]) * size)
        if file.readinto(flat[lo * size:hi * size]) != (hi - lo) * size:
            raise DataError(f"signature {int(wanted[hi - 1])} is past the end of the file (truncated spill)",
                            path=str(getattr(file, "name", "")) or None)
    return out[inverse.reshape(-1)]


def index_bytes(num_perm: int, bands: int) -> int:
    """Bytes per kept document of :class:`NearDuplicateIndex`: its signature, its place in each
    band's chain and the bucket table's two slots per band entry (kept at most half full)."""
    return 4 * num_perm + 8 + 8 * bands + 2 * 16 * bands


def near_duplicates(signatures: np.ndarray, threshold: float, bands: int | None = None,
                    rows: int | None = None) -> np.ndarray:
    """For each document (row of ``signatures``, in input order), the index of an earlier kept
    document it near-duplicates (estimated Jaccard >= ``threshold``), or -1 when it is kept."""
    signatures = np.asarray(signatures, np.uint32)
    return NearDuplicateIndex(threshold, signatures.shape[1], bands, rows).add(signatures)


class StreamDedup:
    """Exact, then near-duplicate removal over tables of documents arriving in input order.

    Counts removals and keeps the first ``examples_per_rule`` of each (id, text, duplicate_of).
    Memory per kept document: its exact key, its signature and its LSH buckets; until the examples
    are found, also every document's id. With ``positions`` (the kept rows wait on disk for a spilled
    index's verdicts) not even that: each example's ``duplicate_of`` is a position in ``unnamed``
    until :meth:`name` gets the ids, and memory past the indexes stays flat in the corpus size.
    """

    def __init__(self, exact: bool, near: NearDuplicateIndex | SpilledNearDuplicateIndex | None,
                 examples_per_rule: int = 5, example_chars: int = 200, positions: bool = False) -> None:
        self.exact = ExactDuplicateIndex() if exact else None
        self.near = near
        self.positions = positions  # kept rows carry their position (column _pos) for a later pass
        self.examples_per_rule = examples_per_rule
        self.example_chars = example_chars
        self.seen = 0
        # id of every document by position, while examples are wanted and their references are named
        # here (not with positions: the later pass names them from the kept rows, see `unnamed`)
        self.ids: list[str] = []
        self.unnamed: list[tuple[dict[str, Any], int]] = []  # (example, position of its duplicate_of)
        self.removed: dict[str, dict[str, Any]] = {
            name: {"docs": 0, "bytes": 0, "examples": []} for name in ("exact_dedup", "near_dedup")}

    def name(self, ids: dict[int, str]) -> None:
        """Fill in the ``duplicate_of`` of the examples in ``unnamed`` from ``ids`` (position -> id)."""
        for example, position in self.unnamed:
            example["duplicate_of"] = ids[position]
        self.unnamed = []

    def _wants_examples(self) -> bool:
        return any(len(e["examples"]) < self.examples_per_rule for e in self.removed.values())

    def filter(self, table: pa.Table, keys: np.ndarray, signatures: np.ndarray | None) -> pa.Table:
        """The rows of ``table`` (with ``id`` and ``text``; ``keys`` from :func:`exact_keys`,
        ``signatures`` from :func:`minhash_signatures`) that duplicate no earlier kept document."""
        n = table.num_rows
        positions = np.arange(self.seen, self.seen + n)
        self.seen += n
        if self.positions:
            table = table.append_column("_pos", pa.array(positions))
        wanted = self._wants_examples()
        if wanted and not self.positions:
            self.ids.extend(table.column("id").to_pylist())
        if n == 0 or (self.exact is None and self.near is None):
            return table
        dup_of = {name: np.full(n, -1, np.int64) for name in self.removed}
        if self.exact is not None:
            dup_of["exact_dedup"] = self.exact.add(keys, positions)
        if self.near is not None and signatures is not None:
            rows = np.flatnonzero(dup_of["exact_dedup"] < 0)
            dup_of["near_dedup"][rows] = self.near.add(signatures[rows], positions[rows])
        sizes = pc.binary_length(pc.cast(table.column("text"), pa.large_binary())).to_numpy(zero_copy_only=False)
        for name, of in dup_of.items():
            entry = self.removed[name]
            dropped = np.flatnonzero(of >= 0)
            entry["docs"] += len(dropped)
            entry["bytes"] += int(sizes[dropped].sum())
            for i in dropped[: max(0, self.examples_per_rule - len(entry["examples"]))].tolist() if wanted else []:
                example = {"id": table.column("id")[i].as_py(), "duplicate_of": None,
                           "text": table.column("text")[i].as_py()[: self.example_chars]}
                if self.positions:  # the original is a kept row: the later pass reads its id
                    self.unnamed.append((example, int(of[i])))
                else:
                    example["duplicate_of"] = self.ids[of[i]]
                entry["examples"].append(example)
        if not self._wants_examples():
            self.ids = []
        return table.filter(pa.array((dup_of["exact_dedup"] < 0) & (dup_of["near_dedup"] < 0)))


def datasketch_near_duplicates(shingle_sets: list[list[bytes]], threshold: float, num_perm: int,
                               seed: int = 1) -> np.ndarray:
    """Reference result with datasketch (MinHash + MinHashLSH with the same false positive and
    negative weights, hence the same bands and rows), same sequential keep-first rule.

    Pure Python and slow; used by tests and the benchmark to check :func:`near_duplicates`, so
    datasketch comes with the ``dev`` extra, not with the package.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    kept: dict[int, MinHash] = {}
    dup_of = np.full(len(shingle_sets), -1, np.int64)
    for idx, shingles in enumerate(shingle_sets):
        mh = MinHash(num_perm=num_perm, seed=seed)
        mh.update_batch(shingles)
        matches = [int(k) for k in lsh.query(mh) if kept[int(k)].jaccard(mh) >= threshold]
        if matches:
            dup_of[idx] = min(matches)
        else:
            kept[idx] = mh
            lsh.insert(str(idx), mh)
    return dup_of
