"""clean on Ray Data against the local engine: the same documents, report and manifest; the
distributed near-dedup resolution against the local streaming index; the engine section."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_clean import GOOD, config, write_raw
from test_dedup import near_signatures

from lmpipe import engine
from lmpipe.config import Paths, load_params
from lmpipe.data import clean, ray_clean
from lmpipe.data.dedup import NearDuplicateIndex, band_hashes, bucket_pairs
from lmpipe.data.shards import read_documents
from lmpipe.data.synthetic import generate
from lmpipe.errors import ConfigError, DataError, LmpipeError
from lmpipe.io import read_manifest


def _edges_by_bucket(sigs: np.ndarray, near: NearDuplicateIndex, cells: int = 1 << 25) -> pa.Table:
    """What the Ray pipeline's band shuffle feeds :func:`ray_clean.near_partition`: three
    partitions by band hash, and (``cells``) each bucket's comparisons done that many at a time."""
    table = ray_clean.band_rows(pa.table({"order": pa.array(np.arange(len(sigs), dtype=np.int64)),
                                          "sig": pa.array([s.tobytes() for s in sigs], pa.binary())}),
                                sigs.shape[1], near.bands, near.rows)
    table = ray_clean.with_part(table, "bucket", 3)
    part = table.column("part").to_numpy()
    if cells == 1 << 25:
        return pa.concat_tables([ray_clean.near_partition(table.filter(pa.array(part == p)), sigs.shape[1],
                                                          near.min_equal) for p in range(3)])
    buckets = table.column("bucket").to_numpy()
    return pa.concat_tables([bucket_pairs(table.filter(pa.array(buckets == b)), sigs.shape[1], near.min_equal, cells)
                             for b in np.unique(buckets)])


def test_distributed_near_dedup_matches_the_streaming_index() -> None:
    """Band shuffle + verified pairs + keep-first resolution == the local index, removals and references."""
    num_perm = 128
    all_sigs = near_signatures(num_perm)
    local = NearDuplicateIndex(0.8, num_perm)
    expected = local.add(all_sigs)
    removed, dup_of = ray_clean.resolve_near(_edges_by_bucket(all_sigs, NearDuplicateIndex(0.8, num_perm)))
    got = np.full(len(all_sigs), -1, np.int64)
    got[removed] = dup_of
    assert 20 < (expected >= 0).sum() < 120
    np.testing.assert_array_equal(got, expected)
    one_row_at_a_time = _edges_by_bucket(all_sigs, NearDuplicateIndex(0.8, num_perm), cells=1)
    assert ray_clean.resolve_near(one_row_at_a_time)[0].tolist() == removed.tolist()
    assert len(band_hashes(all_sigs[:1], local.bands, local.rows)[0]) == local.bands


def test_chain_keeps_the_far_end() -> None:
    # a(0) ~ b(1), b ~ c(2), a !~ c: b is removed as a duplicate of a, so c matches no kept document
    edges = pa.table({"lo": [0, 1], "hi": [1, 2], "band": [0, 0]}, schema=ray_clean.EDGE_SCHEMA)
    removed, dup_of = ray_clean.resolve_near(edges)
    assert removed.tolist() == [1] and dup_of.tolist() == [0]


def test_shard_plan_cuts_the_kept_rows_of_consecutive_chunks_into_full_shards() -> None:
    plan = ray_clean.shard_plan({0: 5, 1: 0, 2: 7, 4: 3}, shard_docs=4)
    pieces = [json.loads(item["pieces"]) for item in plan]
    assert [item["shard"] for item in plan] == [0, 1, 2, 3]
    assert pieces == [[[0, 0, 4]], [[0, 4, 5], [2, 0, 3]], [[2, 3, 7]], [[4, 0, 3]]]
    assert ray_clean.shard_plan({}, shard_docs=4) == []


