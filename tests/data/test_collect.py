"""The collect stage end to end: mixture by weight, determinism, atomic output, bad input."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmpipe.cli import main
from lmpipe.config import Paths
from lmpipe.data import collect, sources
from lmpipe.data.collect import mixture_sizes, run
from lmpipe.data.config import CollectConfig
from lmpipe.data.shards import doc_id, read_documents
from lmpipe.errors import ChecksumError, DataError
from lmpipe.io import read_manifest, verify_manifest

MakeConfig = Callable[..., CollectConfig]


def write_lines(path: Path, prefix: str, count: int) -> None:
    path.write_text("".join(json.dumps({"text": f"{prefix} {i}"}) + "\n" for i in range(count)))


def jsonl_source(name: str, file: str, **options: Any) -> dict[str, Any]:
    return {"type": "files", "name": name, "paths": [file], **options}


@pytest.fixture
def two_files(paths: Paths) -> Paths:
    write_lines(paths.root / "a.jsonl", "a", 100)
    write_lines(paths.root / "b.jsonl", "b", 300)
    return paths


def collected(paths: Paths) -> list[dict[str, Any]]:
    return read_documents(paths.raw).to_pylist()


def test_synthetic_default_writes_shards_and_manifest(paths: Paths, collect_config: MakeConfig) -> None:
    cfg = collect_config({"type": "synthetic", "name": "synthetic", "num_docs": 120, "noise_fraction": 0.1},
                         shard_docs=50)
    summary = run(cfg, paths)
    docs = collected(paths)
    assert len(docs) == 132 == summary["docs"] == summary["docs.synthetic"]
    assert summary["bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert summary["shards"] == 3 and summary["skipped_empty"] == 0
    assert all(d["id"] == doc_id(d["text"]) and d["source"] == "synthetic" for d in docs)
    assert {json.loads(d["meta"])["kind"] for d in docs} >= {"story", "review", "instruction", "noise"}
    manifest = verify_manifest(paths.raw)
    assert manifest["stage"] == "collect" and manifest["counts"]["sources"]["synthetic"]["selected"] == 132
    assert sorted(p.name for p in paths.raw.iterdir()) == ["manifest.json", *(f"part-0000{i}.parquet" for i in range(3))]
    assert summary["artifacts"] == [str(paths.raw / "manifest.json")]


def test_equal_weights_take_the_same_number_in_original_order(two_files: Paths, collect_config: MakeConfig) -> None:
    summary = run(collect_config(jsonl_source("a", "a.jsonl"), jsonl_source("b", "b.jsonl")), two_files)
    assert (summary["docs.a"], summary["docs.b"], summary["available.b"]) == (100, 100, 300)
    docs = collected(two_files)
    for name in ("a", "b"):
        numbers = [int(d["text"].split()[1]) for d in docs if d["source"] == name]
        assert numbers == sorted(numbers)  # the sample keeps the source's order
    assert {d["source"] for d in docs[:4]} == {"a", "b"}  # sources are interleaved, not concatenated
    assert json.loads(docs[0]["meta"]) == {"path": "a.jsonl", "line": 1, "fields": {}}
    assert read_manifest(two_files.raw)["inputs"].keys() == {"a:a.jsonl", "b:b.jsonl"}


@pytest.mark.parametrize(("weights", "options", "expected"), [
    ((3.0, 1.0), {}, (100, 33)),            # N = min(100 / 0.75, 300 / 0.25) = 133.3
    ((1.0, 1.0), {"max_docs": 40}, (20, 20)),
    ((1.0, 4.0), {"max_docs": 1000}, (75, 300)),   # b binds: N = 300 / 0.8 = 375
])
def test_mixture_proportions(two_files: Paths, collect_config: MakeConfig, weights: tuple[float, float],
                             options: dict[str, Any], expected: tuple[int, int]) -> None:
    cfg = collect_config(jsonl_source("a", "a.jsonl", weight=weights[0]), jsonl_source("b", "b.jsonl", weight=weights[1]),
                         **options)
    summary = run(cfg, two_files)
    assert (summary["docs.a"], summary["docs.b"]) == expected


def test_source_max_docs_caps_what_is_read(two_files: Paths, collect_config: MakeConfig) -> None:
    cfg = collect_config(jsonl_source("a", "a.jsonl"), jsonl_source("b", "b.jsonl", max_docs=50))
    summary = run(cfg, two_files)
    assert (summary["docs.a"], summary["docs.b"], summary["available.b"]) == (50, 50, 50)
    assert [d["text"] for d in collected(two_files) if d["source"] == "b"] == [f"b {i}" for i in range(50)]


def test_pack_chars_joins_a_sentence_per_row_source_into_documents(paths: Paths, collect_config: MakeConfig) -> None:
    (paths.root / "s.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence number {i:02d}\n"
                                                                   for i in range(30)))
    cfg = collect_config(jsonl_source("s", "s.tsv", text_field="sentence", pack_chars=60, max_docs=5))
    summary = run(cfg, paths)
    docs = collected(paths)
    assert summary["docs.s"] == len(docs) == 5  # max_docs counts the joined documents
    assert docs[0]["text"] == "sentence number 00\nsentence number 01\nsentence number 02\nsentence number 03"
    assert all(len(d["text"]) >= 60 and d["text"].count("\n") == 3 for d in docs)
    assert json.loads(docs[1]["meta"]) == {"path": "s.tsv", "row": 4, "fields": {"label": "0"}, "records": 4}
    run(collect_config(jsonl_source("s", "s.tsv", text_field="sentence", pack_chars=10_000)), paths)
    assert [d["text"].count("\n") for d in collected(paths)] == [29]  # the short rest is one document


def test_same_seed_same_output_other_seed_other_sample(two_files: Paths, collect_config: MakeConfig) -> None:
    def collect(seed: int) -> tuple[dict[str, str], list[str]]:
        run(collect_config(jsonl_source("a", "a.jsonl"), jsonl_source("b", "b.jsonl"), seed=seed), two_files)
        return read_manifest(two_files.raw)["files"], [d["text"] for d in collected(two_files)]

    files, texts = collect(1)
    assert collect(1) == (files, texts)
    assert collect(2)[1] != texts


@given(available=st.lists(st.integers(1, 10_000), min_size=1, max_size=5),
       weights=st.lists(st.floats(0.01, 100), min_size=5, max_size=5),
       max_docs=st.one_of(st.none(), st.integers(1, 20_000)))
def test_mixture_sizes_properties(available: list[int], weights: list[float], max_docs: int | None) -> None:
    weights = weights[: len(available)]
    sizes = mixture_sizes(available, weights, max_docs)
    shares = [w / sum(weights) for w in weights]
    size = min([a / p for a, p in zip(available, shares, strict=True)] + ([max_docs] if max_docs else []))
    assert sum(sizes) == math.floor(size + 1e-9)
    assert all(0 <= n <= a and abs(n - size * p) < 1 + 1e-6 for n, a, p in zip(sizes, available, shares, strict=True))


def test_empty_texts_are_skipped_and_counted(paths: Paths, collect_config: MakeConfig) -> None:
    (paths.root / "a.jsonl").write_text('{"text": "kept"}\n{"text": null}\n{"text": ""}\n')
    summary = run(collect_config(jsonl_source("a", "a.jsonl")), paths)
    assert (summary["docs"], summary["skipped_empty"], summary["skipped_empty.a"]) == (1, 2, 2)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: not valid UTF-8 at byte offset 13"),
    (b"", "bad.jsonl: file is empty"),
    (b'{"body": "x"}\n', "bad.jsonl:1: no field 'text' (fields: body)"),
    (b'{"text": null}\n', "source 'bad' produced no documents (1 empty texts skipped)"),
])
def test_bad_input_fails_and_writes_nothing(two_files: Paths, collect_config: MakeConfig, content: bytes,
                                            message: str) -> None:
    (two_files.root / "bad.jsonl").write_bytes(content)
    cfg = collect_config(jsonl_source("a", "a.jsonl"), jsonl_source("bad", "bad.jsonl"))
    with pytest.raises(DataError, match=message.replace("(", "\\(").replace(")", "\\)")):
        run(cfg, two_files)
    assert not two_files.raw.exists()
    assert list(two_files.raw.parent.iterdir()) == []  # no temporary directory left behind


def test_failed_run_keeps_the_previous_output(two_files: Paths, collect_config: MakeConfig) -> None:
    run(collect_config(jsonl_source("a", "a.jsonl")), two_files)
    before = read_manifest(two_files.raw)
    with pytest.raises(DataError, match="no file matches 'missing/\\*.jsonl'"):
        run(collect_config(jsonl_source("a", "missing/*.jsonl")), two_files)
    assert read_manifest(two_files.raw) == before


def test_url_checksum_mismatch_writes_nothing(paths: Paths, collect_config: MakeConfig, file_server: Any) -> None:
    body = b'{"text": "downloaded"}\n'
    file_server.files["/d.jsonl"] = body
    cfg = collect_config({"type": "url", "name": "web", "url": file_server.url("/d.jsonl"),
                          "sha256": hashlib.sha256(b"something else").hexdigest(),
                          "allow_networks": ["127.0.0.1/32"]})  # the test server is on loopback
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        run(cfg, paths)
    assert not paths.raw.exists()
    cfg.sources[0].sha256 = hashlib.sha256(body).hexdigest()
    assert run(cfg, paths)["docs.web"] == 1


def test_cli_runs_collect_and_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text(
        "tracking: {enabled: false}\ncollect:\n  sources:\n    - {type: synthetic, name: syn, num_docs: 30}\n")
    assert main(["collect", "--root", str(tmp_path)]) == 0
    assert len(read_documents(tmp_path / "data" / "raw")) == 30 + round(0.15 * 30)
    code = main(["collect", "--root", str(tmp_path), "-S",
                 'collect.sources=[{type: files, name: f, paths: ["nothing/*.txt"]}]'])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("lmpipe collect: error: collect.sources.f.paths: no file matches 'nothing/*.txt' (paths are relative "
                   f"to the project root {tmp_path})")


def _not_on_the_driver(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("read in the driver process")


def _raw_bytes(paths: Paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(paths.raw.iterdir())}


def _collect_on(kind: str, cfg: CollectConfig, paths: Paths) -> tuple[dict[str, Any], dict[str, bytes]]:
    from lmpipe import engine

    with engine.use(engine.EngineConfig(kind=kind)):  # type: ignore[arg-type]
        summary = run(cfg, paths)
    return summary, _raw_bytes(paths)


@pytest.mark.slow
def test_ray_engine_collects_the_same_bytes_and_errors(paths: Paths, collect_config: MakeConfig,
                                                       ray_cluster: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files (jsonl, txt, parquet, csv), a saved HF dataset (in row ranges) and the synthetic source
    read as Ray tasks give data/raw and its manifest byte for byte, also where max_docs stops a source inside a
    file with empty texts; a malformed line fails with the local engine's path:line error."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", paths.root / "hf-cache")
    root = paths.root
    (root / "web").mkdir()
    for k in range(3):
        rows = [{"text": f"page {k} line {i}" if i % 7 else "", "n": i} for i in range(40)]
        (root / "web" / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "books.txt").write_text("".join(f"Chapter {i}.\nIt went on.\n\n" for i in range(30)))
    pq.write_table(pa.table({"text": [f"review {i}" for i in range(50)], "label": [i % 2 for i in range(50)]}),
                   root / "reviews.parquet")
    (root / "facts.csv").write_text("id,text\n" + "".join(f'{i},"fact, {i}"\n' for i in range(25)))
    datasets.Dataset.from_dict({"text": [f"hub row {i}" for i in range(30)], "label": list(range(30))}) \
        .save_to_disk(str(root / "saved"))
    cfg = collect_config(
        {"type": "files", "name": "web", "paths": ["web/*.jsonl"], "max_docs": 50},  # stops inside web/1.jsonl
        {"type": "files", "name": "mixed", "paths": ["books.txt", "reviews.parquet", "facts.csv"]},
        {"type": "hf", "name": "hub", "path": "saved"},
        {"type": "synthetic", "name": "syn", "num_docs": 40},
        shard_docs=64)
    local_summary, local_files = _collect_on("local", cfg, paths)
    assert local_summary["skipped_empty.web"] == 6 + 3 and local_summary["docs.mixed"] > 0
    with monkeypatch.context() as driver:  # the driver reads nothing itself: Ray tasks read every source
        for module, name in ((sources, "read_file"), (collect, "read_hf_source"), (collect, "generate")):
            driver.setattr(module, name, _not_on_the_driver)
        driver.setattr(collect, "HF_PART_ROWS", 8)  # the 30 hub rows in 4 tasks
        ray_summary, ray_files = _collect_on("ray", cfg, paths)
    assert ray_summary == local_summary
    assert ray_files == local_files  # every shard and the manifest, byte for byte

    (root / "web" / "1.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    errors = []
    for kind in ("local", "ray"):
        with pytest.raises(DataError) as caught:
            _collect_on(kind, collect_config({"type": "files", "name": "web", "paths": ["web/*.jsonl"]}), paths)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "web/1.jsonl:2: not valid JSON" in errors[0]
    assert _raw_bytes(paths) == local_files  # a failed run leaves the previous output
