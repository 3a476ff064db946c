"""The flow run's Prefect artifacts, read back from a real Prefect server: a markdown summary
(stages run or skipped, key metrics, registry decisions with reasons, report path) and a link to
the report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines import flow as flow_module
from pipelines import summary

pytestmark = pytest.mark.slow


def artifacts_of(flow_run_id: object) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def test_flow_run_carries_summary_and_report_link_artifacts(prefect_api: str, make_project: Callable[..., Path]) -> None:
    from mlflow import MlflowClient

    project = make_project("artifacts")
    (project / "reports").mkdir()
    (project / "reports" / "report.html").write_text("<html>report</html>")
    (project / "metrics").mkdir()
    (project / "metrics" / "pretrain.json").write_text(json.dumps({"val_bpb": 0.2178, "steps": 1200, "mfu": 0.1}))
    (project / "metrics" / "evaluate.json").write_text(json.dumps(
        {"comparison": {"student": {"quality_retained_pct": 91.5, "speedup_b1": 2.25}}}))
    name = f"summary-{project.parent.name}"[:60]
    # the store the flow's stages use: the session's MLFLOW_TRACKING_URI, named explicitly because an
    # earlier test in this process may have pointed mlflow's global tracking URI at its own server
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=(project / "model").as_uri())
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "candidate", "2")
    (project / "metrics" / "register.json").write_text(json.dumps({"models": [
        {"name": name, "version": 2, "gate": {"moved": False, "reasons": ["val_bpb 0.25 vs champion 0.21: worse"]}}]}))

    state = flow_module.pipeline(stages=["collect", "clean"], root=str(project), return_state=True)
    assert state.is_completed()
    found = artifacts_of(state.state_details.flow_run_id)
    assert set(found) == {summary.SUMMARY_KEY, summary.REPORT_KEY}
    text = found[summary.SUMMARY_KEY].data
    assert found[summary.SUMMARY_KEY].type == "markdown"
    assert "| collect | ran |" in text and "| clean | ran |" in text
    assert "| pretrain | val_bpb 0.2178, steps 1,200 |\n| evaluate (student) | quality_retained_pct 91.5, speedup_b1 2.25 |" in text
    assert "mfu" not in text  # only the key metrics, in pipeline order
    assert f"| {name} | 2 | candidate | champion stays v1: val_bpb 0.25 vs champion 0.21: worse |" in text
    assert f"- Report: `{project / 'reports' / 'report.html'}`" in text
    experiment = client.get_experiment_by_name(f"orchestration-{project.parent.name}-artifacts").experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning" in text  # runs, not GenAI
    link = found[summary.REPORT_KEY]
    report = (project / "reports" / "report.html").resolve()
    assert link.data == f"[{report}]({report.as_uri()})"  # Prefect keeps a link artifact as a markdown link

    again = flow_module.pipeline(stages=["collect", "clean"], root=str(project), return_state=True)
    text = artifacts_of(again.state_details.flow_run_id)[summary.SUMMARY_KEY].data
    assert "| collect | skipped (unchanged) |" in text and "0 of 2 stages ran, 2 were unchanged" in text
