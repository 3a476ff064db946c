"""Lineage: what each stage reads, so that ``dvc status`` never calls a stale result up to date.

Two kinds of input are invisible to a hand-written ``dvc.yaml``, and this module makes both DVC deps:

- **Code.** A stage's code deps are every ``lmpipe`` module its process can import: the CLI, the
  stage's module and its config model, followed transitively through every ``import`` in the
  source (function-level ones too, so a lazily imported helper counts), plus the stage's
  non-Python resources. :func:`code_deps` computes them from the source; ``lmpipe lineage``
  checks ``dvc.yaml`` against them and ``lmpipe lineage --write`` rewrites them.
- **Data named in params.** Source files and globs, local and hub datasets, eval files and
  fine-tune data are paths in ``params.yaml``, not in ``dvc.yaml``. The ``inputs`` stage (DVC
  ``always_changed``, so it runs on every ``dvc repro``) fingerprints them into one small JSON file
  per consuming stage, ``data/inputs/<stage>.json`` (``data/inputs/finetune/<task>.json``), and
  each consumer depends on its file. An edited file, a new file matching a glob or a deleted one
  changes the fingerprint and reruns the consumer and everything downstream; an unchanged input
  writes byte-identical JSON, so DVC runs nothing else. Files are hashed by content; a stat cache
  (size, mtime, inode) in ``.lmpipe/`` keeps a no-change run from re-reading large corpora.

A config field names an input by ``json_schema_extra={"lmpipe_input": KIND}``: ``"paths"`` (a
path, glob or list of them, relative to the project root) or ``"hf"`` (a Hugging Face dataset
``path``: a local dataset directory is hashed by content; a hub dataset is recorded by name,
config, split and ``revision``; an unpinned one is resolved to the hub's current commit when the
hub answers, and marked ``pinned: false`` either way).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmpipe.config import Params, Paths
from lmpipe.data.sources import display_path, resolve_paths
from lmpipe.errors import ConfigError, DataError, LmpipeError
from lmpipe.io import sha256_file, stable_json, write_bytes
from lmpipe.stages import STAGE_LIST, STAGES, StageSpec

log = logging.getLogger(__name__)

INPUT_MARK = "lmpipe_input"
INPUTS_DIR = Path("data") / "inputs"
CACHE_FILE = Path(".lmpipe") / "fingerprint-cache.json"
PACKAGE = "lmpipe"
# Builders of `datasets.load_dataset` that read `data_files` (hashed through their own marker).
HF_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}
HUB_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------ code


def source_root() -> Path:
    """The directory holding the ``lmpipe`` package (``src/``)."""
    return Path(__file__).resolve().parents[1]


def module_file(name: str, src: Path) -> Path | None:
    """``lmpipe.a.b`` -> src/lmpipe/a/b.py or src/lmpipe/a/b/__init__.py (None if neither exists)."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, name: str, src: Path) -> set[str]:
    """The lmpipe modules that the source of module ``name`` imports anywhere (top level or not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from lmpipe.data import config`: the name may be a submodule
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if (target == PACKAGE or target.startswith(PACKAGE + ".")) and module_file(target, src) is not None:
                found.add(target)
    return found


def import_closure(roots: list[str], src: Path | None = None) -> set[str]:
    """Every lmpipe module reachable from ``roots`` by imports, with the packages that contain them."""
    src = src or source_root()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, src)
        if path is None:
            raise LmpipeError(f"module {name} not found under {src}")
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
        todo.extend(_imports(path, name, src) - seen)
    return seen


def stage_roots(stage: StageSpec) -> list[str]:
    """The modules a stage's process starts from: the CLI, the stage's module and its config."""
    roots = ["lmpipe.cli", stage.module]
    if stage.config:
        roots.append(stage.config.partition(":")[0])
    else:  # `inputs` reads every section
        from lmpipe.stages import section_classes

        roots.extend(cls.partition(":")[0] for cls in section_classes().values())
    return roots


def code_deps(stage: StageSpec, src: Path | None = None) -> list[str]:
    """The code deps of ``stage`` as dvc.yaml lists them: source files relative to the project root."""
    src = src or source_root()
    files = {module_file(name, src) for name in import_closure(stage_roots(stage), src)}
    project = src.parent
    deps = sorted(str(f.relative_to(project)) for f in files if f is not None)
    return deps + sorted(stage.resources)


def _is_code_dep(dep: str) -> bool:
    return dep.startswith(f"src/{PACKAGE}/")


def _stage_entries(dvc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(registry stage name, stage body) for each stage of dvc.yaml (``foreach`` bodies are ``do``)."""
    for name, body in (dvc.get("stages") or {}).items():
        yield name, (body.get("do", body) if isinstance(body, dict) else {})


