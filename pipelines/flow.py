"""The ``lmpipe-pipeline`` Prefect flow: one task per stage, each running ``dvc repro --single-item``.

Prefect adds the run graph, retries and scheduling; DVC decides whether a stage has anything to
do (content hashes of deps, params and code), so a scheduled run, ``dvc repro`` and a hand-run
``lmpipe <stage>`` do exactly the same work and share one cache. One MLflow parent run per flow
run; each stage's MLflow run nests under it through ``LMPIPE_PARENT_RUN_ID``.

A flow process that dies mid-stage (killed, OOM, node lost) takes its stage down with it, and
its temporary Prefect server too (``pipelines/guard.py``), so a rerun finds no orphan holding
DVC's lock or racing it for the same outputs: DVC skips every stage recorded in ``dvc.lock`` and
reruns the interrupted one, whose output was never swapped into place (stages build outputs in
temp dirs, ``lmpipe.io.atomic_dir``). A stage past its limit (``flow`` in params.yaml) is stopped
the same way; a second flow run in the same checkout waits for the first (or fails at once).

Run it: ``python pipelines/flow.py`` (what ``make run`` does) or ``python pipelines/flow.py --stages collect clean``.
Schedules and deployments: ``pipelines/deployments.py`` and ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# The first run on a fresh machine creates and migrates Prefect's database before the ephemeral
# server answers; on 2 slow cores that takes longer than Prefect's 20 s default and the run dies
# with "Timed out while attempting to connect to ephemeral Prefect API server".
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmpipe.stages import STAGES, network_stages  # noqa: E402
from pipelines.guard import STOP_GRACE_SECONDS, hold_checkout, run_streaming, temporary_prefect_server  # noqa: E402
from pipelines.summary import mlflow_ui, publish_artifacts, registry_entries  # noqa: E402

NETWORK_STAGES = network_stages()
# Runs before any chosen stage that reads files named in params, so that stage sees their current
# fingerprints (a `dvc repro --single-item` would not run it).
INPUTS_STAGE = "inputs"
# Stages that download or talk to a registry fail transiently; 3 retries 30 s, 60 s, 120 s apart
# (with jitter, so several pipelines do not retry in lockstep).
NETWORK_RETRIES = 3
NETWORK_BACKOFF_SECONDS = 30.0


def pipeline_stages(root: Path) -> list[str]:
    """The stages of ``root/dvc.yaml`` in pipeline order (CLI order, then file order for others)."""
    import yaml

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml}: no dvc.yaml; run the flow in an lmpipe project (--root)")
    declared = list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))
    order = list(STAGES)
    return sorted(declared, key=lambda s: (order.index(s) if s in order else len(order), declared.index(s)))


def _bin(name: str) -> str:
    """The executable next to this interpreter (the project venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _run_logged(cmd: list[str], root: str, env: dict[str, str], what: str, timeout_s: float | None = None) -> str:
    """Run ``cmd`` in ``root`` (its process tree guarded, see pipelines/guard.py), streaming its
    output to the run log; return its first and last lines.

    Raises RuntimeError naming ``what`` and the command's own error line (else its last line), and
    TimeoutError when it ran past ``timeout_s`` (it is stopped first).
    """
    logger = get_run_logger()
    head: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def keep(line: str) -> None:
        line = line.rstrip()
        if line:
            # DVC says what it does first and what went wrong last; keep both ends of long logs
            (head if len(head) < 100 else tail).append(line)
            logger.info("%s | %s", what, line)

    try:
        code = run_streaming(cmd, root, env, keep, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"{what} timed out after {timeout_s:g} s and was stopped "
                           "(flow.stage_timeout_s / flow.stage_timeouts in params.yaml)") from None
    lines = head + list(tail)
    if code != 0:
        # the stage's own one-line error ("lmpipe clean: error: ...") says more than DVC's summary
        errors = [line for line in lines if ": error: " in line]
        last = errors[-1] if errors else (lines[-1] if lines else f"exit code {code}")
        raise RuntimeError(f"{what} failed: {last}")
    return "\n".join(lines)


def _stage_env(parent_run_id: str | None) -> dict[str, str]:
    from lmpipe.tracking import PARENT_ENV

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop(PARENT_ENV, None)
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(stage: str, root: str, parent_run_id: str | None = None, timeout_s: float | None = None) -> str:
    """Reproduce one DVC stage; DVC skips it when nothing it depends on changed.

    Returns "ran" or "skipped". Raises RuntimeError (the task fails) when the stage fails, and
    TimeoutError when it runs past ``timeout_s`` (its process tree is stopped first).
    """
    output = _run_logged([_bin("dvc"), "repro", "--single-item", stage], root, _stage_env(parent_run_id),
                         f"stage {stage}", timeout_s)
    skipped = "Running stage '" not in output
    get_run_logger().info("stage %s %s", stage, "unchanged: skipped" if skipped else "done")
    return "skipped" if skipped else "ran"


@task(name="promote", retries=NETWORK_RETRIES, retry_delay_seconds=exponential_backoff(NETWORK_BACKOFF_SECONDS),
      retry_jitter_factor=0.5)
def promote_champion(root: str, parent_run_id: str | None = None, timeout_s: float | None = None) -> str:
    """Move the registry's ``champion`` alias to the candidate if it passes the gate (``lmpipe promote``)."""
    _run_logged([_bin("lmpipe"), "promote"], root, _stage_env(parent_run_id), "promote", timeout_s)
    return "ran"


def _retrying(stage: str, timeout_s: float | None = None) -> Any:
    """Stages that touch the network get retries with exponential backoff. With ``timeout_s``,
    Prefect's own task timeout backs up the subprocess deadline (which fires first and stops the
    stage's process tree)."""
    task_ = run_stage
    if stage in NETWORK_STAGES:
        task_ = run_stage.with_options(retries=NETWORK_RETRIES,
                                       retry_delay_seconds=exponential_backoff(NETWORK_BACKOFF_SECONDS),
                                       retry_jitter_factor=0.5)
    return task_.with_options(timeout_seconds=timeout_s + STOP_GRACE_SECONDS + 30) if timeout_s else task_


def apply_preset(root: Path, preset: str) -> Path:
    """Copy ``configs/<preset>.yaml`` (or a path) over ``root/params.yaml``, as the README describes.

    The preset is validated first, so a bad preset fails the flow before any stage runs; DVC then
    reruns exactly the stages whose params changed. Raises ConfigError for a missing or invalid preset.
    """
    from lmpipe.config import load_params
    from lmpipe.errors import ConfigError
    from lmpipe.io import write_bytes

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else root / "configs" / f"{preset}.yaml"
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        known = sorted(p.stem for p in (root / "configs").glob("*.yaml"))
        raise ConfigError(f"{path}: preset not found (presets: {', '.join(known) or 'none'})")
    load_params(path)
    target = root / "params.yaml"
    if not target.is_file() or target.read_bytes() != path.read_bytes():
        write_bytes(target, path.read_bytes())
    return path


def apply_overrides(root: Path, overrides: list[str]) -> None:
    """Write ``section.key=value`` overrides into ``root/params.yaml``, as ``dvc exp run -S`` does.

    The overridden params are validated first (``load_params`` with the overrides), so a bad one
    fails the flow before any stage runs and leaves params.yaml as it was; the file is then
    rewritten atomically with comments and layout kept (round-trip YAML).
    Raises ConfigError naming the override or key.
    """
    import io

    from ruamel.yaml import YAML

    from lmpipe.config import apply_override, load_params
    from lmpipe.io import write_bytes

    target = root / "params.yaml"
    load_params(target, overrides)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout of params.yaml and configs/
    data = yaml.load(target.read_text(encoding="utf-8")) if target.is_file() else {}
    for override in overrides:
        apply_override(data, override)
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    write_bytes(target, buffer.getvalue().encode("utf-8"))


@flow(name="lmpipe-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, preset: str | None = None, promote: bool = False,
             root: str | None = None, overrides: list[str] | None = None) -> dict[str, str]:
    """Run the stages in dependency order under one MLflow parent run.

    ``stages``: a subset to run (default: every stage of dvc.yaml); ``preset``: a ``configs/`` preset
    copied over params.yaml first; ``overrides``: ``section.key=value`` changes written into
    params.yaml next (DVC then reruns what they affect); ``promote``: after the stages, move the ``champion`` alias when
    the candidate passes the gate; ``root``: the project (default: the one holding this file).
    One run at a time per checkout: a second one waits or fails (``flow.concurrency``), before it
    changes params.yaml; each stage is stopped past its limit (``flow.stage_timeouts``).
    """
    from lmpipe.config import load_params

    project = Path(root).resolve() if root else ROOT
    limits = load_params(project / "params.yaml", overrides, sections=["flow"]).flow
    with hold_checkout(project, limits.concurrency, limits.wait_timeout_s):
        return _pipeline(project, stages, preset, promote, overrides)


def _pipeline(project: Path, stages: list[str] | None, preset: str | None, promote: bool,
              overrides: list[str] | None) -> dict[str, str]:
    """The body of :func:`pipeline`, run while it holds the checkout."""
    from lmpipe.config import load_params
    from lmpipe.tracking import setup_mlflow

    known = pipeline_stages(project)
    chosen = stages or known
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages of {project / 'dvc.yaml'}: {known}")
    if INPUTS_STAGE in known and any(STAGES[s].inputs for s in chosen if s in STAGES):
        chosen = [INPUTS_STAGE, *chosen]
    if preset:
        print(f"params.yaml <- preset {apply_preset(project, preset)}")
    if overrides:
        apply_overrides(project, overrides)
        print(f"params.yaml <- {' '.join(overrides)}")
    params = load_params(project / "params.yaml", sections=["tracking", "flow"])
    params.flow.check_stages(known)
    results: dict[str, str] = {}
    parent = mlflow = uri = None
    if params.tracking.enabled:
        from prefect.runtime import flow_run

        mlflow = setup_mlflow(params.tracking, project)
        uri = mlflow.get_tracking_uri()
        parent = mlflow.start_run(run_name="pipeline", tags={
            "lmpipe.stage": "pipeline", "prefect.flow_run_id": str(flow_run.id or ""),
            "lmpipe.preset": preset or "", "lmpipe.stages": ",".join(chosen),
            "lmpipe.overrides": " ".join(overrides or [])})
    parent_id = parent.info.run_id if parent else None
    status = "FAILED"
    try:
        for stage in [s for s in known if s in chosen]:
            limit = params.flow.timeout_for(stage)
            results[stage] = _retrying(stage, limit)(stage, str(project), parent_id, limit)
        if promote:
            limit = params.flow.timeout_for("promote")
            results["promote"] = promote_champion.with_options(timeout_seconds=limit + STOP_GRACE_SECONDS + 30)(
                str(project), parent_id, limit)
        status = "FINISHED"
    finally:
        if mlflow is not None:
            mlflow.end_run(status=status)
    print_summary(results, project, parent_id, uri)
    publish_artifacts(results, project, parent_id, uri)  # the same summary on the Prefect flow run
    return results


def registry_lines(root: Path, uri: str | None) -> list[str]:
    """One line per model of ``metrics/register.json``: version, aliases now, and the gate's verdict."""
    entries, problem = registry_entries(root, uri)
    if problem:
        return [f"  {'registry:':<18} {problem}"]
    if not entries:
        return []
    lines = ["  registered models (MLflow registry):"]
    for entry in entries:
        line = f"    {entry.name} v{entry.version} [{', '.join(entry.aliases) or 'no alias'}]"
        if entry.champion is not None and entry.champion != entry.version:
            line += f"; champion stays v{entry.champion}"
        if entry.reasons:
            line += f" ({'; '.join(entry.reasons)})"
        lines.append(line)
    lines.append(f"    serve one: .venv/bin/mlflow models serve -m models:/{entries[0].name}@champion "
                 "--env-manager local -p 5001")
    return lines


def print_summary(results: dict[str, str], root: Path, run_id: str | None, uri: str | None = None) -> None:
    lines = ["", "lmpipe pipeline finished:"]
    lines += [f"  {stage:<18} {state}" for stage, state in results.items()]
    for label, rel in (("report", "reports/report.html"), ("clean report", "data/clean/clean_report.json"),
                       ("data validation", "reports/validation")):
        if (root / rel).exists():
            lines.append(f"  {label + ':':<18} {root / rel}")
    lines += registry_lines(root, uri)
    if run_id:
        lines.append(f"  {'MLflow run:':<18} {run_id}")
    if uri:
        lines.append(f"  {'MLflow UI:':<18} {mlflow_ui(uri, run_id)}")
    prefect_api = os.environ.get("PREFECT_API_URL")
    lines.append(f"  {'Prefect UI:':<18} " + (prefect_api.removesuffix("/api") if prefect_api else
                 ".venv/bin/prefect server start, then http://127.0.0.1:4200 (this run is in its history)"))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the lmpipe pipeline as a Prefect flow.")
    parser.add_argument("--stages", nargs="*", help="Stages to run (default: every stage of dvc.yaml).")
    parser.add_argument("--preset", help="Copy configs/PRESET.yaml over params.yaml first.")
    parser.add_argument("-S", "--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="Change params.yaml before running, like `dvc exp run -S` (repeatable), "
                        "e.g. -S pretrain.max_steps=100.")
    parser.add_argument("--promote", action="store_true", help="Promote the candidate model if it passes the gate.")
    parser.add_argument("--root", help="Project root (default: the project holding this file).")
    args = parser.parse_args(argv)
    from lmpipe.errors import LmpipeError

    try:
        # without PREFECT_API_URL: a Prefect server of this run's own that dies with it, even on SIGKILL
        with temporary_prefect_server(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])):
            pipeline(stages=args.stages, preset=args.preset, promote=args.promote, root=args.root,
                     overrides=args.overrides)
    except LmpipeError as err:
        print(f"lmpipe flow: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
