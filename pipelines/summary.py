"""What a finished flow run tells its user: the registry's state and the Prefect artifacts.

:func:`registry_entries` reads ``metrics/register.json`` and the aliases that stand now in the
MLflow registry; the printed summary (``pipelines/flow.py``) and the markdown artifact both show
it. :func:`publish_artifacts` attaches to the flow run, where a Prefect user looks for it, a
markdown artifact (stages run or skipped, key metrics, registry decisions with the gate's reasons,
the report's path, the MLflow run) and a link artifact to the HTML report. Both artifacts have
keys, so the Artifacts page keeps their history across runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.stages import STAGES

log = logging.getLogger(__name__)

SUMMARY_KEY = "lmpipe-run-summary"
REPORT_KEY = "lmpipe-report"
REPORT = "reports/report.html"
# The numbers a reader looks at first, wherever a stage's metrics file has them.
KEY_METRICS = ("val_bpb", "val_loss", "train_loss", "dev_loss", "dev_accuracy", "test_accuracy", "test_macro_f1", "test_f1",
               "bytes_per_token", "parameters", "steps", "tokens_per_s")
COMPARISON_METRICS = ("parameters_pct", "quality_retained_pct", "speedup_b1")


@dataclass
class RegistryEntry:
    """One model of ``metrics/register.json`` with its aliases as they stand in the registry."""

    name: str
    version: int
    aliases: list[str] = field(default_factory=list)
    champion: int | None = None  # the version holding ``champion`` now
    reasons: list[str] = field(default_factory=list)  # why the gate kept champion where it was
    moved: bool = False  # this run moved champion to this version
    unchanged: bool = False  # the model had not changed: no new version


def registry_entries(root: Path, uri: str | None) -> tuple[list[RegistryEntry], str | None]:
    """(models of ``root/metrics/register.json`` with their aliases now, a problem reading the
    aliases or None). No file, or one that does not parse, gives no entries: the summary of a run
    must not fail because of it."""
    path = root / "metrics" / "register.json"
    if not path.is_file():
        return [], None
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get("models", [])
    except (OSError, ValueError, AttributeError):
        return [], None
    entries = []
    for item in raw:
        gate = item.get("gate") or {}
        entries.append(RegistryEntry(
            name=str(item["name"]), version=int(item["version"]), moved=bool(gate.get("moved")),
            reasons=[] if gate.get("moved") else [str(r) for r in gate.get("reasons") or []],
            unchanged=bool(item.get("unchanged"))))
    if not uri:
        return entries, None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for entry in entries:
            for alias, version in client.get_registered_model(entry.name).aliases.items():
                if int(version) == entry.version:
                    entry.aliases.append(alias)
                if alias == "champion":
                    entry.champion = int(version)
            entry.aliases.sort()
    except Exception as err:  # the summary must not fail a finished run
        return entries, f"could not read aliases ({type(err).__name__}: {err})"
    return entries, None


def mlflow_ui(uri: str, run_id: str | None) -> str:
    """How to open the runs of this flow run's experiment in the MLflow UI: the server's page, or
    the command that serves a local store and the page to open."""
    from lmpipe.tracking import ui_url

    experiment_id = None
    if run_id:
        try:
            from mlflow import MlflowClient

            experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - the summary must not fail a finished run
            experiment_id = None
    if uri.startswith(("http://", "https://")):
        return ui_url(uri, experiment_id)
    return f".venv/bin/mlflow ui --backend-store-uri {uri}, then {ui_url('http://127.0.0.1:5000', experiment_id)}"


def key_metrics(root: Path) -> list[tuple[str, str, float]]:
    """(metrics file stem, key, value) of :data:`KEY_METRICS` in each ``metrics/*.json``, and each
    student's row of the evaluate stage's teacher/student comparison."""
    rows: list[tuple[str, str, float]] = []
    stages = list(STAGES)  # metrics files are named after their stage (finetune_cls, distill_baseline, ...)
    order = lambda path: (next((i for i, s in enumerate(stages) if path.stem.startswith(s)), len(stages)), path.stem)  # noqa: E731
    for path in sorted((root / "metrics").glob("*.json"), key=order):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or path.stem == "register":
            continue
        if path.stem == "evaluate":
            for model, values in (data.get("comparison") or {}).items():
                rows += [(f"evaluate ({model})", k, values[k]) for k in COMPARISON_METRICS
                         if isinstance(values.get(k), int | float)]
            continue
        rows += [(path.stem, k, data[k]) for k in KEY_METRICS
                 if isinstance(data.get(k), int | float) and not isinstance(data.get(k), bool)]
    return rows


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: dict[str, str], root: Path, run_id: str | None, uri: str | None) -> str:
    """The flow run's summary as markdown (what :func:`publish_artifacts` attaches)."""
    ran = [s for s, state in results.items() if state == "ran"]
    lines = ["# lmpipe pipeline", "", f"Project `{root}`: {len(ran)} of {len(results)} stages ran, "
             f"{len(results) - len(ran)} were unchanged (skipped by DVC).", "",
             "## Stages", "", "| stage | result |", "|---|---|"]
    lines += [f"| {stage} | {'ran' if state == 'ran' else 'skipped (unchanged)' if state == 'skipped' else state} |"
              for stage, state in results.items()]
    by_source: dict[str, list[str]] = {}
    for source, key, value in key_metrics(root):
        by_source.setdefault(source, []).append(f"{key} {_number(value)}")
    if by_source:
        lines += ["", "## Key metrics", "", "| from | metrics |", "|---|---|"]
        lines += [f"| {source} | {', '.join(values)} |" for source, values in by_source.items()]
    entries, problem = registry_entries(root, uri)
    if entries or problem:
        lines += ["", "## Model registry", "", "| model | version | aliases | decision |", "|---|---|---|---|"]
        for entry in entries:
            if entry.unchanged:
                decision = "unchanged since this version: not registered again"
            elif entry.moved:
                decision = "promoted to champion (gate passed)"
            elif entry.champion is not None and entry.champion != entry.version:
                decision = f"champion stays v{entry.champion}" + (f": {'; '.join(entry.reasons)}" if entry.reasons else "")
            else:
                decision = "; ".join(entry.reasons) or "registered"
            lines.append(f"| {entry.name} | {entry.version} | {', '.join(entry.aliases) or '-'} | {_cell(decision)} |")
        if problem:
            lines += ["", f"Registry: {problem}"]
    lines += ["", "## Where to look", ""]
    report = root / REPORT
    lines.append(f"- Report: `{report}`" if report.is_file() else "- Report: not written by this run's stages")
    if run_id:
        lines.append(f"- MLflow pipeline run: `{run_id}`" + (f" on {uri}" if uri else ""))
    if uri:
        lines.append(f"- MLflow UI: {mlflow_ui(uri, run_id)}")
    return "\n".join(lines) + "\n"


def publish_artifacts(results: dict[str, str], root: Path, run_id: str | None, uri: str | None) -> list[Any]:
    """Attach the summary (markdown) and a link to the report to the current Prefect flow run;
    returns the artifact ids. A failure is logged, never raised: the run's work is done."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    ids = []
    try:
        ids.append(create_markdown_artifact(markdown=markdown(results, root, run_id, uri), key=SUMMARY_KEY,
                                            description="Stages, key metrics, registry decisions, report"))
        report = root / REPORT
        if report.is_file():
            ids.append(create_link_artifact(link=report.resolve().as_uri(), link_text=str(report.resolve()),
                                            key=REPORT_KEY, description="The HTML report of data and models"))
    except Exception as err:  # noqa: BLE001 - the run's work is done; a missing artifact is not a failure
        log.warning("could not attach the Prefect artifacts: %s: %s", type(err).__name__, err)
    return ids