def check_dvc_yaml(root: Path, write: bool = False) -> list[str]:
    """Compare every stage's code deps in ``root/dvc.yaml`` with :func:`code_deps`.

    Returns one line per difference (empty: all match). With ``write``, rewrites the code deps in
    place (data deps, comments and layout kept) and returns the differences it fixed.
    Raises ConfigError for a dvc.yaml stage the registry does not know, or a missing dvc.yaml.
    """
    from ruamel.yaml import YAML

    path = root / "dvc.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    data = yaml.load(path.read_text(encoding="utf-8"))
    src = root / "src"
    problems: list[str] = []
    for name, body in _stage_entries(data):
        if name not in STAGES:
            raise ConfigError(f"{path}: stage '{name}' is not in the stage registry (lmpipe/stages.py)")
        deps = body.setdefault("deps", [])
        listed = [d for d in deps if isinstance(d, str)]
        have = {d for d in listed if _is_code_dep(d)}
        want = code_deps(STAGES[name], src)
        problems += [f"{name}: missing code dep {d}" for d in want if d not in have]
        problems += [f"{name}: code dep {d} is not imported by the stage" for d in sorted(have - set(want))]
        if write and set(want) != have:
            keep = [d for d in deps if not (isinstance(d, str) and _is_code_dep(d))]
            deps.clear()
            deps.extend(keep + want)
    if write and problems:
        import io

        buffer = io.StringIO()
        yaml.dump(data, buffer)
        write_bytes(path, buffer.getvalue().encode("utf-8"))
    return problems


def command(args: argparse.Namespace) -> int:
    """``lmpipe lineage [--write]``."""
    root = Path(args.root).resolve()
    problems = check_dvc_yaml(root, write=args.write)
    for line in problems:
        print(("fixed: " if args.write else "") + line)
    if not problems:
        print(f"{root / 'dvc.yaml'}: every stage's code deps match its imports")
    return 0 if args.write or not problems else 2


# ------------------------------------------------------------------------------------ data inputs


@dataclass(frozen=True)
class InputRef:
    """One input named in params: where in the section, what kind, and the model holding it."""

    key: str
    kind: str
    value: Any
    owner: BaseModel