def test_filter_task_stages_the_text_and_returns_small_rows(tmp_path: Path) -> None:
    """The filter task's rows carry no text, and its per-chunk stats row not the chunk either (a
    pickled zero-row slice of a table would carry all of its buffers)."""
    paths = Paths(tmp_path)
    texts = _corpus()
    write_raw(paths, texts, shard_docs=len(texts))
    raw = sorted(paths.raw.glob("*.parquet"))[0]
    stage = tmp_path / "stage"
    stage.mkdir()
    out = ray_clean.filter_chunks(pa.table({"path": [str(raw)], "row_group": [0], "chunk": [3], "first_row": [0]}),
                                  config(workers=1), [], str(stage), lsh=(14, 9))
    docs, stats = ray_clean._documents(out), ray_clean._stats(out)
    staged = pq.read_table(stage / "chunk-000003.parquet")
    assert docs.num_rows == staged.num_rows > 100 and "text" not in docs.column_names
    assert docs.column("order").to_pylist() == [(3 << 32) + row for row in range(docs.num_rows)]
    assert docs.column("id").to_pylist() == staged.column("id").to_pylist()
    assert len(stats.column("stats")[0].as_py()) < sum(map(len, texts)) / 10
    assert [len(b) for b in docs.column("bands").to_pylist()] == [14 * 8] * docs.num_rows


def _corpus() -> list[str]:
    texts = [t for t, _ in generate(240, noise_fraction=0.2, seed=3)]
    story = " ".join(GOOD)
    injected = [story, story.upper(), story.replace("at seven", "at eight"),  # exact (case) and near copies
                story.replace("at seven", "at nine").replace("three minutes", "two minutes"), GOOD[1], GOOD[1]]
    return texts[:100] + injected + texts[100:]


@pytest.mark.slow
def test_ray_and_local_keep_the_same_documents(tmp_path: Path, ray_cluster: object) -> None:
    texts = _corpus()
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": " ".join(texts[30].split()[:40])}) + "\n")
    variants = [
        {"decontaminate": {"eval_files": ["../eval.jsonl"]}},  # every rule, the eval index broadcast
        {"exact_dedup": {"enabled": False}},  # near dedup sees the exact copies too
        {"near_dedup": {"enabled": False}, "pii": {"enabled": False}},
        {"length": {"min_chars": 10**6, "max_chars": 2 * 10**6}},  # nothing kept: one empty shard
    ]
    for variant in variants:
        outputs = []
        for kind in ("local", "ray"):
            paths = Paths(tmp_path / kind)
            if not paths.raw.exists():
                write_raw(paths, texts, shard_docs=70)  # 5 raw shards: 5 Ray tasks
            cfg = config(workers=1, shard_docs=60, **variant)
            with engine.use(engine.EngineConfig(kind=kind)):  # type: ignore[arg-type]
                summary = clean.run(cfg, paths)
            assert summary["docs_out"] > 100 or variant is variants[-1]
            outputs.append((read_documents(paths.clean).to_pylist(),
                            (paths.clean / "clean_report.json").read_text(), read_manifest(paths.clean), summary))
        (local_docs, local_report, local_manifest, local_sum), (ray_docs, ray_report, ray_manifest, ray_sum) = outputs
        if variant is variants[0]:
            assert local_sum["removed.exact_dedup"] >= 2 and local_sum["removed.near_dedup"] >= 2
            assert local_sum["removed.decontaminate"] >= 1
        assert [d["text"] for d in ray_docs] == [d["text"] for d in local_docs], variant
        assert ray_docs == local_docs
        assert ray_report == local_report
        # engine is operational: config hash, inputs and every file's sha256 agree
        assert ray_manifest == local_manifest
        assert {k: v for k, v in ray_sum.items() if k.startswith(("docs_", "bytes_", "removed."))} == \
            {k: v for k, v in local_sum.items() if k.startswith(("docs_", "bytes_", "removed."))}


@pytest.mark.slow
def test_only_empty_raw_shards(tmp_path: Path, ray_cluster: object) -> None:
    files = []
    for kind in ("local", "ray"):
        paths = Paths(tmp_path / kind)
        write_raw(paths, [])
        with engine.use(engine.EngineConfig(kind=kind)):  # type: ignore[arg-type]
            assert clean.run(config(), paths)["docs_out"] == 0
        files.append(read_manifest(paths.clean)["files"])
    assert files[0] == files[1] and "part-00000.parquet" in files[0]


