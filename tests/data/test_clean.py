"""The clean stage end to end: output schema, report and summary, dedup and decontamination in
the stage, ids and meta, atomic output, parallel workers, and the synthetic corpus' noise."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmpipe.config import Paths
from lmpipe.data import clean
from lmpipe.data.config import CleanConfig
from lmpipe.data.shards import SCHEMA, ShardWriter, doc_id, make_table, read_documents
from lmpipe.data.synthetic import generate
from lmpipe.errors import ConfigError, DataError
from lmpipe.io import read_manifest, verify_manifest

GOOD = [
    "The ferry left the harbour at seven, and the passengers watched the town grow small behind them. "
    "A boy with a red kite stood at the rail and told everyone that he was going to see his grandmother. "
    "She lived on the island with two goats and a garden full of beans, and she had promised to teach "
    "him how to fish from the rocks before the summer was over.",
    "The new library opened on Monday with a reading hour for children and a small exhibition of old "
    "maps. Volunteers had spent months cleaning the shelves and sorting donated books by subject. The "
    "mayor thanked them in a short speech, and then the doors opened and the first visitors went "
    "straight to the comics, which had been the most requested section in the survey.",
    "I have used this kettle every morning for a year and it still works well. It boils a full jug in "
    "about three minutes, the lid closes firmly, and the handle stays cool. The only thing that bothers "
    "me is the beep when it finishes, which is loud enough to wake the whole house, so I would not buy "
    "it again for that reason alone.",
]
CHINESE = ("早上，孩子们一起走路去村里的学校。面包店的老板每天早上六点开门。夏天，很多家庭会去海边度假。"
           "下雨以后，森林里有青苔和泥土的味道。我的爷爷喜欢讲他年轻时在农村的故事。今天去上海的火车晚点了二十分钟。")


def write_raw(paths: Paths, texts: list[str], metas: list[dict[str, Any]] | None = None, shard_docs: int = 1000) -> None:
    metas = metas or [{} for _ in texts]
    writer = ShardWriter(paths.raw, shard_docs)
    writer.write(make_table([doc_id(t) for t in texts], texts, ["test"] * len(texts), [json.dumps(m) for m in metas]))
    writer.close()


def config(**data: Any) -> CleanConfig:
    return CleanConfig.model_validate(data)


def test_output_schema_report_and_summary(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    texts = [*GOOD, GOOD[0].upper(), "Too short.", CHINESE]
    write_raw(paths, texts, [{"kind": "story", "n": 1}, {}, {}, {}, {}, {}])
    summary = clean.run(config(shard_docs=2), paths)

    files = sorted(p.name for p in paths.clean.iterdir())
    assert files == ["clean_report.json", "manifest.json", "part-00000.parquet", "part-00001.parquet"]
    assert all(pq.read_schema(paths.clean / f).equals(SCHEMA) for f in files if f.endswith(".parquet"))
    manifest = verify_manifest(paths.clean)
    assert manifest["stage"] == "clean" and set(manifest["inputs"]) == {"raw"}
    assert manifest["counts"] == {"docs_in": 6, "bytes_in": summary["bytes_in"], "docs_out": 3, "bytes_out": summary["bytes_out"]}

    docs = read_documents(paths.clean).to_pylist()
    assert [d["text"] for d in docs] == GOOD
    assert [json.loads(d["meta"]) for d in docs] == [{"kind": "story", "n": 1, "lang": "en"}, {"lang": "en"}, {"lang": "en"}]
    assert [d["id"] for d in docs] == [doc_id(t) for t in GOOD]

    report = json.loads((paths.clean / "clean_report.json").read_text())
    assert summary["artifacts"] == [str(paths.clean / "clean_report.json")]
    assert list(report["removed"]) == clean.rule_names(CleanConfig())
    removed = {k: v for k, v in summary.items() if k.startswith("removed.")}
    assert removed == {f"removed.{name}": entry["docs"] for name, entry in report["removed"].items()}
    assert summary["docs_in"] - sum(removed.values()) == summary["docs_out"] == 3
    assert (summary["removed.exact_dedup"], summary["removed.length.min_chars"], summary["removed.language"]) == (1, 1, 1)
    assert report["input"] == {"docs": 6, "bytes": sum(len(t.encode()) for t in texts)}
    assert report["output"] == {"docs": 3, "bytes": sum(len(t.encode()) for t in GOOD)}
    assert sum(g["docs"] for g in report["groups"].values()) == 3
    assert report["removed"]["exact_dedup"]["examples"] == [
        {"id": doc_id(GOOD[0].upper()), "text": GOOD[0].upper()[:200], "duplicate_of": doc_id(GOOD[0])}]
    assert report["removed"]["language"]["examples"][0]["lang"] == "zh"
    assert report["languages"] == {"en": 3}
    no_exact = clean.run(config(exact_dedup={"enabled": False}), paths)  # near dedup still sees it
    assert (no_exact["removed.exact_dedup"], no_exact["removed.near_dedup"], no_exact["docs_out"]) == (0, 1, 3)
    no_dedup = clean.run(config(exact_dedup={"enabled": False}, near_dedup={"enabled": False}), paths)
    assert no_dedup["docs_out"] == 4
    assert all(isinstance(v, int | float) for k, v in summary.items() if k != "artifacts")


def test_near_duplicates_and_pii_in_the_stage(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    story = " ".join(GOOD)
    near = story.replace("at seven", "at eight").replace("three minutes", "two minutes")
    with_pii = GOOD[2] + " Questions? Write to sam.berg@example.com or call (415) 555-0199."
    write_raw(paths, [story, GOOD[1], near, with_pii])
    summary = clean.run(config(), paths)
    docs = read_documents(paths.clean).to_pylist()
    assert [d["text"] for d in docs] == [story, GOOD[1], with_pii.replace("sam.berg@example.com", "<EMAIL>")
                                         .replace("(415) 555-0199", "<PHONE>")]
    assert summary["removed.near_dedup"] == 1 and summary["pii.docs_modified"] == 1
    assert (summary["pii.email"], summary["pii.phone"], summary["pii.ip"]) == (1, 1, 0)
    assert docs[2]["id"] == doc_id(docs[2]["text"]) and json.loads(docs[2]["meta"])["raw_id"] == doc_id(with_pii)
    report = json.loads((paths.clean / "clean_report.json").read_text())
    assert report["removed"]["near_dedup"]["examples"][0]["duplicate_of"] == doc_id(story)
    assert report["lsh"] == {"enabled": True, "bands": 14, "rows": 9}

    off = clean.run(config(near_dedup={"enabled": False}, pii={"enabled": False}), paths)
    assert [d["text"] for d in read_documents(paths.clean).to_pylist()] == [story, GOOD[1], near, with_pii]
    assert off["removed.near_dedup"] == 0 and off["pii.docs_modified"] == 0
    assert json.loads((paths.clean / "clean_report.json").read_text())["lsh"] == {"enabled": False}


def test_decontamination_against_eval_files(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "qa.jsonl").write_text(json.dumps({"text": " ".join(GOOD[1].split()[10:30])}) + "\n")
    write_raw(paths, GOOD)
    summary = clean.run(config(decontaminate={"eval_files": ["evals/*.jsonl"]}), paths)
    assert summary["removed.decontaminate"] == 1
    assert [d["text"] for d in read_documents(paths.clean).to_pylist()] == [GOOD[0], GOOD[2]]
    assert set(read_manifest(paths.clean)["inputs"]) == {"raw", "eval:evals/qa.jsonl"}
    off = clean.run(config(decontaminate={"enabled": False, "eval_files": ["evals/*.jsonl"]}), paths)
    assert off["docs_out"] == 3


def test_english_and_chinese_with_keep_en_zh(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    write_raw(paths, [GOOD[0], CHINESE, GOOD[1]])
    clean.run(config(language={"keep": ["en", "zh"]}), paths)
    docs = read_documents(paths.clean).to_pylist()
    assert [(d["text"], json.loads(d["meta"])["lang"]) for d in docs] == [(GOOD[0], "en"), (CHINESE, "zh"), (GOOD[1], "en")]


def test_interrupted_run_leaves_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    write_raw(paths, GOOD)
    clean.run(config(), paths)
    before = sorted(p.name for p in paths.clean.iterdir())
    # several chunks and shards: the bad meta is met after output has been written
    monkeypatch.setattr(clean, "CHUNK_BYTES", 500)
    shutil.rmtree(paths.raw)
    write_raw(paths, GOOD * 2, [{}] * 5 + [["not", "an", "object"]])
    with pytest.raises(DataError, match=r"part-00000.parquet: row 5: meta is not a JSON object"):
        clean.run(config(shard_docs=1, exact_dedup={"enabled": False}, near_dedup={"enabled": False}), paths)
    assert sorted(p.name for p in paths.clean.iterdir()) == before
    assert sorted(p.name for p in paths.clean.parent.iterdir()) == ["clean", "raw"]  # no temp dir left
    shutil.rmtree(paths.clean)
    with pytest.raises(DataError):
        clean.run(config(shard_docs=1), paths)
    assert not paths.clean.exists()


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data/raw: directory not found"):
        clean.run(config(), Paths(tmp_path))
    write_raw(Paths(tmp_path), GOOD)
    with pytest.raises(ConfigError, match="clean.repetition.dup_ngram_char_fraction: n-gram sizes must be >= 1"):
        clean.run(config(repetition={"dup_ngram_char_fraction": {0: 0.1}}), Paths(tmp_path))
    with pytest.raises(DataError, match="'evals/none.txt' matches no file"):
        clean.run(config(decontaminate={"eval_files": ["evals/none.txt"]}), Paths(tmp_path))


@pytest.mark.slow
def test_parallel_workers_give_the_same_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [t for t, _ in generate(300, noise_fraction=0.2, seed=3)]
    monkeypatch.setattr(clean, "CHUNK_BYTES", 20_000)  # ~10 chunks over 2 shards
    outputs = []
    for workers in (1, 2):
        paths = Paths(tmp_path / f"w{workers}")
        write_raw(paths, texts, shard_docs=200)
        summary = clean.run(config(workers=workers, shard_docs=100), paths)
        assert summary["workers"] == workers
        outputs.append((read_documents(paths.clean).to_pylist(), (paths.clean / "clean_report.json").read_text(),
                        read_manifest(paths.clean)["files"]))
    assert outputs[0] == outputs[1]


def test_synthetic_corpus_noise_is_removed_and_good_docs_kept(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    records = list(generate(900, noise_fraction=0.15, seed=7))
    write_raw(paths, [t for t, _ in records], [m for _, m in records])
    summary = clean.run(config(), paths)
    kept = Counter(json.loads(d["meta"]).get("noise", "good") for d in read_documents(paths.clean).to_pylist())
    given = Counter(m.get("noise", "good") for _, m in records)
    assert kept["good"] >= 0.99 * given["good"]
    assert set(kept) <= {"good", "pii"} and kept["pii"] == given["pii"]  # PII documents are redacted, not dropped
    assert summary["pii.docs_modified"] == given["pii"]
    out = read_documents(paths.clean).column("text").to_pylist()
    assert not any("@example.com" in t or "@mailbox.org" in t for t in out)

    # cleaning clean data changes nothing
    again = Paths(tmp_path / "again")
    shutil.copytree(paths.clean, again.raw)
    assert clean.run(config(), again)["docs_out"] == summary["docs_out"]
    assert read_documents(again.clean).column("text").to_pylist() == out


def test_c4_lines_in_the_stage_feed_dedup_and_the_report(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    page = " ".join(GOOD[:2])
    texts = [page + "\nShare this page", "Home | News\n" + page + "\nWe use cookies on this site, as most sites do.",
             page + "[4]", GOOD[2]]
    write_raw(paths, texts)
    summary = clean.run(config(lines={"enabled": True}), paths)
    docs = read_documents(paths.clean).to_pylist()
    # the pages read the same once boilerplate lines and citations are gone: exact dedup sees the new text
    assert [d["text"] for d in docs] == [page]
    assert docs[0]["id"] == doc_id(page) and json.loads(docs[0]["meta"])["raw_id"] == doc_id(texts[0])
    assert (summary["removed.exact_dedup"], summary["removed.lines.min_sentences"]) == (2, 1)
    report = json.loads((paths.clean / "clean_report.json").read_text())
    assert report["lines"] == {"enabled": True, "lines_removed": {
        "lines.max_word_length": 0, "lines.terminal_punctuation": 2, "lines.min_words_per_line": 0,
        "lines.javascript": 0, "lines.policy": 1}}
    assert report["groups"]["lines"] == {"enabled": True, "docs": 1, "bytes": len(GOOD[2].encode())}
    # a citation removed, no line: the rebuilt text is still what dedup reads
    write_raw(paths, [page, page + "[4]"])
    assert clean.run(config(lines={"enabled": True}), paths)["removed.exact_dedup"] == 1


def test_spilled_near_dedup_keeps_the_in_memory_documents(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A corpus past near_dedup.memory_mb spills its LSH bands to disk: the same kept documents,
    report and output files as the in-memory index, and no spill left behind."""
    texts = [t for t, _ in generate(1000, noise_fraction=0.1, seed=5)]
    story = " ".join(GOOD)
    near = [story, story.replace("at seven", "at eight"), GOOD[1], GOOD[1].replace("Monday", "Tuesday"),
            story.replace("at seven", "at nine").replace("three minutes", "two minutes")]
    texts = texts[:300] + near[:2] + texts[300:700] + near[2:] + texts[700:]
    outputs = []
    for name, budget in (("memory", 4096), ("spill", 1)):  # 1 MB: ~1,000 documents' index does not fit
        paths = Paths(tmp_path / name)
        write_raw(paths, texts, shard_docs=400)
        caplog.clear()
        with caplog.at_level("INFO", logger="lmpipe.data.clean"):
            summary = clean.run(config(workers=1, shard_docs=300, near_dedup={"memory_mb": budget}), paths)
        assert ("spilling" in caplog.text) == (name == "spill")
        files = read_manifest(paths.clean)["files"]
        outputs.append((read_documents(paths.clean).to_pylist(), json.loads((paths.clean / "clean_report.json")
                                                                            .read_text()), files, summary))
        assert sorted(p.name for p in (tmp_path / name / "data").iterdir()) == ["clean", "raw"]
    (mem_docs, mem_report, mem_files, mem_sum), (sp_docs, sp_report, sp_files, sp_sum) = outputs
    assert mem_sum["removed.near_dedup"] >= 2
    assert sp_docs == mem_docs
    assert sp_report == mem_report
    assert sp_files == mem_files


def test_shard_bytes_do_not_depend_on_how_the_rows_arrive(tmp_path: Path) -> None:
    """A shard past parquet's 1 MB page gets the same bytes from one table or many (as the local
    engine's chunks and the Ray engine's groups deliver them): engine.kind changes no hash."""
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{x}" for x in rng.integers(0, 5000, 150)) for _ in range(2000)]  # 1.7 MB
    table = make_table([doc_id(t) for t in texts], texts, ["test"] * len(texts), ["{}"] * len(texts))
    whole, pieces = ShardWriter(tmp_path / "whole", 10**6), ShardWriter(tmp_path / "pieces", 10**6)
    whole.write(table)
    for start in range(0, table.num_rows, 500):
        pieces.write(table.slice(start, 500))
    assert whole.close()[0].read_bytes() == pieces.close()[0].read_bytes()
