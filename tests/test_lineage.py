"""Lineage: every module a stage imports and every file named in params is one of its DVC deps."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmpipe import lineage
from lmpipe.config import Paths, load_params
from lmpipe.stages import STAGE_LIST, STAGES

REPO = Path(__file__).resolve().parents[1]


def dvc_deps(stage: str) -> set[str]:
    body = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    return set(body.get("do", body).get("deps", []))


def test_dvc_yaml_code_deps_are_exactly_what_each_stage_imports() -> None:
    assert lineage.check_dvc_yaml(REPO) == []


# What the process of `lmpipe <stage>` has imported once it has loaded its params and its module.
_PROBE = """
import importlib, json, sys
from lmpipe import cli
from lmpipe.stages import STAGES
stage = STAGES[sys.argv[1]]
cli.stage_config(stage, sys.argv[2])
importlib.import_module(stage.module)
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()
                        if (n == "lmpipe" or n.startswith("lmpipe.")) and getattr(m, "__file__", None))))
"""


def _probe(stage: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", _PROBE, stage, str(REPO / "params.yaml")], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def probes(request: pytest.FixtureRequest) -> Iterator[dict[str, concurrent.futures.Future[Any]]]:
    """The selected stages' probe processes, two at a time (each is one fresh interpreter importing
    its stage; most of the time is importing torch, which two cores do side by side)."""
    selected = [item.callspec.params["stage"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_every_module_a_stage_process_imports_is_a_dvc_dep"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {stage: pool.submit(_probe, stage) for stage in selected}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s.name for s in STAGE_LIST])
def test_every_module_a_stage_process_imports_is_a_dvc_dep(stage: str, probes: dict[str, Any]) -> None:
    proc = probes[stage].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {str(Path(f).resolve().relative_to(REPO)) for f in json.loads(proc.stdout)}
    assert imported, "the probe saw no lmpipe module"
    missing = sorted(imported - dvc_deps(stage))
    assert not missing, f"{stage} imports modules dvc.yaml does not list: {missing}"


def test_data_stages_import_no_model_or_training_code() -> None:
    for name in ("collect", "clean", "validate", "split", "tokenizer", "tokenize"):
        modules = lineage.import_closure(lineage.stage_roots(STAGES[name]))
        heavy = sorted(m for m in modules if m.startswith(("lmpipe.model", "lmpipe.train", "lmpipe.evaluate",
                                                          "lmpipe.registry")))
        assert not heavy, f"{name} can import {heavy}"


def test_function_level_and_relative_imports_are_followed(tmp_path: Path) -> None:
    pkg = tmp_path / "lmpipe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "entry.py").write_text("def f():\n    from lmpipe.sub import lazy\n    return lazy\n")
    (pkg / "sub" / "lazy.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    found = lineage.import_closure(["lmpipe.entry"], tmp_path)
    assert found == {"lmpipe", "lmpipe.entry", "lmpipe.sub", "lmpipe.sub.lazy", "lmpipe.sub.helper"}


def test_lineage_command_reports_drift_and_write_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmpipe.cli import main

    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text()
    assert "      - src/lmpipe/data/rules.py\n" in text
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/lmpipe/data/rules.py\n", "", 1)
                                       .replace("      - src/lmpipe/data/split.py\n", "      - src/lmpipe/data/split.py\n"
                                                "      - src/lmpipe/model/gpt.py\n", 1))
    assert main(["lineage", "--root", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "clean: missing code dep src/lmpipe/data/rules.py" in out
    assert "split: code dep src/lmpipe/model/gpt.py is not imported by the stage" in out
    assert main(["lineage", "--root", str(tmp_path), "--write"]) == 0
    assert lineage.check_dvc_yaml(tmp_path) == []
    assert "# Code deps (src/lmpipe/...)" in (tmp_path / "dvc.yaml").read_text()  # comments kept


# ---------------------------------------------------------------------------------------- inputs


def _project(root: Path, params: dict) -> Paths:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return Paths(root)


def _inputs(root: Path) -> dict[str, bytes]:
    params = load_params(root / "params.yaml")
    lineage.run(params, Paths(root))
    out = root / "data" / "inputs"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.json"))}


def test_file_sources_are_fingerprinted_by_content_and_glob(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    _project(tmp_path, {"collect": {"sources": [{"type": "files", "name": "local", "paths": ["corpus/*.txt"]}]},
                        "clean": {"decontaminate": {"eval_files": ["evals/*.jsonl"]}}})
    first = _inputs(tmp_path)
    assert set(first) >= {"collect.json", "clean.json", "evaluate.json", "distill.json", "finetune/sft.json"}
    record = json.loads(first["collect.json"])
    assert list(record["collect.sources.0.paths"]["corpus/*.txt"]) == ["corpus/a.txt"]
    assert json.loads(first["clean.json"])["clean.decontaminate.eval_files"] == {"evals/*.jsonl": {"missing": True}}

    assert _inputs(tmp_path) == first  # nothing changed: byte-identical, so DVC reruns nothing

    with open(corpus / "a.txt", "a") as handle:
        handle.write("\nA paragraph appended later.\n")
    edited = _inputs(tmp_path)
    assert edited["collect.json"] != first["collect.json"]
    assert edited["clean.json"] == first["clean.json"] and edited["evaluate.json"] == first["evaluate.json"]

    (corpus / "b.txt").write_text("A new file the glob now matches.\n")
    added = _inputs(tmp_path)
    assert "corpus/b.txt" in json.loads(added["collect.json"])["collect.sources.0.paths"]["corpus/*.txt"]

    (corpus / "a.txt").unlink()
    removed = json.loads(_inputs(tmp_path)["collect.json"])["collect.sources.0.paths"]["corpus/*.txt"]
    assert list(removed) == ["corpus/b.txt"]


def test_same_size_edit_with_kept_mtime_is_still_seen_after_the_cache_is_gone(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    _project(tmp_path, {"collect": {"sources": [{"type": "files", "name": "f", "paths": ["a.txt"]}]}})
    first = _inputs(tmp_path)["collect.json"]
    stat = (tmp_path / "a.txt").stat()
    (tmp_path / "a.txt").write_text("xyz")
    os.utime(tmp_path / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / lineage.CACHE_FILE).unlink()
    assert _inputs(tmp_path)["collect.json"] != first


def test_finetune_and_evaluate_data_files_and_hf_datasets(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "wiki.txt").write_text("held-out text\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    params = {
        "collect": {"sources": [
            {"type": "hf", "name": "local", "path": "saved"},
            {"type": "hf", "name": "hub", "path": "someone/corpus", "revision": "main"},
            {"type": "hf", "name": "pinned", "path": "someone/corpus", "revision": "a" * 40}]},
        "finetune": {"tasks": {"cls": {"type": "classification",
                                       "train_data": {"type": "files", "paths": ["train.jsonl"]}}}},
        "evaluate": {"eval_files": [{"name": "wiki", "path": "wiki.txt"}]},
    }
    _project(tmp_path, params)
    files = _inputs(tmp_path)
    assert set(files) >= {"finetune/cls.json"} and "finetune/sft.json" not in files  # stale task file removed
    collect = json.loads(files["collect.json"])
    assert list(collect["collect.sources.0.path"]["local"]) == ["saved/state.json"]
    hub, pinned = collect["collect.sources.1.path"], collect["collect.sources.2.path"]
    assert hub["hub"] == "someone/corpus" and hub["pinned"] is False and hub["resolved"] is None  # offline
    assert pinned["pinned"] is True
    assert "train.jsonl" in json.loads(files["finetune/cls.json"])["finetune.tasks.cls.train_data.paths"]["train.jsonl"]
    assert "wiki.txt" in json.loads(files["evaluate.json"])["evaluate.eval_files.0.path"]["wiki.txt"]

    (saved / "state.json").write_text('{"changed": true}')
    assert _inputs(tmp_path)["collect.json"] != files["collect.json"]
