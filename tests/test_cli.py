from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe.cli import STAGES, main


def test_every_stage_help_lists_its_keys(capsys) -> None:
    for name in ("collect", "clean", "validate", "split"):
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"params.yaml keys (section '{name}')" in out


def test_clean_help_documents_nested_keys(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["clean", "--help"])
    out = capsys.readouterr().out
    for key in ("clean.near_dedup.threshold", "clean.quality.min_words", "clean.decontaminate.ngram"):
        assert key in out


def test_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("clean: {quality: {min_words: abc}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "params", "--root", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "clean.quality.min_words" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_names_match_dvc_yaml(repo_root: Path) -> None:
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert name in STAGES
        body = stage.get("do", stage)  # foreach groups (finetune@sft, ...) keep the cmd under `do`
        assert body["cmd"].startswith(f"lmpipe {name}")


def test_serve_passes_its_arguments_to_the_deployments_script(repo_root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmpipe.cli", "serve", "--help"], cwd=repo_root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "nightly" in proc.stdout or "deployment" in proc.stdout.lower()


def test_version_and_run_forwards_to_the_flow(repo_root: Path, tmp_path: Path) -> None:
    from lmpipe import __version__

    def lmpipe(*args: str, cwd: Path = repo_root) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lmpipe.cli", *args], cwd=cwd, capture_output=True, text=True)

    proc = lmpipe("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lmpipe {__version__}"
    proc = lmpipe("run", "--help")  # the flow's own options: pipelines/flow.py stays the implementation
    assert proc.returncode == 0, proc.stderr
    assert "Run the lmpipe pipeline as a Prefect flow" in proc.stdout and "--stages" in proc.stdout
    assert "--preset" in proc.stdout and "--promote" in proc.stdout
    proc = lmpipe("run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lmpipe run: error: {tmp_path / 'pipelines' / 'flow.py'}: not found; run it from the project root"
    assert "run" in lmpipe("--help").stdout


def test_logs_off_a_terminal_are_plain_single_lines(repo_root: Path) -> None:
    """Under the flow or in CI a long log record (a progress line) stays one line, not rich's
    80-column wrap."""
    code = ("import logging; from lmpipe.cli import _setup_logging; _setup_logging(False); "
            "logging.getLogger('lmpipe.progress').info('pretrain: 14/150 steps (9%%), %s, ETA 4:16', 'x' * 120)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith(f"INFO    pretrain: 14/150 steps (9%), {'x' * 120}, ETA 4:16")
