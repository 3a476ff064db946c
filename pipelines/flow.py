"""The ``lmpipe-pipeline`` Prefect flow: one task per stage, each running ``dvc repro --single-item``.

Prefect adds the run graph, retries and scheduling; DVC decides whether a stage has anything to
do (content hashes of deps, params and code), so a scheduled run, ``dvc repro`` and a hand-run
``lmpipe <stage>`` do exactly the same work and share one cache. One MLflow parent run per flow
run; each stage's MLflow run nests under it through ``LMPIPE_PARENT_RUN_ID``.

Run it: ``python pipelines/flow.py`` (what ``make run`` does) or ``python pipelines/flow.py --stages collect clean``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmpipe.cli import STAGES  # noqa: E402

PIPELINE_STAGES = [name for name in STAGES if (ROOT / "dvc.yaml").is_file() and name in (ROOT / "dvc.yaml").read_text()]
NETWORK_STAGES = {"collect", "register"}


def _bin(name: str) -> str:
    """The executable next to this interpreter (the project venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(stage: str, root: str, env: dict[str, str]) -> str:
    """Reproduce one DVC stage; DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    proc = subprocess.run(
        [_bin("dvc"), "repro", "--single-item", stage],
        cwd=root, env=env, text=True, capture_output=True,
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        logger.error("stage %s failed:\n%s", stage, output[-4000:])
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {output.splitlines()[-1] if output else ''}")
    skipped = "didn't change, skipping" in output
    logger.info("stage %s %s", stage, "unchanged: skipped" if skipped else "done")
    return "skipped" if skipped else "ran"


def _retrying(stage: str) -> Any:
    """Stages that touch the network get retries with backoff."""
    if stage in NETWORK_STAGES:
        return run_stage.with_options(retries=2, retry_delay_seconds=[10, 60])
    return run_stage


@flow(name="lmpipe-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = str(ROOT)) -> dict[str, str]:
    """Run the stages in dependency order under one MLflow parent run."""
    sys.path.insert(0, str(Path(root) / "src"))
    from lmpipe.config import load_params
    from lmpipe.tracking import PARENT_ENV, setup_mlflow

    chosen = stages or PIPELINE_STAGES
    unknown = [s for s in chosen if s not in PIPELINE_STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; pipeline stages: {PIPELINE_STAGES}")
    params = load_params(Path(root) / "params.yaml", sections=["tracking"])
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    results: dict[str, str] = {}
    parent = None
    if params.tracking.enabled:
        mlflow = setup_mlflow(params.tracking, Path(root))
        parent = mlflow.start_run(run_name="pipeline", tags={"lmpipe.stage": "pipeline"})
        env[PARENT_ENV] = parent.info.run_id
    try:
        for stage in [s for s in PIPELINE_STAGES if s in chosen]:
            results[stage] = _retrying(stage)(stage, root, env)
    finally:
        if parent is not None:
            mlflow.end_run()
    print_summary(results, Path(root), parent.info.run_id if parent else None)
    return results


def print_summary(results: dict[str, str], root: Path, run_id: str | None) -> None:
    lines = ["", "lmpipe pipeline finished:"]
    lines += [f"  {stage:<10} {state}" for stage, state in results.items()]
    if (root / "data" / "clean" / "clean_report.json").is_file():
        lines.append(f"  clean report:   {root / 'data/clean/clean_report.json'}")
    if (root / "reports").is_dir():
        lines.append(f"  reports:        {root / 'reports'}")
    if run_id:
        lines.append(f"  MLflow run:     {run_id}  (open the UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db)")
    lines.append("  Prefect UI:     .venv/bin/prefect server start  (then http://127.0.0.1:4200)")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the lmpipe pipeline as a Prefect flow.")
    parser.add_argument("--stages", nargs="*", help=f"Stages to run (default: all of {PIPELINE_STAGES}).")
    args = parser.parse_args(argv)
    pipeline(stages=args.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
