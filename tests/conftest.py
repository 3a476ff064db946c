"""Shared fixtures: every test runs offline with MLflow pointed at a per-session SQLite store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    store = tmp_path_factory.mktemp("mlflow")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    os.environ.pop("LMPIPE_PARENT_RUN_ID", None)


@pytest.fixture
def repo_root() -> Path:
    return REPO
