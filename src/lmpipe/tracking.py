"""MLflow tracking for stages.

Every stage run through the CLI is one MLflow run named after the stage, with the stage's config
as params, its summary's numbers as metrics and its reports as artifacts. When a pipeline (Prefect
flow) run is in progress, ``LMPIPE_PARENT_RUN_ID`` holds its MLflow run id and each stage's run is
nested under it.

Default store: ``sqlite:///mlflow.db`` at the project root with artifacts in ``mlartifacts/``;
``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri`` in params.yaml) overrides it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmpipe.config import TrackingConfig

log = logging.getLogger(__name__)

PARENT_ENV = "LMPIPE_PARENT_RUN_ID"
# MLflow's UI opens an experiment by its kind: a GenAI one on traces and judges, a model-training
# one on its runs. Unset, it guesses from what the experiment holds and may guess GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Stages whose runs get MLflow's system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py).
TRAINING_STAGES = frozenset({"pretrain", "finetune", "distill"})
_active: StageTracker | None = None


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"


def ui_url(base: str, experiment_id: str | None) -> str:
    """The MLflow UI page of an experiment's runs (``base`` alone without an experiment).

    MLflow 3's UI opens in its GenAI mode (traces, judges, prompts) unless the page asks for model
    training (``workflowType=machine_learning``), whatever the experiment's kind tag says.
    """
    base = base.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else base


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, list) and obj and all(isinstance(v, Mapping) for v in obj):
        for idx, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}{idx}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


class StageTracker:
    """Thin handle on the stage's MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, mlflow_module: Any | None, run_id: str | None) -> None:
        self._mlflow = mlflow_module
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._mlflow is None:
            return
        flat = {k: str(v)[:5000] for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._mlflow is None:
            return
        clean = {}
        for key, value in flatten(metrics).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                clean[key.replace("@", "_")] = float(value)
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if self._mlflow is None:
            return
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_dict(obj, name)

    def log_text(self, text: str, name: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_text(text, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows as an MLflow table artifact ``name`` (a .json file; rows are appended to an existing one)."""
        if self._mlflow is not None and rows:
            import pandas as pd

            self._mlflow.log_table(pd.DataFrame(rows), artifact_file=name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


def active() -> StageTracker:
    """The tracker of the stage running now (a disabled one outside a stage run)."""
    return _active if _active is not None else StageTracker(None, None)


def setup_mlflow(cfg: TrackingConfig, root: Path) -> Any:
    """Point MLflow at the configured store and experiment; return the mlflow module."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        artifact_location = None
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            artifact_location = (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location,
                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    elif EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag existed; a kind set by hand stays
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(cfg.experiment)
    return mlflow


@contextlib.contextmanager
def stage_run(stage: str, cfg: TrackingConfig, root: Path, tags: Mapping[str, Any] | None = None) -> Iterator[StageTracker]:
    """Open an MLflow run for ``stage`` (nested under the pipeline run if there is one); training
    stages log system metrics (``tracking.system_metrics``)."""
    global _active
    if not cfg.enabled:
        tracker = StageTracker(None, None)
        _active = tracker
        try:
            yield tracker
        finally:
            _active = None
        return
    mlflow = setup_mlflow(cfg, root)
    parent = os.environ.get(PARENT_ENV) or None
    run_tags = {"lmpipe.stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
    system = cfg.system_metrics and stage in TRAINING_STAGES
    with mlflow.start_run(run_name=stage, nested=parent is not None, parent_run_id=parent, tags=run_tags,
                          log_system_metrics=system) as run:
        tracker = StageTracker(mlflow, run.info.run_id)
        _active = tracker
        try:
            yield tracker
        finally:
            _active = None
