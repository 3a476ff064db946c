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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-tree guard uses Linux PR_SET_PDEATHSIG")
def test_killed_flow_reruns_only_the_interrupted_stage(
    prefect_api: str, make_project: Callable[..., Path], ledger: Callable[[Path], list[str]]
) -> None:
    project = make_project(tracking=False)
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipelines.flow import pipeline; pipeline(root={str(project)!r})"
    env = {**os.environ, "TEST_SLEEP_CLEAN": "120"}
    flow_proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    started = project / "clean.started"
    deadline = time.monotonic() + 90
    while not started.exists():
        assert flow_proc.poll() is None, "flow exited before clean started"
        assert time.monotonic() < deadline, "clean never started"
        time.sleep(0.2)
    stage_pid = int(started.read_text())
    # clean is mid-write: its temp dir exists, the final output does not
    assert list((project / "data").glob(".clean.*.tmp"))
    flow_proc.send_signal(signal.SIGKILL)  # only the flow process; nothing else is told
    flow_proc.wait()

    deadline = time.monotonic() + flow_module.STOP_GRACE_SECONDS + 10
    while _alive(stage_pid):
        assert time.monotonic() < deadline, "the stage outlived the killed flow"
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
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
