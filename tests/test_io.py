from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmpipe import io as lmpipe_io
from lmpipe.errors import DataError
from lmpipe.io import (
    STAGING_NAME,
    atomic_dir,
    atomic_write,
    config_hash,
    fingerprint_path,
    read_manifest,
    sweep_staging,
    verify_manifest,
    write_json,
    write_manifest,
)


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_swaps_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_records_files_inputs_and_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "input.txt"
    src.write_text("input")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.bin").write_bytes(b"abc")
    first = write_manifest(out, stage="demo", config={"k": 1}, inputs={"input": src}, counts={"docs": 3})
    second = write_manifest(out, stage="demo", config={"k": 1}, inputs={"input": src}, counts={"docs": 3})
    assert first == second
    assert first["files"] == {"x.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert first["config_hash"] == config_hash({"k": 1}) != config_hash({"k": 2})
    assert read_manifest(out)["counts"] == {"docs": 3}
    verify_manifest(out)
    (out / "x.bin").write_bytes(b"abd")
    with pytest.raises(DataError, match="sha256 differs"):
        verify_manifest(out)


def test_missing_manifest_is_incomplete_output(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a complete stage output"):
        read_manifest(tmp_path)


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("1")
    before = fingerprint_path(d)
    (d / "a").write_text("2")
    assert fingerprint_path(d) != before
    write_json(tmp_path / "j.json", {"b": 1})
    assert json.loads((tmp_path / "j.json").read_text()) == {"b": 1}


def test_atomic_dir_fsyncs_every_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data reaches the disk before the rename makes it visible: each file, each directory of the
    new output, and the parent that holds its new name are fsynced."""
    synced: set[int] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(lmpipe_io.os, "fsync", recording_fsync)
    target = tmp_path / "models" / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"2")
    expected = [target / "a.bin", target / "sub" / "b.bin", target / "sub", target, target.parent]
    assert [p for p in expected if p.stat().st_ino not in synced] == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from lmpipe.io import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_killed_stage_leaves_no_temp_dir_in_a_dependency_and_the_next_stage_sweeps_it(tmp_path: Path) -> None:
    """A stage killed while building models/finetune/sft leaves models/finetune (a DVC dep of
    evaluate) as it was; its staging dir, outside, is removed when the next stage starts."""
    from lmpipe.cli import main

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")
    finetune = tmp_path / "models" / "finetune"
    (finetune / "cls").mkdir(parents=True)
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(finetune / "sft"), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert sorted(p.name for p in finetune.iterdir()) == ["cls"]
    staging = tmp_path / STAGING_NAME
    [left] = list(staging.iterdir())
    assert left.name.startswith(f"{child.pid}@")
    live = staging / f"{os.getpid()}@{os.uname().nodename}+x.abc.tmp"  # a running stage's: kept
    live.mkdir()
    assert main(["split", "--root", str(tmp_path)]) == 2  # fails (no data/clean), after the sweep
    assert list(staging.iterdir()) == [live]
    assert sweep_staging(tmp_path) == []
