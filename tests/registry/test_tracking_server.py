"""Against a real MLflow tracking server (``mlflow server --app-name basic-auth`` on 127.0.0.1 with a
SQLite backend): requests without credentials are refused; register -> promote -> load by alias ->
predict as the pipeline's own account; another account cannot move `champion`."""

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
from mlflow.server import get_app_client

from lmpipe.config import Paths
from lmpipe.registry import register
from lmpipe.registry.config import RegisterConfig
from lmpipe.registry.promote import promote_candidates


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, servers: Any, mlflow_auth: Any) -> Iterator[tuple[str, Path]]:
    """(URL, artifact root) of an ``mlflow server`` subprocess with MLflow's basic-auth app (as in
    infra/docker-compose.yml), stopped after the module; ``mlflow_auth`` holds its admin."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = servers.free_port()
    artifacts = root / "artifacts"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{root / 'server.db'}", "--default-artifact-root", str(artifacts),
               "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           **mlflow_auth.server_env(root)}
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


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of a GET, with basic auth when given."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def pipeline_user(server: tuple[str, Path], mlflow_auth: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A non-admin MLflow account (like compose's `pipeline` user) in the client's environment."""
    import secrets

    url, _ = server
    for key, value in mlflow_auth.client_env.items():
        monkeypatch.setenv(key, value)
    name, password = f"pipeline-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    get_app_client("basic-auth", tracking_uri=url).create_user(name, password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    yield name


def test_unauthenticated_requests_are_refused(server: tuple[str, Path], mlflow_auth: Any) -> None:
    url, _ = server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(f"{url}/health") == 200  # the health check stays open (compose's healthcheck)
    assert _status(search) == 401
    assert _status(f"{url}/api/2.0/mlflow/registered-models/search") == 401
    assert _status(f"{url}/api/2.0/mlflow-artifacts/artifacts") == 401  # artifact proxy: no reads, no uploads
    assert _status(f"{url}/api/2.0/mlflow/registered-models/alias?name=x&alias=champion") == 401
    assert _status(search, (mlflow_auth.username, "wrong-password")) == 401
    assert _status(search, (mlflow_auth.username, mlflow_auth.password)) == 200


@pytest.mark.slow
def test_register_promote_load_by_alias_and_predict(server: tuple[str, Path], project: Paths, models: Any,
                                                    monkeypatch: pytest.MonkeyPatch, pipeline_user: str,
                                                    mlflow_auth: Any) -> None:
    """As the pipeline's own (non-admin) account, credentials from MLFLOW_TRACKING_USERNAME/PASSWORD;
    another authenticated user may read the registry but not move `champion`."""
    from mlflow.exceptions import MlflowException

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

        # another account: may read (default_permission = READ), may not move the alias or add versions
        other, password = f"viewer-{pipeline_user}", "viewer-password-1"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_auth.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_auth.password)
        get_app_client("basic-auth", tracking_uri=url).create_user(other, password)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", other)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        assert str(client.get_model_version_by_alias("http-pretrain", "champion").version) == "1"
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            client.set_registered_model_alias("http-pretrain", "champion", "1")
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            client.delete_registered_model_alias("http-pretrain", "candidate")
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(before)