@pytest.mark.slow
def test_bad_input_gives_the_local_engines_error(tmp_path: Path, ray_cluster: object) -> None:
    """A DataError raised in a Ray task reaches the caller as the same one-line DataError."""
    messages = []
    for kind in ("local", "ray"):
        paths = Paths(tmp_path / kind)
        write_raw(paths, GOOD)
        table = pq.read_table(paths.raw / "part-00000.parquet")
        pq.write_table(table.set_column(3, "meta", pa.array(["{}", "[1]", "{}"])), paths.raw / "part-00000.parquet")
        with engine.use(engine.EngineConfig(kind=kind)), pytest.raises(DataError) as err:  # type: ignore[arg-type]
            clean.run(config(workers=1), paths)
        messages.append(str(err.value).replace(str(paths.root), "ROOT"))
        assert not paths.clean.exists()
    assert messages[0] == messages[1] == "ROOT/data/raw/part-00000.parquet: row 1: meta is not a JSON object (re-run collect)"


def test_engine_section_is_validated(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("engine: {kind: ray, address: 'ray://head:10001'}\n")
    assert load_params(params, sections=["engine"]).engine.address == "ray://head:10001"
    for bad in ("engine: {kind: spark}", "engine: {address: 'head'}"):
        params.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=r"engine\.(kind|address)"):
            load_params(params, sections=["engine"])


@pytest.mark.parametrize("stage", ["clean", "validate"])
def test_unreachable_address_fails_fast_with_one_line(tmp_path: Path, stage: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lmpipe.cli", stage, "-S", "engine.kind=ray",
                           "-S", "engine.address=127.0.0.1:9", "-S", "tracking.enabled=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9" in lines[0] and "engine.address" in lines[0], proc.stderr


def test_engine_is_no_stages_dvc_param(repo_root: Path) -> None:
    """Switching engines must not rerun a stage: no stage of dvc.yaml lists the engine section."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    listed = [(name, p) for name, stage in stages.items() for entry in stage.get("params", [])
              for p in (entry if isinstance(entry, dict) else {entry: None})]
    assert ("clean", "clean") in listed
    assert not [item for item in listed if str(item[1]).split(".")[0] == "engine"]


def _kill_tasks(name: str, stop: threading.Event, killed: list[int]) -> None:
    """Kill (SIGKILL) every Ray worker process while it runs a task of ``name``, as a crashed or
    OOM-killed worker would die, until ``stop`` is set."""
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("ray::") and name in cmdline and proc.info["pid"] not in killed:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    killed.append(proc.info["pid"])
        time.sleep(0.01)


@pytest.mark.slow
def test_worker_lost_mid_stage_fails_without_partial_output(tmp_path: Path, ray_cluster: object) -> None:
    """Every attempt of a filter task loses its worker: after Ray's retries the stage fails with one
    line, and the previous data/clean and its manifest are untouched."""
    paths = Paths(tmp_path)
    write_raw(paths, _corpus()[:60], shard_docs=30)
    cfg = config(workers=1, shard_docs=60)
    clean.run(cfg, paths)  # the previous output, from the local engine
    before = {p.name: p.read_bytes() for p in paths.clean.iterdir()}
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_tasks, args=("filter_chunks", stop, killed), daemon=True)
    killer.start()
    try:
        with engine.use(engine.EngineConfig(kind="ray")), pytest.raises(LmpipeError) as err:
            clean.run(cfg, paths)
    finally:
        stop.set()
        killer.join()
    assert len(killed) > engine.MAX_RETRIES  # the first attempt and every retry
    message = str(err.value)
    assert "\n" not in message and "worker" in message and "clean" in message, message
    assert {p.name: p.read_bytes() for p in paths.clean.iterdir()} == before
    assert sorted(p.name for p in tmp_path.joinpath("data").iterdir()) == ["clean", "raw"]  # no temporary left
