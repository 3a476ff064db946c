"""MLflow tracking as a user sees it in the UI: a model-training experiment, system metrics on
training stages, and the training loop's background logging (both backends) with sample tables."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lmpipe.config import TrackingConfig
from lmpipe.errors import ConfigError
from lmpipe.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, stage_run
from lmpipe.train.callbacks import AsyncTracker


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking_uri of the config wins


def test_experiment_is_a_model_training_one_and_training_runs_get_system_metrics(
        tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = TrackingConfig(experiment="kinds", tracking_uri=store)
    with stage_run("pretrain", cfg, tmp_path) as train_run:
        time.sleep(1.0)
    with stage_run("clean", cfg, tmp_path) as clean_run:
        time.sleep(0.5)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("kinds")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    train_metrics = client.get_run(train_run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in train_metrics
    assert not any(k.startswith("system/") for k in client.get_run(clean_run.run_id).data.metrics)


def test_older_experiment_gets_the_kind_but_a_kind_set_by_hand_stays(tmp_path: Path, store: str) -> None:
    uri = store
    client = MlflowClient(uri)
    client.create_experiment("old")
    client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("old", "genai"):
        with stage_run("clean", TrackingConfig(experiment=name, tracking_uri=uri, system_metrics=False), tmp_path):
            pass
    assert client.get_experiment_by_name("old").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment_by_name("genai").tags[EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.parametrize("backend", ["thread", "mlflow"])
def test_async_tracker_backends_log_metrics_params_and_sample_tables(tmp_path: Path, store: str,
                                                                    backend: str) -> None:
    cfg = TrackingConfig(experiment=f"async-{backend}", tracking_uri=store)
    with stage_run("finetune", cfg.model_copy(update={"system_metrics": False}), tmp_path) as stage:
        tracker = AsyncTracker(stage, min_interval=0.05, backend=backend)
        for step in range(1, 6):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        tracker.log_params({"resolved": {"world_size": 1}})
        tracker.log_table([{"step": 5, "text": "once upon a time"}], "samples.json")
        tracker.log_table([{"step": 6, "text": "the end"}], "samples.json")
        tracker.close()
    client = MlflowClient(cfg.tracking_uri)
    assert [m.step for m in client.get_metric_history(stage.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert client.get_run(stage.run_id).data.params["resolved.world_size"] == "1"
    mlflow.set_tracking_uri(cfg.tracking_uri)
    table = mlflow.load_table("samples.json", run_ids=[stage.run_id])
    assert table["text"].tolist() == ["once upon a time", "the end"]  # rows appended, one table


def test_unknown_backend_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMPIPE_ASYNC_LOGGING", "carrier-pigeon")
    with stage_run("pretrain", TrackingConfig(enabled=False), tmp_path) as stage, \
            pytest.raises(ConfigError, match="LMPIPE_ASYNC_LOGGING='carrier-pigeon': expected one of thread, mlflow"):
        AsyncTracker(stage)
