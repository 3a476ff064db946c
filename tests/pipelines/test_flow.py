"""The lmpipe-pipeline flow against a real Prefect server, real DVC and a real MLflow store.

What a user relies on: stages run in dependency order, each under one MLflow parent run; an
unchanged stage is skipped; a failing stage fails the flow with its message and stops it; a flow
killed mid-stage leaves no half-written output, and its rerun skips what finished and redoes only
the interrupted stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import flow as flow_module

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    experiment = yaml.safe_load((project / "params.yaml").read_text())["tracking"]["experiment"]
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_stages_run_in_order_under_one_parent_run_then_skip(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]]
) -> None:
    project = make_project()
    # asked out of order: the flow still runs them in pipeline order
    results = flow_module.pipeline(stages=["clean", "collect"], root=str(project))
    assert list(results.items()) == [("collect", "ran"), ("clean", "ran")]
    assert ledger(project) == ["start collect", "done collect", "start clean", "done clean"]
    for out in ("raw", "clean"):
        assert (project / "data" / out / "manifest.json").is_file()
    assert not (project / "data" / "split").exists()

    runs = _runs(project)
    parents = [r for r in runs if r.data.tags.get("lmpipe.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["prefect.flow_run_id"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"collect", "clean"}

    again = flow_module.pipeline(stages=["collect", "clean"], root=str(project))
    assert again == {"collect": "skipped", "clean": "skipped"}
    assert len(ledger(project)) == 4


def test_failing_network_stage_is_retried_then_fails_the_flow(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_project()
    monkeypatch.setenv("TEST_FAIL_COLLECT", "1")
    monkeypatch.setattr(flow_module, "NETWORK_BACKOFF_SECONDS", 0.1)  # keep the backoff, shrink it
    monkeypatch.setattr(flow_module, "NETWORK_RETRIES", 2)
    state = flow_module.pipeline(root=str(project), return_state=True)
    assert state.is_failed()
    assert "stage collect failed: lmpipe collect: error: deliberate failure for the test" in state.message
    assert ledger(project) == ["start collect"] * 3  # the first try and 2 retries
    assert not (project / "data").exists()  # clean and split never ran
    runs = _runs(project)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("pipeline", "FAILED")]


def test_unknown_stage_and_missing_preset_are_clear_errors(prefect_api: str, make_project: Callable[..., Path]) -> None:
    from lmpipe.errors import ConfigError

    project = make_project(tracking=False)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['pretrian'\]"):
        flow_module.pipeline(stages=["pretrian"], root=str(project))
    with pytest.raises(ConfigError, match="preset not found"):
        flow_module.apply_preset(project, "nope")
    (project / "configs").mkdir()
    (project / "configs" / "bad.yaml").write_text("tracking: {enabeld: true}\n")
    with pytest.raises(ConfigError, match="tracking.enabeld: unknown key"):
        flow_module.apply_preset(project, "bad")
    (project / "configs" / "quiet.yaml").write_text("tracking: {enabled: false}\n")
    flow_module.apply_preset(project, "quiet")
    assert (project / "params.yaml").read_text() == "tracking: {enabled: false}\n"


def test_overrides_are_written_into_params_keeping_comments(tmp_path: Path) -> None:
    from lmpipe.errors import ConfigError

    params = tmp_path / "params.yaml"
    original = ("# the project's params\ntracking:\n  enabled: true  # keep me\n  experiment: lmpipe\n"
                "collect:\n  sources:\n    - type: synthetic\n      name: s\n      num_docs: 10\n")
    params.write_text(original)
    with pytest.raises(ConfigError, match="tracking.enabeld: unknown key"):
        flow_module.apply_overrides(tmp_path, ["tracking.enabeld=false"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        flow_module.apply_overrides(tmp_path, ["tracking.enabled"])
    assert params.read_text() == original
    assert not [p for p in tmp_path.iterdir() if p.name != "params.yaml"]  # no temp file left behind

    flow_module.apply_overrides(tmp_path, ["tracking.experiment=other", "split.val_fraction=0.1"])
    text = params.read_text()
    assert "# the project's params" in text and "# keep me" in text
    assert "  sources:\n    - type: synthetic\n      name: s\n      num_docs: 10\n" in text  # layout kept, not only content
    data = yaml.safe_load(text)
    assert data["tracking"] == {"enabled": True, "experiment": "other"}
    assert data["split"] == {"val_fraction": 0.1}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: pid -> command line."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
            todo.append(child)
    return found


def _home_with_migrated_db(tmp_path: Path) -> Path:
    """A PREFECT_HOME holding a copy of the session server's (migrated) database, so a temporary
    server starts in seconds rather than migrating a new one."""
    import sqlite3

    home = tmp_path / "prefect-home"
    home.mkdir()
    source = sqlite3.connect(Path(os.environ["PREFECT_HOME"]) / "prefect.db")
    target = sqlite3.connect(home / "prefect.db")
    with target:
        source.backup(target)
    source.close()
    target.close()
    return home


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree guard uses Linux PR_SET_PDEATHSIG")
def test_killed_flow_leaves_no_process_and_reruns_only_the_interrupted_stage(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]], tmp_path: Path
) -> None:
    """`python pipelines/flow.py` without PREFECT_API_URL, as `make run` starts it: it runs its own
    Prefect server. SIGKILL to the flow process alone takes down every process it started, that
    server included."""
    project = make_project(tracking=False)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    env.update({"TEST_SLEEP_CLEAN": "120", "PREFECT_HOME": str(_home_with_migrated_db(tmp_path))})
    flow_proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "flow.py"), "--root", str(project)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = project / "clean.started"
    deadline = time.monotonic() + 120
    while not started.exists():
        assert flow_proc.poll() is None, "flow exited before clean started"
        assert time.monotonic() < deadline, "clean never started"
        time.sleep(0.2)
    stage_pid = int(started.read_text())
    # clean is mid-write: its temp dir exists, the final output does not
    assert list((project / ".lmpipe-tmp").glob("*+clean.*.tmp"))
    tree = _descendants(flow_proc.pid)
    assert stage_pid in tree
    servers = [pid for pid, cmd in tree.items() if "uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd]
    assert servers, f"the flow's Prefect server is not among its processes: {tree}"
    flow_proc.send_signal(signal.SIGKILL)  # only the flow process; nothing else is told
    flow_proc.wait()

    deadline = time.monotonic() + flow_module.STOP_GRACE_SECONDS + 10
    while alive := [f"{pid}: {cmd}" for pid, cmd in tree.items() if _alive(pid)]:
        assert time.monotonic() < deadline, "processes outlived the killed flow:\n" + "\n".join(alive)
        time.sleep(0.2)
    # nothing half-written: every output dir is complete (has its manifest), no temp dirs remain
    assert [p.name for p in (project / "data").iterdir() if p.is_dir()] == ["raw"]
    assert (project / "data" / "raw" / "manifest.json").is_file()
    assert ledger(project) == ["start collect", "done collect", "start clean"]

    # split never started and would simply run next; the point is what happens to collect and clean
    results = flow_module.pipeline(stages=["collect", "clean"], root=str(project))
    assert results == {"collect": "skipped", "clean": "ran"}
    assert ledger(project)[3:] == ["start clean", "done clean"]
    assert sorted(p.name for p in (project / "data").iterdir() if p.is_dir()) == ["clean", "raw"]
    assert (project / "data" / "clean" / "manifest.json").is_file()
    assert "second part" in (project / "data" / "clean" / "part-1.txt").read_text()


def test_stage_runs_nest_under_the_flow_run_on_an_mlflow_server_with_postgres(
    prefect_api: str, make_project: Callable[..., Path], mlflow_server: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch, mlflow_auth: Any,
) -> None:
    """The server requires a user: the flow and the stages it starts pass MLFLOW_TRACKING_USERNAME/PASSWORD."""
    from mlflow.tracking import MlflowClient

    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for key, value in mlflow_auth.client_env.items():
        monkeypatch.setenv(key, value)
    project = make_project()
    assert flow_module.pipeline(stages=["collect", "clean"], root=str(project)) == {"collect": "ran", "clean": "ran"}

    client = MlflowClient(tracking_uri=url)
    experiment = yaml.safe_load((project / "params.yaml").read_text())["tracking"]["experiment"]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lmpipe.stage") == "pipeline")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"collect", "clean"} and parent.info.status == "FINISHED"
    assert children["clean"].data.metrics["parts"] == 2
    # the stage's artifact went through the server (--serve-artifacts) into its artifact store
    assert [f.path for f in client.list_artifacts(children["clean"].info.run_id)] == ["manifest.json"]
    assert list(artifacts.rglob("manifest.json"))


def test_summary_names_report_models_aliases_and_uis(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of `make run`: where the report is, each registered model with its aliases (and why
    a candidate stayed one), and how to open the MLflow and Prefect UIs."""
    import json

    from mlflow import MlflowClient

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("lmpipe-cls")
    for _ in range(2):
        client.create_model_version("lmpipe-cls", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("lmpipe-cls", "champion", "1")
    client.set_registered_model_alias("lmpipe-cls", "candidate", "2")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report.html").write_text("<html></html>")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "register.json").write_text(json.dumps({"models": [
        {"name": "lmpipe-cls", "version": 2, "gate": {"moved": False, "reasons": ["accuracy 0.4 vs champion 0.9"]}}]}))

    flow_module.print_summary({"register": "ran"}, tmp_path, "run123", uri)
    out = capsys.readouterr().out
    assert f"report:            {tmp_path / 'reports/report.html'}" in out
    assert "lmpipe-cls v2 [candidate]; champion stays v1 (accuracy 0.4 vs champion 0.9)" in out
    assert "models:/lmpipe-cls@champion" in out
    assert f"mlflow ui --backend-store-uri {uri}" in out and "MLflow run:        run123" in out
    assert "prefect server start" in out

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    elsewhere = tmp_path / "other"  # no register.json: nothing asks the (unreachable) server
    elsewhere.mkdir()
    flow_module.print_summary({}, elsewhere, None, "http://mlflow.internal:5000")
    out = capsys.readouterr().out
    assert "MLflow UI:         http://mlflow.internal:5000" in out and "Prefect UI:        http://prefect.internal:4200" in out


