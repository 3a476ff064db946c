"""Atomic writes, manifests and fingerprints shared by every stage.

Nothing in lmpipe writes a final output path directly. Files go to a temporary sibling and are
renamed into place (``os.replace`` is atomic on POSIX within one filesystem); directories are built
in a staging directory and swapped in as a whole. An interrupted stage therefore leaves either the
previous complete output or nothing, never a half-written output that looks complete. Everything
is fsynced (files, then their directories) before the rename and the parent after it, so a power
loss cannot leave a renamed output whose data never reached the disk.

Staging directories live in ``<project>/.lmpipe-tmp/`` (the nearest ancestor holding ``dvc.yaml``
or ``params.yaml``), never next to the output: ``models/finetune/sft`` is built outside
``models/finetune``, which is a DVC dependency of evaluate, so a killed stage cannot change what
DVC hashes there. Each staging entry is named after its host and process; the CLI sweeps the
entries of processes that are gone when a stage starts (:func:`sweep_staging`).

Every stage output directory carries ``manifest.json``: the producing stage, a hash of its config,
fingerprints of its inputs, counts, and the sha256 of each file, so lineage can be checked without
DVC and a corrupt or partial copy is detectable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmpipe import __version__

MANIFEST_NAME = "manifest.json"
STAGING_NAME = ".lmpipe-tmp"
PROJECT_MARKERS = ("dvc.yaml", "params.yaml")
_CHUNK = 1 << 20
# mkstemp/mkdtemp create owner-only paths; outputs should get the usual umask-based modes.
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variation: the basis of config hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: Any) -> str:
    """sha256 of a config section (a pydantic model or plain data), stable across runs."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return sha256_bytes(stable_json(config).encode())


def fingerprint_path(path: str | os.PathLike[str]) -> str:
    """Fingerprint of a file or directory.

    A directory with a manifest is fingerprinted by its manifest's file hashes (cheap and exactly
    what was produced); other directories by the sorted (relative path, sha256) of their files.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        return sha256_bytes(stable_json(files).encode())
    entries = sorted(
        (str(p.relative_to(path)), sha256_file(p)) for p in path.rglob("*") if p.is_file()
    )
    return sha256_bytes(stable_json(entries).encode())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", durable: bool = True,
                 **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched. ``durable=False``
    skips the fsyncs, for scratch files that a crash may lose (they are rebuilt, never read back
    after a restart): the rename still means a reader sees the whole file or none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under ``root``, then every directory (deepest first), then ``root``."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(directory, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def project_root(path: str | os.PathLike[str]) -> Path | None:
    """The nearest ancestor of ``path`` holding dvc.yaml or params.yaml (None outside a project)."""
    for parent in Path(path).resolve().parents:
        if any((parent / marker).is_file() for marker in PROJECT_MARKERS):
            return parent
    return None


def staging_dir(path: str | os.PathLike[str]) -> Path:
    """Where a temporary copy of output ``path`` is built: the project's ``.lmpipe-tmp/`` when it
    is on the same filesystem as ``path`` (so the final rename is atomic), else ``path``'s parent."""
    path = Path(path)
    root = project_root(path)
    if root is not None:
        staging = root / STAGING_NAME
        staging.mkdir(exist_ok=True)
        if staging.stat().st_dev == path.parent.stat().st_dev:
            return staging
    return path.parent


def _owner_tag() -> str:
    """``<pid>@<host>``: neither part can hold '+', which ends the tag in a staging entry's name."""
    return f"{os.getpid()}@{socket.gethostname()}"


def sweep_staging(root: str | os.PathLike[str]) -> list[Path]:
    """Remove staging entries in ``root/.lmpipe-tmp`` left by processes of this host that are
    gone (a killed stage); entries of running processes and other hosts stay. Returns what was removed."""
    staging = Path(root) / STAGING_NAME
    if not staging.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for entry in staging.iterdir():
        pid, _, entry_host = entry.name.split("+", 1)[0].partition("@")
        if entry_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a staging directory (:func:`staging_dir`) and swap it in as a whole on success.

    Yields the temporary directory. On success its files and directories are fsynced, the old
    ``path`` (if any) is moved aside and the new one renamed into place, and the parent fsynced;
    on an exception the temporary directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(path)
    prefix = f"{_owner_tag()}+{path.name}." if staging != path.parent else f".{path.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=staging))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{prefix}old-", dir=staging))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if staging != path.parent:
        fsync_dir(staging)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    directory: str | os.PathLike[str],
    *,
    stage: str,
    config: Any,
    inputs: Mapping[str, str | os.PathLike[str]] | None = None,
    counts: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into ``directory`` describing every file already in it.

    ``inputs`` maps a name to a path; each is fingerprinted with :func:`fingerprint_path`.
    No timestamps are written, so the same inputs and config give a byte-identical manifest.
    """
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }
    manifest: dict[str, Any] = {
        "stage": stage,
        "lmpipe_version": __version__,
        "config_hash": config_hash(config),
        "inputs": {name: fingerprint_path(p) for name, p in sorted((inputs or {}).items())},
        "counts": dict(counts or {}),
        "files": files,
    }
    if extra:
        manifest.update(extra)
    write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a stage output's manifest; a missing one means the output is incomplete."""
    from lmpipe.errors import DataError

    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            "no manifest.json: this is not a complete stage output (run the stage that produces it)",
            path=str(directory),
        )
    return json.loads(path.read_text())


def verify_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file listed in the manifest exists with the recorded sha256."""
    from lmpipe.errors import DataError

    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, digest in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise DataError(f"listed in manifest but missing: {name}", path=str(directory))
        if sha256_file(file) != digest:
            raise DataError(f"sha256 differs from manifest: {name}", path=str(directory))
    return manifest
