"""Deployments of the ``lmpipe-pipeline`` flow, with schedules, served from one machine.

One machine: ``lmpipe serve`` (the same as ``python pipelines/deployments.py``) registers the
deployments below with a Prefect server and runs their flow runs, scheduled or triggered by hand,
in subprocesses of this process until it is stopped (on SIGTERM it also pauses the deployments).
A cluster: ``prefect.yaml`` at the project root declares the same deployments for a work pool;
``prefect deploy --all`` registers them and ``prefect worker start --pool lmpipe`` runs them
(docs/operations.md).

Which Prefect server: the one named by ``PREFECT_API_URL``; without it, a server already
listening on 127.0.0.1:4200 (``prefect server start``); without that, ``lmpipe serve`` starts one
as a child process and stops it on exit. The temporary server that ``make run`` starts for one
flow run (``pipelines/guard.py``, Prefect's ephemeral mode) has no scheduler service, so schedules
need a real server.

| deployment   | schedule                          | runs                                   |
|--------------|-----------------------------------|----------------------------------------|
| nightly      | cron ``0 2 * * *``                | every stage (DVC skips unchanged ones) |
| data-refresh | every 6 hours (00, 06, 12, 18 h)  | every stage: a changed source reruns   |
|              |                                   | collect and all downstream, else none  |
| manual       | none (``prefect deployment run``) | chosen per run, e.g. ``-p promote=true``|
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefect import serve  # noqa: E402
from prefect.schedules import Cron, Interval, Schedule  # noqa: E402

from pipelines.flow import pipeline  # noqa: E402

log = logging.getLogger("lmpipe.serve")

# Interval schedules count from a fixed anchor so a restart of `lmpipe serve` neither fires a run
# at once nor shifts the times: every 6 hours from midnight UTC.
INTERVAL_ANCHOR = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LOCAL_API_URL = "http://127.0.0.1:4200/api"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of the pipeline flow: its name, schedules (possibly none) and parameters."""

    name: str
    description: str
    cron: str | None = None
    interval: dt.timedelta | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def schedules(self, timezone: str) -> list[Schedule]:
        if self.cron:
            return [Cron(self.cron, timezone=timezone)]
        if self.interval:
            return [Interval(self.interval, anchor_date=INTERVAL_ANCHOR, timezone=timezone)]
        return []


DEPLOYMENTS = [
    DeploymentSpec("nightly", "The whole pipeline every night; DVC skips stages whose inputs did not change.",
                   cron="0 2 * * *"),
    # The `inputs` stage fingerprints every source; DVC reruns collect and everything downstream of
    # it when one changed, and nothing when none did. It differs from nightly in its schedule only.
    DeploymentSpec("data-refresh", "Every 6 hours: when a source changed, collect and everything downstream rerun; "
                   "otherwise nothing runs.", interval=dt.timedelta(hours=6)),
    DeploymentSpec("manual", "No schedule: run on demand with chosen parameters (stages, preset, promote)."),
]


def build_deployments(root: Path | None = None, timezone: str = "UTC", names: list[str] | None = None) -> list[Any]:
    """Runner deployments of the pipeline flow for :data:`DEPLOYMENTS` (or those in ``names``).

    ``root`` (default: this project) becomes every run's ``root`` parameter. Reads nothing,
    writes nothing; raises ValueError for an unknown deployment name.
    """
    known = {spec.name: spec for spec in DEPLOYMENTS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; known: {sorted(known)}")
    chosen = [known[n] for n in names] if names else DEPLOYMENTS
    deployments = []
    for spec in chosen:
        parameters = dict(spec.parameters)
        if root is not None:
            parameters["root"] = str(Path(root).resolve())
        deployments.append(pipeline.to_deployment(
            spec.name, description=spec.description, schedules=spec.schedules(timezone),
            parameters=parameters, tags=["lmpipe"],
        ))
    return deployments


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(api_url: str | None = None, start_timeout: float = 120) -> Iterator[str]:
    """Yield the URL of a Prefect API with a scheduler: ``api_url``, ``PREFECT_API_URL`` or a local one.

    When none is given and nothing answers on 127.0.0.1:4200, start ``prefect server start``
    there as a child process (state in ``PREFECT_HOME``) and stop it on exit. Raises
    RuntimeError when that server does not come up.
    """
    url = api_url or os.environ.get("PREFECT_API_URL")
    if url:
        if not _healthy(url):
            raise RuntimeError(f"no Prefect server answers at {url}/health; start it or unset PREFECT_API_URL")
        yield url
        return
    if _healthy(LOCAL_API_URL):
        yield LOCAL_API_URL
        return
    prefect_bin = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect_bin), "server", "start", "--host", "127.0.0.1", "--port", "4200"]
    log.info("no PREFECT_API_URL: starting a local Prefect server (UI at http://127.0.0.1:4200)")
    # its own session: Ctrl-C reaches `lmpipe serve` only, which still needs the server to pause
    # its deployments on the way out; the server is stopped after that
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(LOCAL_API_URL):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not start; run `{' '.join(cmd)}` to see why")
            time.sleep(0.5)
        yield LOCAL_API_URL
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_deployments(root: Path | None = None, timezone: str = "UTC", names: list[str] | None = None,
                      limit: int = 1, api_url: str | None = None) -> None:
    """Register the deployments and run their flow runs here until interrupted (blocks).

    ``limit`` caps concurrent flow runs; the default 1 queues overlapping runs, because two
    pipelines in one workspace would contend for DVC's lock and the same outputs.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployments = build_deployments(root, timezone, names)
    with prefect_server(api_url) as url:
        os.environ["PREFECT_API_URL"] = url  # flow-run subprocesses inherit it
        with temporary_settings(updates={PREFECT_API_URL: url}):
            serve(*deployments, limit=limit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmpipe serve",
        description="Serve the lmpipe-pipeline deployments (nightly, data-refresh, manual) from this machine.",
    )
    parser.add_argument("--root", help="Project the runs work in (default: this one).")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of the schedules (default: UTC).")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"Serve only this deployment (repeatable; known: {', '.join(s.name for s in DEPLOYMENTS)}).")
    parser.add_argument("--limit", type=int, default=1, help="Concurrent flow runs (default: 1).")
    parser.add_argument("--api-url", help="Prefect API (default: PREFECT_API_URL, else a local server).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lmpipe serve``: parse ``argv`` and serve until Ctrl-C. Returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        serve_deployments(Path(args.root) if args.root else None, args.timezone, args.only, args.limit, args.api_url)
    except (ValueError, RuntimeError) as err:
        print(f"lmpipe serve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