def test_prefect_api_refuses_requests_without_the_auth_string(prefect_api: str, prefect_auth: str) -> None:
    """The session's server runs with PREFECT_SERVER_API_AUTH_STRING, as in infra/docker-compose.yml;
    every flow test above reached it through PREFECT_API_AUTH_STRING."""
    import base64
    import urllib.error
    import urllib.request

    def status(path: str, auth: str | None = None, method: str = "POST") -> int:
        request = urllib.request.Request(f"{prefect_api}{path}", data=b"{}" if method == "POST" else None,
                                         method=method, headers={"Content-Type": "application/json"})
        if auth is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    assert status("/health", method="GET") == 200  # open, for health checks
    assert status("/flows/filter") == 401
    assert status("/deployments/filter") == 401
    assert status("/flows/filter", "lmpipe:wrong") == 401
    assert status("/flows/filter", prefect_auth) == 200


def _write_flow_params(project: Path, **flow: Any) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["flow"] = flow
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree guard uses Linux PR_SET_PDEATHSIG")
def test_a_stage_past_its_timeout_is_stopped_and_fails_the_flow(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_project(tracking=False)
    _write_flow_params(project, stage_timeouts={"clean": 8})
    monkeypatch.setenv("TEST_SLEEP_CLEAN", "120")
    start = time.monotonic()
    state = flow_module.pipeline(stages=["collect", "clean"], root=str(project), return_state=True)
    assert state.is_failed()
    assert "stage clean timed out after 8 s and was stopped" in state.message
    assert time.monotonic() - start < 60
    stage_pid = int((project / "clean.started").read_text())
    assert not _alive(stage_pid)
    # interrupted, not killed: the stage deleted its temp dir; collect's output stands
    assert [p.name for p in (project / "data").iterdir() if p.is_dir()] == ["raw"]
    assert ledger(project) == ["start collect", "done collect", "start clean"]

    _write_flow_params(project, stage_timeouts={"clena": 8})
    from lmpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="flow.stage_timeouts.clena: no such stage"):
        flow_module.pipeline(stages=["clean"], root=str(project))


