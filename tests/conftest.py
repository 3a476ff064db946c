"""Shared fixtures: every test runs offline with MLflow pointed at a per-session SQLite store."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """One real local Ray cluster for the session (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def repo_root() -> Path:
    return REPO


def _torch_on_one_thread() -> Iterator[None]:
    import torch  # here, not at the top: tests that never touch torch do not import it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the test. The test machine is shared and the models are
    tiny: one thread runs them several times faster than two contended ones (OpenMP threads
    spin-wait against other processes). A test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``, a test directory with an autouse
    fixture of its conftest that asks for it."""
    yield from _torch_on_one_thread()


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """:func:`one_thread` for the module-scoped fixtures that train or load models."""
    yield from _torch_on_one_thread()


@dataclass(frozen=True)
class MlflowAuth:
    """Settings of ``mlflow server --app-name basic-auth`` (MLflow's own authentication, as in
    infra/docker-compose.yml) and the credentials its clients pass through the environment."""

    username: str
    password: str
    secret_key: str

    def server_env(self, directory: Path) -> dict[str, str]:
        """Environment for a server whose user store lives in ``directory`` (created empty)."""
        ini = directory / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       # a verified password is cached for a minute: without it every request
                       # spends a PBKDF2 hash, which multiplies the time of a registry test
                       "auth_cache_ttl_seconds = 60\n")
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": self.username,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}

    @property
    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


@pytest.fixture(scope="session")
def mlflow_auth() -> MlflowAuth:
    return MlflowAuth("admin", secrets.token_urlsafe(16), secrets.token_urlsafe(16))
