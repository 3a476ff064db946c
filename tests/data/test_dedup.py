"""Exact and MinHash near-duplicate detection: what counts as a duplicate, keep-first, agreement
with datasketch, and properties (subset, idempotent, order-stable) on arbitrary corpora."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipe.data.dedup import (
    NearDuplicateIndex,
    SpilledNearDuplicateIndex,
    StreamDedup,
    datasketch_near_duplicates,
    exact_duplicates,
    exact_keys,
    lsh_params,
    minhash_signatures,
    near_duplicates,
    read_rows,
)
from lmpipe.data.textstats import EMPTY_NORM, TokenizedBatch, tokenize
from lmpipe.errors import DataError

WORDS = ["river", "stone", "bread", "lamp", "cloud", "garden", "window", "letter", "music", "orange", "winter", "harbour", "forest", "candle", "ladder", "pocket", "silver", "market", "ribbon", "thunder", "meadow", "castle", "pepper", "engine", "violin", "blanket", "feather", "island", "kettle", "mirror"]


def corpus(n_docs: int, seed: int, words: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(words)) for _ in range(n_docs)]


def edit(text: str, changes: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def signatures(texts: list[str], num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    batch = tokenize(texts)
    return minhash_signatures(batch, np.arange(len(texts)), num_perm, shingle, seed=1)


def shingles(batch: TokenizedBatch, size: int = 5) -> list[list[bytes]]:
    out = []
    for d in range(len(batch)):
        lo, hi = batch.tok_offsets[d], batch.tok_offsets[d + 1]
        words = batch.tok_hash[lo:hi][(batch.tok_flags[lo:hi] & EMPTY_NORM) == 0]
        k = min(size, len(words))
        out.append([words[i: i + k].tobytes() for i in range(len(words) - k + 1)] if k else [b""])
    return out


def test_exact_duplicates_ignore_case_whitespace_and_punctuation() -> None:
    texts = ["The cat sat on the mat.", "the  CAT sat, on the mat", "The cat sat on a mat.", "The cat sat\non the mat!"]
    keys = exact_keys(tokenize(texts), np.arange(4))
    assert exact_duplicates(keys).tolist() == [-1, 0, -1, 0]


def test_near_duplicate_with_a_few_words_changed_is_dropped_and_a_different_doc_kept() -> None:
    base = corpus(3, seed=1)
    texts = [base[0], base[1], edit(base[0], 3, seed=2), base[2], edit(base[1], 2, seed=3) + " extra words"]
    assert near_duplicates(signatures(texts), threshold=0.8).tolist() == [-1, -1, 0, -1, 1]


def test_keep_first_and_stable_in_input_order() -> None:
    base = corpus(1, seed=4)[0]
    texts = [edit(base, 2, seed=s) for s in range(5)]
    dup_of = near_duplicates(signatures(texts), threshold=0.8)
    assert dup_of.tolist() == [-1, 0, 0, 0, 0]
    assert near_duplicates(signatures(texts[::-1]), threshold=0.8).tolist() == [-1, 0, 0, 0, 0]


def jaccard(a: list[bytes], b: list[bytes]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def test_threshold_and_parameters_matter() -> None:
    base = corpus(1, seed=5)[0]
    texts = [base, edit(base, 3, seed=6)]
    true = jaccard(*shingles(tokenize(texts)))
    assert 0.85 < true < 0.95
    assert near_duplicates(signatures(texts), threshold=0.98).tolist() == [-1, -1]
    assert near_duplicates(signatures(texts), threshold=0.75).tolist() == [-1, 0]
    assert near_duplicates(signatures(texts, shingle=1), threshold=0.98).tolist() == [-1, 0]  # 3 words of 300
    assert lsh_params(0.8, 128) == (14, 9) and lsh_params(0.8, 128, 0.5, 0.5) == (9, 13)  # datasketch's pick
    bands, rows = lsh_params(0.5, 64)
    assert bands * rows <= 64 and bands > 14


def test_streaming_index_equals_one_batch() -> None:
    base = corpus(30, seed=7)
    texts = base + [edit(t, 2, seed=i) for i, t in enumerate(base[:10])]
    random.Random(8).shuffle(texts)
    sigs = signatures(texts)
    index = NearDuplicateIndex(0.8, 128)
    streamed = np.concatenate([index.add(sigs[i: i + 7]) for i in range(0, len(texts), 7)])
    assert streamed.tolist() == near_duplicates(sigs, 0.8).tolist()
    assert index.kept == int((streamed < 0).sum()) == 30


def test_agrees_with_datasketch_on_a_small_corpus() -> None:
    base = corpus(40, seed=9)
    rng = random.Random(10)
    texts = base + [edit(rng.choice(base), rng.choice([1, 2, 3, 30, 60]), seed=i) for i in range(40)]
    batch = tokenize(texts)
    ours = near_duplicates(minhash_signatures(batch, np.arange(len(texts)), 128, 5, seed=1), 0.8)
    theirs = datasketch_near_duplicates(shingles(batch), 0.8, 128)
    assert ((ours >= 0) == (theirs >= 0)).all()
    assert 15 <= int((ours >= 0).sum()) <= 40


def test_short_and_empty_documents() -> None:
    texts = ["one two", "one two", "", "...", "three"]
    sigs = signatures(texts)
    assert near_duplicates(sigs, 0.8).tolist() == [-1, 0, -1, 2, -1]  # no words: equal to each other only


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=25), st.integers(0, 3))
def test_properties_subset_idempotent_first_kept(picks: list[int], changes: int) -> None:
    base = corpus(6, seed=11, words=40)
    texts = [edit(base[p], changes, seed=i) for i, p in enumerate(picks)]
    sigs = signatures(texts)
    dup_of = near_duplicates(sigs, 0.8)
    kept = np.flatnonzero(dup_of < 0)
    assert dup_of[0] == -1  # the first document is always kept
    assert np.all(dup_of[dup_of >= 0] < np.flatnonzero(dup_of >= 0))  # duplicates point back
    assert np.all(dup_of[dup_of >= 0][:, None] != np.flatnonzero(dup_of >= 0)[None, :])  # ... to kept docs
    assert near_duplicates(sigs[kept], 0.8).tolist() == [-1] * len(kept)  # idempotent
    keys = exact_keys(tokenize(texts), np.arange(len(texts)))
    exact = exact_duplicates(keys)
    assert all(keys[j] == keys[i] and i < j for j, i in enumerate(exact) if i >= 0)
    assert len(set(keys[exact < 0].tolist())) == int((exact < 0).sum())


def near_signatures(num_perm: int, seed: int = 0) -> np.ndarray:
    """Signatures of 60 documents, copies of them at falling similarity (some pass 0.8, some do
    not) and a chain (b near a, c near b but not near a), shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**32, size=(60, num_perm), dtype=np.uint32)
    sigs = [base]
    for level in (0.05, 0.12, 0.2, 0.3):  # copies at falling similarity: some pass 0.8, some do not
        copy = base[rng.choice(60, 30)].copy()
        flip = rng.random(copy.shape) < level
        copy[flip] = rng.integers(0, 2**32, size=int(flip.sum()), dtype=np.uint32)
        sigs.append(copy)
    # a chain: b is near a, c is near b but not near a, so c stays (a kept, b removed)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[:20] = rng.integers(0, 2**32, size=20, dtype=np.uint32)
    c[:40] = b[:40]
    c[:20] = b[:20]
    c[20:40] = rng.integers(0, 2**32, size=20, dtype=np.uint32)
    sigs.append(np.stack([a, b, c]))
    all_sigs = np.concatenate(sigs)
    all_sigs = all_sigs[rng.permutation(len(all_sigs))]

    return all_sigs


