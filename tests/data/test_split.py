from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpipe.config import Paths
from lmpipe.data import split
from lmpipe.data.config import SplitConfig
from lmpipe.data.gate import record_validation
from lmpipe.data.shards import ShardWriter, doc_id, make_table, read_documents
from lmpipe.errors import DataError

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


def doc(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] + str((i * 31 + k) % 97) for k in range(40))


def write_clean(root: Path, texts: list[str], shard_docs: int = 50, validated: bool | None = True) -> None:
    """data/clean with these texts, and (unless ``validated`` is None) validate's verdict on it."""
    writer = ShardWriter(root / "data" / "clean", shard_docs=shard_docs)
    writer.write(make_table([doc_id(t) for t in texts], texts, ["s"] * len(texts), ["{}"] * len(texts)))
    writer.close()
    if validated is not None:
        record_validation(Paths(root), validated, {})


def split_names(root: Path) -> dict[str, set[str]]:
    return {name: set(read_documents(root / "data" / "split" / name).column("id").to_pylist()) for name in split.SPLITS}


def test_split_sizes_and_disjoint(tmp_path: Path) -> None:
    write_clean(tmp_path, [doc(i) for i in range(400)])
    summary = split.run(SplitConfig(val_fraction=0.1, test_fraction=0.1, decontaminate_train=False), Paths(tmp_path))
    ids = split_names(tmp_path)
    assert sum(len(v) for v in ids.values()) == 400
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert 20 <= len(ids["val"]) <= 60 and 20 <= len(ids["test"]) <= 60
    assert summary["docs.train"] == len(ids["train"])
    manifest = json.loads((tmp_path / "data" / "split" / "manifest.json").read_text())
    assert manifest["stage"] == "split" and "train/part-00000.parquet" in manifest["files"]


def test_a_document_never_moves_when_the_corpus_grows(tmp_path: Path) -> None:
    cfg = SplitConfig(decontaminate_train=False)
    small, big = tmp_path / "small", tmp_path / "big"
    write_clean(small, [doc(i) for i in range(200)])
    write_clean(big, [doc(i) for i in range(600)][::-1], shard_docs=70)
    split.run(cfg, Paths(small))
    split.run(cfg, Paths(big))
    before, after = split_names(small), split_names(big)
    for name in split.SPLITS:
        assert before[name] <= after[name]


def test_train_documents_sharing_ngrams_with_val_are_dropped(tmp_path: Path) -> None:
    texts = [doc(i) for i in range(300)]
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.0, decontaminate_train=True, ngram=13)
    write_clean(tmp_path, texts)
    split.run(cfg.model_copy(update={"decontaminate_train": False}), Paths(tmp_path))
    val_text = read_documents(tmp_path / "data" / "split" / "val").column("text")[0].as_py()
    leaked = "Some preface words here. " + " ".join(val_text.split()[5:20]) + " and a different ending entirely."
    write_clean(tmp_path, [*texts, leaked])
    if split.assign_splits([doc_id(leaked)], cfg)[0] != "train":
        pytest.skip("the leaked document hashed into val")
    summary = split.run(cfg, Paths(tmp_path))
    assert summary["removed.train_contaminated"] >= 1
    assert doc_id(leaked) not in split_names(tmp_path)["train"]


def test_empty_clean_data_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    write_clean(tmp_path, [])
    with pytest.raises(DataError, match="no documents to split"):
        split.run(SplitConfig(), Paths(tmp_path))
    assert not (tmp_path / "data" / "split").exists()


def test_missing_clean_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory not found"):
        split.run(SplitConfig(), Paths(tmp_path))


@pytest.mark.parametrize("state", ["missing", "failed", "stale"])
def test_split_refuses_data_that_did_not_pass_validation(tmp_path: Path, state: str) -> None:
    write_clean(tmp_path, [doc(i) for i in range(100)], validated=None if state == "missing" else state != "failed")
    if state == "stale":  # validated, then data/clean changed
        write_clean(tmp_path, [doc(i) for i in range(101)], validated=None)
    expected = {"missing": "no validation result", "failed": "validation failed for this data/clean",
                "stale": "for other data than data/clean holds now"}[state]
    with pytest.raises(DataError, match=expected):
        split.run(SplitConfig(decontaminate_train=False), Paths(tmp_path))
    assert not (tmp_path / "data" / "split").exists()


def test_split_cli_refuses_after_a_failed_validation_with_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from lmpipe.cli import main

    write_clean(tmp_path, [doc(i) for i in range(100)], validated=False)
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\nsplit: {decontaminate_train: false}\n")
    assert main(["split", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation failed" in err[0] and err[0].startswith("lmpipe split: error:")
    assert not (tmp_path / "data" / "split").exists()


def test_a_split_left_empty_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    write_clean(tmp_path, [doc(0), doc(1)])
    with pytest.raises(DataError, match=r"split is empty .*raise split\.(val|test)_fraction"):
        split.run(SplitConfig(decontaminate_train=False), Paths(tmp_path))
    assert not (tmp_path / "data" / "split").exists()
