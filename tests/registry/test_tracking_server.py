"""Against a real MLflow tracking server (``mlflow server`` on 127.0.0.1 with a SQLite backend):
register -> promote -> load by alias -> predict."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from lmpipe.config import Paths
from lmpipe.registry import register
from lmpipe.registry.config import RegisterConfig
from lmpipe.registry.promote import promote_candidates


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, servers: Any) -> Iterator[tuple[str, Path]]:
    """(URL, artifact root) of an ``mlflow server`` subprocess, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = servers.free_port()
    artifacts = root / "artifacts"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{root / 'server.db'}", "--default-artifact-root", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, env=env, cwd=root, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        servers.wait_ok(proc, f"{url}/health", log, "mlflow server")
        yield url, artifacts
    finally:
        servers.stop(proc)


@pytest.mark.slow
def test_register_promote_load_by_alias_and_predict(server: tuple[str, Path], project: Paths, models: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, artifact_root = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("LMPIPE_PARENT_RUN_ID", raising=False)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        models.pretrain(project, seed=3, val_bpb=1.1)
        cfg = RegisterConfig.model_validate({
            "name_prefix": "http", "auto_promote": False,
            "models": [{"stage": "pretrain", "metrics": {"val_bpb": "metrics/pretrain.json:val_bpb"}}],
        })
        summary = register.run(cfg, project)
        client = MlflowClient()
        assert summary["http-pretrain/version"] == 1
        aliases = client.get_registered_model("http-pretrain").aliases
        assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1"}

        decisions = promote_candidates(cfg)  # what `lmpipe promote` runs after the pipeline
        assert [d.moved for d in decisions] == [True]
        assert str(client.get_model_version_by_alias("http-pretrain", "champion").version) == "1"

        loaded = mlflow.pyfunc.load_model("models:/http-pretrain@champion")
        output = loaded.predict(pd.DataFrame({"prompt": ["the river", "rain"]}), params={"max_new_tokens": 5})
        assert output["text"].tolist() == [models.generation(project, p, 5, temperature=0.0) for p in ("the river", "rain")]
        assert list(artifact_root.rglob("model.safetensors")), "artifacts are stored under the server's artifact root"
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(before)