def test_spilled_index_equals_the_in_memory_index(tmp_path: Path) -> None:
    """Bands spilled to 3 disk partitions, resolved one at a time: the same removals and references."""
    sigs = near_signatures(128, seed=1)
    expected = NearDuplicateIndex(0.8, 128).add(sigs)
    spilled = SpilledNearDuplicateIndex(0.8, 128, tmp_path / "spill", partitions=3, buffer_rows=100)
    positions = np.arange(len(sigs)) * 2 + 5  # the caller's numbering, as StreamDedup's positions
    for start in range(0, len(sigs), 37):  # fed in batches, flushed to disk many times
        assert (spilled.add(sigs[start:start + 37], positions[start:start + 37]) == -1).all()
    assert len(list((tmp_path / "spill").glob("bands-*.parquet"))) == 3
    removed, dup_of = spilled.resolve()
    got = np.full(len(sigs), -1, np.int64)
    got[(removed - 5) // 2] = dup_of
    assert 20 < (expected >= 0).sum() < 120
    np.testing.assert_array_equal(got, np.where(expected >= 0, expected * 2 + 5, -1))
    assert list((tmp_path / "spill").iterdir()) == []


def test_signatures_are_read_back_by_position(tmp_path: Path) -> None:
    """The spilled index reads the signatures it verifies with plain reads (a memory map would hold
    every page around each read in the process's RSS): any rows, repeated and unsorted."""
    sigs = np.arange(50 * 16, dtype=np.uint32).reshape(50, 16)
    path = tmp_path / "signatures.u32"
    path.write_bytes(sigs.tobytes())
    rows = np.array([7, 3, 4, 5, 7, 49, 0])
    with path.open("rb", buffering=0) as file:
        np.testing.assert_array_equal(read_rows(file, rows, 16), sigs[rows])
        with pytest.raises(DataError, match="signature 50 is past the end"):
            read_rows(file, np.array([49, 50]), 16)


def test_stream_dedup_before_a_spilled_index_holds_no_id_per_document(tmp_path: Path) -> None:
    """While a spilled index's verdicts wait, StreamDedup keeps nothing per document beyond the
    exact index: no list of ids (the second pass names each example's original from the staged
    rows), so the driver's memory is flat in the corpus size. Named, the examples are the ones the
    in-memory index gives."""
    base = corpus(80, seed=11, words=100)
    texts = base + [base[i] for i in (3, 7, 41)] + [edit(base[i], 1, seed=i) for i in (5, 9)]
    random.Random(12).shuffle(texts)
    keys, sigs = exact_keys(tokenize(texts), np.arange(len(texts))), signatures(texts)
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    memory = StreamDedup(True, NearDuplicateIndex(0.8, 128))
    index = SpilledNearDuplicateIndex(0.8, 128, tmp_path / "spill", partitions=2)
    spilled = StreamDedup(True, index, positions=True)
    staged = []
    for start in range(0, len(texts), 10):
        rows = slice(start, start + 10)
        memory.filter(table.slice(start, 10), keys[rows], sigs[rows])
        staged.append(spilled.filter(table.slice(start, 10), keys[rows], sigs[rows]))
        assert spilled.ids == [] and len(spilled.unnamed) <= spilled.examples_per_rule
    assert memory.removed["exact_dedup"]["docs"] == spilled.removed["exact_dedup"]["docs"] == 3
    kept = pa.concat_tables(staged)
    spilled.name(dict(zip(kept.column("_pos").to_pylist(), kept.column("id").to_pylist(), strict=True)))
    assert spilled.removed["exact_dedup"] == memory.removed["exact_dedup"]
    assert spilled.unnamed == []
    removed, dup_of = index.resolve()
    assert [(f"d{k}", f"d{d}") for k, d in zip(removed, dup_of, strict=True)] == [
        (e["id"], e["duplicate_of"]) for e in memory.removed["near_dedup"]["examples"]]
    assert len(removed) == 2
