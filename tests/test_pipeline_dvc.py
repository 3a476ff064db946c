"""End to end through DVC: a fresh project reproduces, skips when unchanged, reruns what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def dvc(project: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo_root_module: Path) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        if (repo_root_module / name).exists():
            shutil.copy(repo_root_module / name, root / name)
    shutil.copytree(repo_root_module / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    # a small corpus keeps the test quick; everything else is the shipped params.yaml
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["collect"]["sources"][0]["num_docs"] = 600
    data["validate"]["min_docs"] = 50
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def repo_root_module() -> Path:
    return Path(__file__).resolve().parents[1]


# The data and tokenizer half of the pipeline; training stages have their own tests.
TARGET = "tokenize"
DATA_STAGES = ("collect", "clean", "validate", "split", "tokenizer", "tokenize")


def test_repro_runs_every_stage_then_nothing(project: Path) -> None:
    out = dvc(project, "repro", TARGET)
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in out
    assert (project / "data" / "clean" / "clean_report.json").is_file()
    assert (project / "data" / "split" / "train").is_dir()
    assert (project / "data" / "tokens" / "meta.json").is_file()
    again = dvc(project, "repro", TARGET)
    assert "Running stage" not in again


def test_changing_a_clean_param_reruns_clean_not_collect(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["clean"]["near_dedup"]["threshold"] = 0.7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", TARGET)
    assert "Running stage 'collect'" not in out
    assert "Running stage 'clean'" in out


def test_changing_vocab_size_reruns_tokenizer_and_tokenize_only(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 1024
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", TARGET)
    for stage in ("collect", "clean", "validate", "split"):
        assert f"Running stage '{stage}'" not in out
    assert "Running stage 'tokenizer'" in out and "Running stage 'tokenize'" in out
