"""Fixtures for orchestration tests: one real Prefect server per session and tiny DVC projects.

The Prefect server is the real one (``prefect server start`` on 127.0.0.1 with its own
``PREFECT_HOME``, requiring an API auth string as in infra/docker-compose.yml); it takes ~20 s to
start on two cores, so every test shares it. A tiny project
is a git + DVC repo whose three stages (named like the pipeline's: collect -> clean -> split) run
``stage.py`` below: each builds its output in a temp dir with ``lmpipe.io.atomic_dir``, writes a
manifest and opens its MLflow run with ``lmpipe.tracking.stage_run``, exactly as real stages do,
but in well under a second. ``TEST_SLEEP_<STAGE>`` makes a stage pause mid-write and
``TEST_FAIL_<STAGE>`` makes it fail; DVC does not hash the environment, so neither changes
what DVC considers up to date. For the MLflow server test, a throwaway PostgreSQL cluster
(``initdb``/``pg_ctl`` on a free loopback port) and ``mlflow server --app-name basic-auth`` on top
of it; skipped with
the reason where PostgreSQL or its Python driver is not installed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGE_SCRIPT = '''"""A tiny stage: derive two files from the upstream output, inside an atomic dir."""
import os
import sys
import time
from pathlib import Path

from lmpipe.config import load_params
from lmpipe.errors import LmpipeError
from lmpipe.io import atomic_dir, write_manifest
from lmpipe.tracking import stage_run

name, out = sys.argv[1], Path(sys.argv[2])
src = Path(sys.argv[3]) if len(sys.argv) > 3 else None
root = Path.cwd()
with open(root / "ledger.log", "a") as ledger:
    ledger.write(f"start {name}\\n")
if os.environ.get(f"TEST_FAIL_{name.upper()}"):
    raise SystemExit(f"lmpipe {name}: error: {LmpipeError('deliberate failure for the test')}")
params = load_params(root / "params.yaml", sections=["tracking"])
with stage_run(name, params.tracking, root) as tracker, atomic_dir(out) as tmp:
    # collect reads the project's corpus/ when it has one (the `inputs` stage fingerprints it)
    text = (src / "part-0.txt").read_text() if src else "".join(
        p.read_text() for p in sorted(root.glob("corpus/*.txt"))) or "doc"
    (tmp / "part-0.txt").write_text(f"{text} {name}")
    delay = float(os.environ.get(f"TEST_SLEEP_{name.upper()}", "0"))
    if delay:
        (root / f"{name}.started").write_text(str(os.getpid()))
        time.sleep(delay)
    (tmp / "part-1.txt").write_text("second part")
    write_manifest(tmp, stage=name, config={"name": name}, inputs={"src": src} if src else {})
    tracker.log_metrics({"parts": 2})
    tracker.log_artifact(tmp / "manifest.json")
with open(root / "ledger.log", "a") as ledger:
    ledger.write(f"done {name}\\n")
'''

STAGES = {
    "collect": {"cmd": "python stage.py collect data/raw", "deps": ["stage.py"], "outs": ["data/raw"]},
    "clean": {"cmd": "python stage.py clean data/clean data/raw", "deps": ["stage.py", "data/raw"],
              "outs": ["data/clean"]},
    "split": {"cmd": "python stage.py split data/split data/clean", "deps": ["stage.py", "data/clean"],
              "outs": ["data/split"]},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"{url} did not come up in {timeout:.0f} s:\n{tail}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def prefect_auth() -> str:
    """The ``user:password`` the session's Prefect server requires (PREFECT_SERVER_API_AUTH_STRING)."""
    return f"lmpipe:{secrets.token_urlsafe(16)}"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, prefect_auth: str) -> Iterator[str]:
    """A real Prefect server on a free loopback port that requires API auth, as in
    infra/docker-compose.yml; sets PREFECT_API_URL and PREFECT_API_AUTH_STRING here and for children."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_API_AUTH_STRING": prefect_auth}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc, log)
        saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_AUTH_STRING")}
        os.environ.update({"PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PREFECT_API_AUTH_STRING": prefect_auth})
        # Prefect's background threads (run logs, events) read the process-wide settings: without
        # this they find no API and start an ephemeral server of their own
        refresh_global_settings_context()
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home),
                                         PREFECT_API_AUTH_STRING: prefect_auth}):
            yield url
            # send this process's buffered run logs and events while the server is still up
            # (otherwise they retry against a closed port at interpreter exit)
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_global_settings_context()
    finally:
        stop_process(proc)


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a fresh git + DVC project with the three tiny stages; returns its root.

    ``inputs``: also the real ``inputs`` stage (``lmpipe inputs``) fingerprinting a ``files``
    source ``corpus/*.txt`` that collect depends on, as in the shipped dvc.yaml.
    """

    def make(name: str = "project", tracking: bool = True, inputs: bool = False) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "stage.py").write_text(STAGE_SCRIPT)
        stages = STAGES
        experiment = f"orchestration-{tmp_path.name}-{name}"
        params: dict[str, object] = {"tracking": {"enabled": tracking, "experiment": experiment}}
        if inputs:
            (root / "corpus").mkdir()
            (root / "corpus" / "a.txt").write_text("A first document.\n")
            params["collect"] = {"sources": [{"type": "files", "name": "local", "paths": ["corpus/*.txt"]}]}
            stages = {"inputs": {"cmd": "lmpipe inputs", "always_changed": True, "outs": [{"data/inputs": {"cache": False}}]},
                      **STAGES}
            stages["collect"] = {**STAGES["collect"], "deps": ["stage.py", "data/inputs/collect.json"]}
        (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        (root / ".gitignore").write_text("ledger.log\n*.started\n.lmpipe/\n")
        _run(["git", "init", "-q"], root)
        _run([str(BIN / "dvc"), "init", "-q"], root)
        _run([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
        return root

    return make


@pytest.fixture
def ledger() -> Callable[[Path], list[str]]:
    """Reads the stage starts/finishes that stage.py recorded in a project, in order."""

    def read(root: Path) -> list[str]:
        path = root / "ledger.log"
        return path.read_text().splitlines() if path.exists() else []

    return read


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root, so drop to the `postgres` account there."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields a URL of an empty database."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="MLflow's PostgreSQL driver is missing: add psycopg2-binary")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(["id", "postgres"],
                                                                               capture_output=True).returncode):
        pytest.skip("running as root without a `postgres` account to run the server as")
    base = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))  # not under pytest's 0700 tmp: postgres must enter it
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    run = lambda cmd: subprocess.run(_as_postgres_user(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    proc = run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "start",
                "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr + (base / "server.log").read_text()
    try:
        proc = run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE mlflow"])
        assert proc.returncode == 0, proc.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres: str, tmp_path: Path, mlflow_auth: Any) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` with the PostgreSQL store, proxied artifacts and MLflow's basic-auth app,
    as in infra/docker-compose.yml; yields (URL, artifact dir). ``mlflow_auth`` holds its admin."""
    port, artifacts, log = free_port(), tmp_path / "artifacts", tmp_path / "mlflow-server.log"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", postgres,
           "--artifacts-destination", artifacts.as_uri(), "--serve-artifacts", "--app-name", "basic-auth",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, **mlflow_auth.server_env(tmp_path)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 180, proc, log)
        yield url, artifacts
    finally:
        stop_process(proc)
