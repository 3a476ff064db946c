"""N-gram decontamination: the index API (used by clean and split) and eval-file reading."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipe.data.decontam import NgramIndex, index_eval_files, read_eval_texts
from lmpipe.data.sources import resolve_paths
from lmpipe.data.textstats import EMPTY_NORM, tokenize
from lmpipe.errors import DataError

EVAL = ("Question: what is the capital city of the small mountain country where the river Inn flows "
        "north toward the Danube? Answer: the capital is Vaduz.")
WORDS = EVAL.split()


def test_shared_13_gram_is_contaminated_12_is_not() -> None:
    index = NgramIndex.from_texts([EVAL], n=13)
    leak = "Some training text, then " + " ".join(WORDS[3:16]) + " and more text after it."
    near_miss = "Some training text, then " + " ".join(WORDS[3:15]) + " and more text after it."
    assert index.contaminated([leak, near_miss, "unrelated words only"]).tolist() == [True, False, False]


def test_matching_ignores_case_and_punctuation() -> None:
    index = NgramIndex.from_texts([EVAL], n=13)
    shouted = " ".join(w.upper().strip("?:") for w in WORDS[:14])
    assert index.contaminated([shouted]).tolist() == [True]


def test_short_eval_texts_and_empty_index() -> None:
    index = NgramIndex.from_texts(["too short to match"], n=13)
    assert len(index) == 0
    assert index.contaminated(["too short to match", ""]).tolist() == [False, False]
    assert NgramIndex.from_texts([], n=5).contaminated([]).tolist() == []


def test_arrow_input_and_save_load(tmp_path: Path) -> None:
    index = NgramIndex.from_texts(pa.array([EVAL, "another eval example with enough words to make one five gram"]), n=5)
    index.save(tmp_path / "index.npy")
    loaded = NgramIndex.load(tmp_path / "index.npy")
    assert loaded.n == 5 and len(loaded) == len(index) > 0
    texts = pa.chunked_array([["x enough words to make one five y"], ["nothing here at all today friend"]])
    assert loaded.contaminated(texts).tolist() == [True, False]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=200), min_size=1, max_size=8),
       st.integers(3, 13))
def test_every_text_long_enough_contaminates_itself(texts: list[str], n: int) -> None:
    index = NgramIndex.from_texts(texts, n)
    batch = tokenize(texts)
    words = [int(((batch.tok_flags[lo:hi] & EMPTY_NORM) == 0).sum())
             for lo, hi in zip(batch.tok_offsets[:-1], batch.tok_offsets[1:], strict=True)]
    assert index.contaminated(texts).tolist() == [w >= n for w in words]


def test_eval_files_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "a.txt").write_text(f"{EVAL}\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "evals" / "b.jsonl").write_text(json.dumps({"question": EVAL}) + "\n\n" + json.dumps({"question": "q2"}) + "\n")
    pq.write_table(pa.table({"question": [EVAL, None]}), tmp_path / "evals" / "c.parquet")
    (tmp_path / "evals" / "d.csv").write_text(f'id,question\n1,"{EVAL}"\n')
    (tmp_path / "evals" / "e.tsv").write_text(f"id\tquestion\n1\t{EVAL}\n")
    files = resolve_paths(["evals/*.txt", "evals/*"], tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.parquet", "d.csv", "e.tsv"]
    assert read_eval_texts(files[0], "question") == [EVAL, "second paragraph"]
    for path in files[1:]:
        assert read_eval_texts(path, "question")[0] == EVAL
    index, used = index_eval_files(["evals/*"], tmp_path, "question", 13)
    assert used == files and len(index) == len(WORDS) - 12


def test_eval_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="clean.decontaminate.eval_files: no file matches 'missing/\\*.jsonl'"):
        index_eval_files(["missing/*.jsonl"], tmp_path, "text", 13)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        read_eval_texts(bad, "text")
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_eval_texts(bad, "text")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no column 'text'.*eval_text_field"):
        read_eval_texts(tmp_path / "x.csv", "text")
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(DataError, match="cannot tell the format from the extension '.docx'"):
        read_eval_texts(tmp_path / "x.docx", "text")


def test_eval_index_is_the_index_of_the_texts_the_files_hold(tmp_path: Path) -> None:
    """Read through the shared rows reader, every format gives the n-gram set of the texts written
    (values that are not strings count as their JSON); gzip and JSON lists read like the rest."""
    other = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat today"
    (tmp_path / "a.txt").write_text(f"{EVAL}\r\n\r\n\n{other}\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps([{"q": other}, {"q": {"nested": EVAL}}]))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"q": EVAL.upper()}) + "\n")
    index, used = index_eval_files(["*.txt", "*.json", "*.gz"], tmp_path, "q", 5)
    expected = NgramIndex.from_texts([EVAL, other, other, json.dumps({"nested": EVAL}), EVAL.upper()], 5)
    assert [p.name for p in used] == ["a.txt", "b.json", "c.jsonl.gz"]
    assert index.table.tobytes() == expected.table.tobytes()
    (tmp_path / "d.csv").write_text("q,id\nfine,1\nbroken\n")
    with pytest.raises(DataError, match=r"d\.csv:3: 1 fields, but the header has 2"):
        index_eval_files(["d.csv"], tmp_path, "q", 5)
    (tmp_path / "e.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(DataError, match=r"e\.txt:1: not valid UTF-8"):
        index_eval_files(["e.txt"], tmp_path, "q", 5)
