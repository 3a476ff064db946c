"""The ``engine`` params section: where the data stages compute (this machine's processes or Ray).

``engine`` is operational, like a stage's ``workers``: it decides where the work runs, never what
comes out. It is no stage's section, so it is not part of any stage's config hash or DVC params,
and switching ``kind`` or ``address`` leaves every output byte and manifest as it was.

The CLI (:func:`lmpipe.cli.run_stage`) installs the loaded section with :func:`use` around a stage;
a stage asks :func:`current` which engine to run on. :func:`connect` joins or starts Ray.

Faults. Every Ray task of the data stages is submitted with ``max_retries=MAX_RETRIES`` (3): Ray
re-runs a task whose worker process or node died (a killed or OOM-killed worker, a preempted
node), which is what a long run on many machines meets, and the tasks are pure functions of
their input shard, so a re-run gives the same result. Application errors are never retried
(``retry_exceptions`` stays off): a DataError in a task is a fact about the data and comes back to
the driver at once, as itself (:func:`raise_task_error`). When a task has died more than
``MAX_RETRIES`` times the stage fails; its output is built in :func:`lmpipe.io.atomic_dir`, so it
fails without a partial output and the previous output and manifest stay as they were. Actors
are not used, so no actor restarts are configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator

from lmpipe.config import Section
from lmpipe.errors import ConfigError, EngineError, LmpipeError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 3  # Ray re-runs a stage's task lost with its worker this often before the stage fails


class EngineConfig(Section):
    """Where the data stages (collect, clean, validate, tokenize) run. Operational: outputs are identical on every engine."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: a process pool on this machine; ray: Ray Data tasks on a Ray cluster.")
    address: str | None = Field(
        None,
        description="Ray cluster to join: null starts a Ray on this machine's cores; 'auto' joins the cluster "
        "started here with `ray start`; 'host:port' (the head's GCS) or 'ray://host:10001' (Ray Client).")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a Ray started here (address null); default: all.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        host, port = _host_port(value)
        if not host or port is None:
            raise ValueError(f"'{value}': expected null, 'auto', 'host:port' or 'ray://host:port'")
        return value


def _host_port(address: str) -> tuple[str, int | None]:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return rest, None
    return host.strip("[]"), int(port)


_CURRENT: list[EngineConfig] = []


@contextlib.contextmanager
def use(cfg: EngineConfig) -> Iterator[EngineConfig]:
    """Run the block with ``cfg`` as the engine of the data stages."""
    _CURRENT.append(cfg)
    try:
        yield cfg
    finally:
        _CURRENT.pop()


def current() -> EngineConfig:
    """The engine installed by :func:`use`, else the default (local)."""
    return _CURRENT[-1] if _CURRENT else EngineConfig()


def _reachable(address: str) -> None:
    host, port = _host_port(address)
    assert port is not None  # checked by the model
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(f"engine.address: cannot reach the Ray cluster at {address}: {err}") from None


def connect(cfg: EngineConfig) -> Any:
    """Join (or start) the Ray cluster ``cfg`` names and return the ``ray`` module.

    A Ray already initialised in this process (a test's cluster, a Ray job's driver) is used as it
    is. An unreachable address raises ConfigError naming it within ``CONNECT_TIMEOUT_S`` seconds.
    """
    import ray

    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if cfg.address is None:  # always a new Ray: never a cluster some earlier `ray start` left running
        kwargs.update(address="local", num_cpus=cfg.num_cpus)
    else:
        if cfg.address != "auto":
            _reachable(cfg.address)
        kwargs["address"] = cfg.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if cfg.address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ:
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN)"
        raise ConfigError(f"engine.address: cannot join the Ray cluster at {cfg.address or 'local'}: {first}{hint}") \
            from None
    log.info("engine: Ray %s with %s CPUs", cfg.address or "on this machine", ray.cluster_resources().get("CPU"))
    return ray


# ------------------------------------------------------------------------ helpers of the Ray stages


def collect(ds: Any, schema: Any) -> Any:
    """A (small) Ray dataset as one pyarrow table of ``schema``, its columns in schema order."""
    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()


def ray_exceptions() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError

    return (RayError,)


def user_error(err: BaseException) -> LmpipeError | None:
    """The lmpipe error a Ray task raised, under Ray's wrappers (RayTaskError, UserCodeException)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, LmpipeError) and not isinstance(item, ray_exceptions()):
            return item
        todo += [getattr(item, "cause", None), item.__cause__, item.__context__]
    return None


def raise_task_error(err: BaseException, stage: str) -> None:
    """Re-raise a Ray failure of ``stage`` as one line: the lmpipe error a task raised, as the
    local engine gives it, or EngineError for a task that lost its worker or node more than
    ``MAX_RETRIES`` times (or any other Ray failure). Anything that is not Ray's is re-raised."""
    if not isinstance(err, ray_exceptions()):
        raise err
    cause = user_error(err)
    if cause is not None:
        # Ray appends its retry advice to the message: keep the one line the local engine gives
        cause.args = (str(cause).splitlines()[0],)
        raise cause from None
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    raise EngineError(f"{stage} on Ray failed, its outputs left as they were: {type(err).__name__}: {first} "
                      f"(Ray retried the task {MAX_RETRIES} times)") from err


@contextlib.contextmanager
def user_errors(stage: str) -> Iterator[None]:
    """Run ``stage``'s Ray work so that a Ray failure reaches the caller as :func:`raise_task_error`
    gives it: the lmpipe error a task raised as itself, or one EngineError line."""
    try:
        yield
    except ray_exceptions() as err:
        raise_task_error(err, stage)