def test_a_second_run_in_the_same_checkout_fails_at_once_or_waits(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipelines.guard import CheckoutBusy

    project = make_project(tracking=False)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipelines.flow import pipeline; "
            f"pipeline(root={str(project)!r}, stages=['collect'])")
    first = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TEST_SLEEP_COLLECT": "6"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (project / "collect.started").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never started collect"
        time.sleep(0.2)

    # fail: at once, naming the run that holds the checkout, and before touching params.yaml
    params_before = (project / "params.yaml").read_text()
    with pytest.raises(CheckoutBusy, match=rf"another flow run \(pid {first.pid} on .* since .*\) is running "
                                           r"in this checkout; not starting \(flow.concurrency: fail\)"):
        flow_module.pipeline(stages=["collect"], root=str(project), overrides=["flow.concurrency=fail"])
    assert (project / "params.yaml").read_text() == params_before
    assert first.poll() is None

    # wait (the default): runs once the first has finished, and finds its work done
    capsys.readouterr()
    assert flow_module.pipeline(stages=["collect"], root=str(project)) == {"collect": "skipped"}
    assert first.wait(timeout=30) == 0
    assert f"another flow run (pid {first.pid}" in capsys.readouterr().out
    assert ledger(project) == ["start collect", "done collect"]
