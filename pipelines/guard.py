"""What keeps a flow run within bounds: no process outlives it, no stage runs past its limit, and
two runs never work in one checkout at the same time.

- :func:`guarded` wraps a command so that its whole process tree dies with the flow process, even
  when that is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``).
- :func:`run_streaming` runs a guarded command with a deadline: past it, the tree is interrupted
  (SIGINT, so atomic writers delete their temp dirs), then killed, and ``TimeoutError`` raised.
- :func:`hold_checkout` is a per-checkout lock (``flock`` on ``.dvc/tmp/lmpipe-flow.lock``): a
  second run waits for the first or fails at once naming it. The kernel drops the lock when its
  holder dies, however it dies, so a crashed run never leaves a stale lock behind.
- :func:`temporary_prefect_server`: without a configured Prefect API, the flow's own Prefect
  server for the duration of the run, guarded like a stage and requiring a per-run auth string.
  (Prefect's built-in ephemeral server is a plain child process that outlives a killed flow.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lmpipe.errors import LmpipeError

# Seconds an interrupted stage gets to delete its temp output dir before its process group is killed.
STOP_GRACE_SECONDS = 20
# The flow's own Prefect server has nothing to clean up: a short grace suffices.
SERVER_GRACE_SECONDS = 5
LOCK_FILE = Path(".dvc") / "tmp" / "lmpipe-flow.lock"


class CheckoutBusy(LmpipeError):
    """Another flow run is running in this checkout (``flow.concurrency``)."""


# Runs argv[3:] as the leader of a new process group and takes the whole group down when the
# flow process (argv[1]) dies: PR_SET_PDEATHSIG delivers SIGTERM to this guard, which interrupts
# the group (SIGINT lets the stage's atomic writers delete their temp dirs) and SIGKILLs what is
# left after a grace period (argv[2]). Without it, `dvc repro` and its stage would outlive a killed
# flow, hold DVC's lock and race the rerun for the same outputs.
_GUARD = r"""
import ctypes, os, signal, subprocess, sys, time
parent, grace, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
child, deadline = None, None
def stop(signum, frame):
    global deadline
    deadline = deadline or time.monotonic() + grace
    if child is not None:
        try:
            os.killpg(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(143)
child = subprocess.Popen(cmd, start_new_session=True)
if deadline is not None:
    stop(signal.SIGTERM, None)
while True:
    try:
        code = child.wait(timeout=0.5)
        break
    except subprocess.TimeoutExpired:
        if deadline is not None and time.monotonic() > deadline:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
try:
    os.killpg(child.pid, signal.SIGKILL)
except ProcessLookupError:
    pass
sys.exit(code if code >= 0 else 128 - code)
"""


def guarded(cmd: list[str], grace_s: float = STOP_GRACE_SECONDS) -> list[str]:
    """``cmd`` wrapped so that its whole process tree dies with this process (Linux; elsewhere as is).

    SIGTERM to the wrapper stops the tree the same way: SIGINT, then SIGKILL after ``grace_s``.
    The death signal follows the thread that starts the wrapper, so start it from a thread that
    lives as long as the command should (the main thread, or the one waiting for it).
    """
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _GUARD, str(os.getpid()), str(grace_s), *cmd]


def _stop(proc: subprocess.Popen[str], grace_s: float) -> None:
    """Stop a guarded command: SIGTERM to the guard, which interrupts, then kills, its tree."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_streaming(cmd: list[str], cwd: str | Path, env: dict[str, str], on_line: Callable[[str], None],
                  timeout_s: float | None = None, grace_s: float = STOP_GRACE_SECONDS) -> int:
    """Run ``cmd`` guarded, passing each line of its output (stdout and stderr) to ``on_line``.

    Returns the exit code. Raises TimeoutError after ``timeout_s`` seconds, once the command's
    tree is stopped; any exception while waiting (the task's own timeout, Ctrl-C) stops it too.
    """
    proc = subprocess.Popen(guarded(cmd, grace_s), cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=1)

    def pump(stream: IO[str]) -> None:
        for line in stream:
            on_line(line)

    assert proc.stdout is not None
    # a reader thread, so that waiting (and its deadline) never depends on the command printing
    reader = threading.Thread(target=pump, args=(proc.stdout,), name="stage-output", daemon=True)
    reader.start()
    try:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc, grace_s)
            raise TimeoutError(f"still running after {timeout_s:g} s: stopped") from None
    except BaseException:
        _stop(proc, grace_s)
        raise
    finally:
        reader.join(timeout=10)
        proc.stdout.close()
    return proc.returncode


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def hold_checkout(root: Path, concurrency: str, wait_timeout_s: float,
                  say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``root``'s flow lock for the duration; what a second run does depends on ``concurrency``.

    ``"wait"``: wait until the holder finishes (at most ``wait_timeout_s``, then CheckoutBusy);
    ``"fail"``: raise CheckoutBusy at once. The message names the holder (pid, host, start time).
    Per machine: ``flock`` does not reach across hosts on every network file system, so give each
    worker machine its own checkout (docs/operations.md).
    """
    if not (root / ".dvc").is_dir():
        raise LmpipeError(f"{root}: not a DVC project (no .dvc/); run the flow in an lmpipe checkout (--root)")
    path = root / LOCK_FILE
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            if concurrency == "fail":
                raise CheckoutBusy(f"{root}: another flow run ({holder}) is running in this checkout; not "
                                   "starting (flow.concurrency: fail). Run again when it has finished, or set "
                                   "flow.concurrency: wait")
            say(f"another flow run ({holder}) is running in {root}; waiting up to {wait_timeout_s:g} s for it "
                "(flow.concurrency: wait)")
            deadline = time.monotonic() + wait_timeout_s
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise CheckoutBusy(f"{root}: another flow run ({holder}) is still running after "
                                       f"{wait_timeout_s:g} s (flow.wait_timeout_s); not starting")
                time.sleep(0.5)
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the flow's Prefect server exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the flow's Prefect server did not answer at {url} within {timeout_s:g} s")


@contextlib.contextmanager
def temporary_prefect_server(startup_timeout_s: float = 180.0) -> Iterator[str | None]:
    """A Prefect server for this process only, when no Prefect API is configured; yields its URL
    (None, and nothing started, when ``PREFECT_API_URL`` is set).

    The same server Prefect would start for a one-off run (its API app under uvicorn, UI off, the
    history in ``PREFECT_HOME``), but guarded: it dies with this process, even on SIGKILL. It
    listens on 127.0.0.1 and requires a random per-run auth string, so other local users cannot
    drive it while it runs.
    """
    import prefect
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield None
        return
    port, auth = _free_port(), f"lmpipe:{secrets.token_urlsafe(24)}"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    proc = subprocess.Popen(guarded(cmd, SERVER_GRACE_SECONDS), env=env, text=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc, startup_timeout_s)
        with _api_settings(url, auth):
            try:
                yield url
            finally:
                # send the run's buffered logs and events while the server still listens
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        _stop(proc, SERVER_GRACE_SECONDS)


@contextlib.contextmanager
def _api_settings(url: str, auth: str) -> Iterator[None]:
    """Point this process's Prefect client at ``url``: this thread's settings and the process-wide
    ones, which Prefect's background threads (run logs, events) read; otherwise they would find no
    API and start Prefect's own unguarded ephemeral server. The environment is left as it was, so
    the stages and the run's summary do not see a server that is gone once the run ends."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    keys = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth})
    try:
        refresh_global_settings_context()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
            yield
    finally:
        refresh_global_settings_context()
