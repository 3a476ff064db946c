"""Deployments with cron and interval schedules, served from one machine or declared for a work pool.

Against the session's real Prefect server: ``lmpipe serve`` (pipelines/deployments.py) registers the
scheduled deployments, the server's scheduler plans their runs, and a run triggered by hand is
executed by the serving process on a tiny project. ``prefect deploy --all`` registers the same
deployments from prefect.yaml for the ``lmpipe`` work pool, and a worker runs one.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines import deployments as deployments_module

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_deployments_carry_cron_and_interval_schedules(tmp_path: Path) -> None:
    built = {d.name: d for d in deployments_module.build_deployments(root=tmp_path, timezone="Europe/Paris")}
    assert set(built) == {"nightly", "data-refresh", "manual"}
    nightly, refresh, manual = built["nightly"], built["data-refresh"], built["manual"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "Europe/Paris")]
    interval = refresh.schedules[0].schedule
    assert interval.interval == dt.timedelta(hours=6) and interval.anchor_date.hour == 0
    assert refresh.parameters == {"root": str(tmp_path)}
    assert not manual.schedules
    assert nightly.entrypoint.endswith("pipelines/flow.py:pipeline")
    with pytest.raises(ValueError, match=r"unknown deployment\(s\) \['weekly'\]"):
        deployments_module.build_deployments(names=["weekly"])


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_for(check: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} (waited {timeout:.0f} s)\n{tail}")


def _deployment(name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            return client.read_deployment_by_name(f"lmpipe-pipeline/{name}")
        except ObjectNotFound:
            return None


def _all_deployments() -> list[Any] | None:
    found = [_deployment(name) for name in ("nightly", "data-refresh", "manual")]
    return found if all(found) else None


def _scheduled_runs(deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=20,
        )


def _run_to_completion(deployment: str, parameters: dict[str, Any], timeout: float,
                       proc: subprocess.Popen[bytes], log: Path) -> Any:
    """Trigger a run of ``deployment`` and wait until the process executing runs finishes it."""
    from prefect.deployments import run_deployment

    run = run_deployment(f"lmpipe-pipeline/{deployment}", parameters=parameters, timeout=0, as_subflow=False)

    def final() -> Any:
        with _client() as client:
            state = client.read_flow_run(run.id).state
        return state if state is not None and state.is_final() else None

    return _wait_for(final, timeout, f"flow run of {deployment} did not finish", proc, log)


@pytest.fixture
def serving(prefect_api: str, make_project: Callable[..., Path], tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[tuple[Path, Any, Path]]:
    """``lmpipe serve --root <tiny project>`` running against the session's server.

    Parametrize indirectly with ``{"inputs": True}`` for a project with the ``inputs`` stage.
    """
    project = make_project(tracking=False, **getattr(request, "param", {}))
    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "deployments.py"), "--root", str(project)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield project, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what a service manager sends: pause the deployments, stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_served_deployments_are_scheduled_and_run_on_demand(serving: tuple[Path, Any, Path]) -> None:
    project, proc, log = serving
    nightly, refresh, _ = _wait_for(_all_deployments, 90, "lmpipe serve did not register its deployments", proc, log)
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert [s.schedule.interval for s in refresh.schedules] == [dt.timedelta(hours=6)]
    assert refresh.parameters["root"] == str(project)

    state = _run_to_completion("manual", {"stages": ["collect"]}, 120, proc, log)
    assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    assert (project / "data" / "raw" / "manifest.json").is_file()
    assert not (project / "data" / "clean").exists()

    # the server's scheduler has planned the nightly runs at 02:00 UTC from the cron schedule
    server_log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    planned = _wait_for(lambda: _scheduled_runs(nightly.id), 30,
                        "no scheduled runs for 'nightly' (Prefect 3.8.8's scheduler needs SQLAlchemy<2.1; "
                        "the server log follows)", log=server_log)
    assert all(r.expected_start_time.astimezone(dt.UTC).hour == 2 for r in planned)
    assert all(r.expected_start_time > dt.datetime.now(dt.UTC) for r in planned)


@pytest.mark.parametrize("serving", [{"inputs": True}], indirect=True)
def test_data_refresh_reruns_collect_and_downstream_only_when_a_source_changed(
    serving: tuple[Path, Any, Path], ledger: Callable[[Path], list[str]]
) -> None:
    project, proc, log = serving

    def registered_here() -> Any:  # an earlier test's server may still hold the same deployment names
        found = _deployment("data-refresh")
        return found if found is not None and found.parameters.get("root") == str(project) else None

    _wait_for(registered_here, 90, "lmpipe serve did not register its deployments", proc, log)
    state = _run_to_completion("data-refresh", {}, 180, proc, log)
    assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    assert [line for line in ledger(project) if line.startswith("done")] == ["done collect", "done clean",
                                                                             "done split"]

    state = _run_to_completion("data-refresh", {}, 180, proc, log)  # no source changed: nothing runs
    assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    assert len(ledger(project)) == 6

    with open(project / "corpus" / "a.txt", "a") as handle:
        handle.write("A paragraph appended later.\n")
    state = _run_to_completion("data-refresh", {}, 180, proc, log)
    assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    assert ledger(project)[6:] == ["start collect", "done collect", "start clean", "done clean", "start split",
                                   "done split"]


def _prefect(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{output[-3000:]}\n(Prefect 3.8.8's server rejects the explicit "
        "nulls its own client sends when FastAPI >= 0.151 runs it: requirements.lock needs fastapi==0.150.0)"
        if "Input should be a valid integer" in output else f"prefect {' '.join(args)} failed:\n{output[-3000:]}"
    )
    return output


def test_prefect_yaml_deploys_to_the_work_pool_and_a_worker_runs_it(
    prefect_api: str, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    project = make_project(tracking=False)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "LMPIPE_ROOT": str(REPO)}
    _prefect("work-pool", "create", "lmpipe", "--type", "process", "--overwrite", env=env)
    _prefect("--no-prompt", "deploy", "--all", env=env)

    nightly, refresh, manual = (_deployment(n) for n in ("nightly", "data-refresh", "manual"))
    assert nightly.work_pool_name == refresh.work_pool_name == manual.work_pool_name == "lmpipe"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert [s.schedule.interval for s in refresh.schedules] == [dt.timedelta(hours=6)]
    assert refresh.parameters == {}
    assert manual.schedules == [] and nightly.global_concurrency_limit.limit == 1

    log = tmp_path / "worker.log"
    from prefect.deployments import run_deployment

    run = run_deployment("lmpipe-pipeline/manual", parameters={"root": str(project), "stages": ["collect"]},
                         timeout=0, as_subflow=False)
    with open(log, "wb") as out:
        worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "lmpipe", "--run-once"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
    assert worker.returncode == 0, log.read_text()[-3000:]
    with _client() as client:
        state = client.read_flow_run(run.id).state
    assert state is not None and state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    assert (project / "data" / "raw" / "manifest.json").is_file()