def input_refs(model: BaseModel, prefix: str) -> list[InputRef]:
    """Every field marked as an input in ``model`` and the models nested in it, in field order."""
    refs: list[InputRef] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}.{name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = extra.get(INPUT_MARK)
        if kind is not None:
            if value is not None:
                refs.append(InputRef(key, str(kind), value, model))
            continue
        for sub_key, item in _children(value, key):
            refs.extend(input_refs(item, sub_key))
    return refs


def _children(value: Any, key: str) -> Iterator[tuple[str, BaseModel]]:
    if isinstance(value, BaseModel):
        yield key, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _children(item, f"{key}.{i}")
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _children(item, f"{key}.{name}")


class StatCache:
    """sha256 of files by (path, size, mtime, inode), so an unchanged corpus is not re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key, stamp = str(file.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(key)
        if hit and hit[:3] == stamp:
            return str(hit[3])
        digest = sha256_file(file)
        self.entries[key] = [*stamp, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            write_bytes(self.path, stable_json(self.entries).encode())


def fingerprint_paths(patterns: list[str], root: Path, cache: StatCache) -> dict[str, Any]:
    """{pattern: {file: sha256}} for files and globs; a pattern matching nothing is recorded as such."""
    out: dict[str, Any] = {}
    for pattern in patterns:
        if "://" in pattern:  # a remote data file: its URL is in params, which DVC already tracks
            out[pattern] = {"remote": True}
            continue
        full = Path(pattern) if Path(pattern).is_absolute() else root / pattern
        if full.is_dir():  # a local dataset directory
            files = sorted(p for p in full.rglob("*") if p.is_file())
        else:
            try:  # the same expansion the stages use to read them
                files = resolve_paths([pattern], root)
            except DataError:  # the stage that reads it will say what is wrong
                files = []
        out[pattern] = {display_path(f, root): cache.sha256(f) for f in files} or {"missing": True}
    return out


def resolve_hub_revision(path: str, revision: str | None) -> str | None:
    """The commit sha a hub dataset's ``revision`` (default branch when None) points at now, if the hub answers."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import HfApi

        return str(HfApi().dataset_info(path, revision=revision, timeout=HUB_TIMEOUT_S).sha)
    except Exception as err:  # offline, unknown dataset, rate limit: recorded as unresolved
        log.debug("could not resolve %s@%s on the hub: %s", path, revision, err)
        return None


def fingerprint_hf(ref: InputRef, root: Path, cache: StatCache) -> dict[str, Any]:
    """A local dataset directory by content; a builder by name (its data_files are their own input);
    a hub dataset by name, config, split, revision and the commit it resolves to now."""
    path = str(ref.value)
    local = Path(path) if Path(path).is_absolute() else root / path
    if local.exists():
        return {"local": fingerprint_paths([path], root, cache)[path]}
    if path in HF_BUILDERS:
        return {"builder": path}
    revision = getattr(ref.owner, "revision", None)
    record = {"hub": path, "config": getattr(ref.owner, "config_name", None),
              "split": getattr(ref.owner, "split", None), "revision": revision,
              "pinned": bool(revision and len(revision) == 40), "resolved": resolve_hub_revision(path, revision)}
    if not record["pinned"]:
        log.warning("%s: hub dataset '%s' is not pinned to a commit (revision: %s); it is reproducible only while "
                    "the hub serves the same data: set revision to a commit sha", ref.key, path, revision)
    return record


def fingerprint_model(model: BaseModel, prefix: str, root: Path, cache: StatCache) -> dict[str, Any]:
    """{params key: fingerprint} of every input named in ``model``."""
    out: dict[str, Any] = {}
    for ref in input_refs(model, prefix):
        if ref.kind == "paths":
            patterns = [ref.value] if isinstance(ref.value, str) else list(ref.value)
            out[ref.key] = fingerprint_paths(patterns, root, cache)
        elif ref.kind == "hf":
            out[ref.key] = fingerprint_hf(ref, root, cache)
        else:
            raise ConfigError(f"{ref.key}: unknown input kind {ref.kind!r}")
    return out


def input_files(params: Params, root: Path) -> dict[str, dict[str, Any]]:
    """Relative output path -> fingerprints, for every stage the registry marks as reading inputs."""
    cache = StatCache(root / CACHE_FILE)
    files: dict[str, dict[str, Any]] = {}
    for stage in STAGE_LIST:
        if not stage.inputs or stage.section is None:
            continue
        section = params.section(stage.section)
        if stage.tasks:
            for task, cfg in getattr(section, stage.tasks).items():
                prefix = f"{stage.section}.{stage.tasks}.{task}"
                files[f"{stage.name}/{task}.json"] = fingerprint_model(cfg, prefix, root, cache)
        else:
            files[f"{stage.name}.json"] = fingerprint_model(section, stage.section, root, cache)
    cache.save()
    return files


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """The ``inputs`` stage: write ``data/inputs/*.json``, rewriting only files whose content changed.

    A file's bytes depend only on what the inputs contain (no timestamps), so DVC sees an unchanged
    hash and skips the consumers. Files of stages or tasks no longer configured are removed.
    """
    out_dir = paths.root / INPUTS_DIR
    wanted = input_files(params, paths.root)
    changed = 0
    for rel, content in wanted.items():
        target = out_dir / rel
        data = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()
        if not target.is_file() or target.read_bytes() != data:
            write_bytes(target, data)
            changed += 1
    for stale in sorted(out_dir.rglob("*.json")) if out_dir.is_dir() else []:
        if stale.relative_to(out_dir).as_posix() not in wanted:
            stale.unlink()
    inputs = sum(len(v) for v in wanted.values())
    log.info("inputs: %d inputs named in params, %d of %d fingerprint files changed", inputs, changed, len(wanted))
    return {"inputs": inputs, "changed_files": changed}
