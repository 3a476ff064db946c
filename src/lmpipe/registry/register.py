"""The ``register`` stage: log each trained model to the MLflow registry and run the gate.

Reads, per entry of ``register.models``: the model directory (``model.safetensors`` +
``config.json`` [+ ``head.safetensors``], checked against its manifest), ``artifacts/tokenizer/``
(the model's tokenizer fingerprint must match, else FingerprintMismatch), the gate metrics from the
metrics files, the evaluate stage's scores from ``reports/evaluation.json``, and for lineage ``dvc.lock``, ``data/tokens/meta.json`` and the git commit.

Writes:
- one MLflow run per model (nested under the stage's run) holding a pyfunc model (a LoggedModel
  carrying the gate metrics and the evaluate stage's scores of that model) built from
  :mod:`lmpipe.registry.pyfunc` as "models from code" with the weights, config and tokenizer as
  artifacts, a signature and an input example; registered as a new version of
  ``<prefix>-<stage>[-<task>]`` with lineage and metric tags and the ``candidate`` alias, after the
  registered version was loaded back through MLflow and answered its input example;
- with ``auto_promote``, the gate's decision (:func:`lmpipe.registry.promote.promote_if_better`);
- ``metrics/register.json``: versions, metrics and decisions (a DVC metrics file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import pandas as pd

from lmpipe.config import Paths, TrackingConfig
from lmpipe.errors import DataError, FingerprintMismatch
from lmpipe.io import (
    MANIFEST_NAME,
    fingerprint_path,
    sha256_bytes,
    sha256_file,
    stable_json,
    verify_manifest,
    write_json,
)
from lmpipe.model import gpt as gpt_module
from lmpipe.model.io import CONFIG_NAME, WEIGHTS_NAME, load_model
from lmpipe.registry import pyfunc
from lmpipe.registry.config import ModelSpec, RegisterConfig
from lmpipe.registry.promote import CANDIDATE, METRIC_TAG, promote_if_better
from lmpipe.tokenizer.train import TokenizerInfo, read_tokenizer_info
from lmpipe.tracking import PARENT_ENV, setup_mlflow

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(pyfunc.__file__)
HEAD_NAME = "head.safetensors"
# What the served model imports; pinned to this environment's versions (local build tags dropped).
SERVING_PACKAGES = ("mlflow", "torch", "safetensors", "sentencepiece", "pandas", "numpy")
SMOKE_TOKENS = 8


def run(cfg: RegisterConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe register`` (see the module docstring for what it reads and writes).

    Raises DataError for a missing or corrupt model directory or metrics file, FingerprintMismatch
    when a model was trained with another tokenizer.
    """
    import mlflow
    from mlflow import MlflowClient

    tokenizer = read_tokenizer_info(paths.tokenizer)
    lineage = lineage_tags(paths)
    # Check every model before registering any, so a bad one leaves the registry untouched.
    prepared = [prepare(spec, cfg, paths, tokenizer) for spec in cfg.models]
    entries = []
    with _register_run(paths):
        client = MlflowClient()
        for model in prepared:
            same = registered_version_of(model, client)
            if same is not None:
                # DVC reran register because another model changed; this one did not, so a new
                # version would only churn the registry (and could move champion to an identical copy).
                entries.append(unchanged_entry(model, same, client))
                log.info("%s: unchanged since v%d (same model fingerprint), not registered again", model.name, same)
                continue
            entry = register_model(model, cfg, tokenizer, lineage, client)
            if cfg.auto_promote:
                decision = promote_if_better(entry["name"], entry["version"], cfg=cfg, client=client)
                entry["gate"] = decision.to_dict()
                entry["champion"] = entry["version"] if decision.moved else decision.champion_before
            entries.append(entry)
        report = {"models": entries, "lineage": lineage}
        mlflow.log_dict(report, "register.json")
    write_json(paths.metrics / "register.json", report)
    summary: dict[str, Any] = {"registered": sum(1 for e in entries if not e.get("unchanged")),
                               "promoted": sum(1 for e in entries if e.get("gate", {}).get("moved"))}
    for entry in entries:
        summary[f"{entry['name']}/version"] = entry["version"]
    summary["artifacts"] = [str(paths.metrics / "register.json")]
    return summary


@contextlib.contextmanager
def _register_run(paths: Paths) -> Iterator[None]:
    """The stage's MLflow run when the CLI opened one; else one opened here on the default store
    (the registry needs a tracking store even when ``tracking.enabled`` is false)."""
    import mlflow

    if mlflow.active_run() is not None:
        yield
        return
    setup_mlflow(TrackingConfig.model_validate({}), paths.root)
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name="register", nested=parent is not None, parent_run_id=parent,
                          tags={"lmpipe.stage": "register"}):
        yield


# ---------------------------------------------------------------------------------- one model


@dataclass
class Prepared:
    """A model checked and ready to log: where it is, what it is, and its gate metrics."""

    spec: ModelSpec
    name: str
    directory: Path
    config: dict[str, Any]
    kind: str
    metrics: dict[str, float | None]
    problems: list[str]
    fingerprint: str  # of the model directory: what a registered version was logged from
    eval_metrics: dict[str, float]  # the evaluate stage's numbers of this model directory


def prepare(spec: ModelSpec, cfg: RegisterConfig, paths: Paths, tokenizer: TokenizerInfo) -> Prepared:
    """Check a model directory and read its metrics (raises as :func:`check_model_dir` and :func:`read_metrics`)."""
    name = spec.registered_name(cfg.name_prefix)
    directory = paths.root / spec.directory()
    config, kind = check_model_dir(directory, tokenizer)
    metrics, problems = read_metrics(spec, paths.root)
    for problem in problems:
        log.warning("%s: %s (the gate will not pass)", name, problem)
    return Prepared(spec, name, directory, config, kind, metrics, problems, fingerprint_path(directory),
                    evaluation_metrics(spec.directory(), paths.root))


def registered_version_of(model: Prepared, client: Any) -> int | None:
    """The newest version of ``model.name`` logged from exactly this model directory (same
    fingerprint), or None when the registry has none (or no such registered model yet)."""
    versions = client.search_model_versions(f"name='{model.name}'")  # [] before the first version
    same = [int(v.version) for v in versions
            if (v.tags or {}).get("lmpipe.model_fingerprint") == model.fingerprint]
    return max(same) if same else None


def unchanged_entry(model: Prepared, version: int, client: Any) -> dict[str, Any]:
    """Report entry for a model already registered as ``version``; aliases as they stand."""
    aliases = client.get_registered_model(model.name).aliases
    champion = aliases.get("champion")
    return {"name": model.name, "version": version, "kind": model.kind, "path": model.spec.directory(),
            "model_uri": f"models:/{model.name}/{version}", "metrics": model.metrics,
            "metric_problems": model.problems, "unchanged": True,
            "champion": int(champion) if champion is not None else None}


def register_model(model: Prepared, cfg: RegisterConfig, tokenizer: TokenizerInfo, lineage: dict[str, str],
                   client: Any) -> dict[str, Any]:
    """Log, register, tag and smoke-test one model; set its ``candidate`` alias. Returns its report entry."""
    import mlflow

    spec, name, model_dir, config, kind, metrics = (model.spec, model.name, model.directory, model.config,
                                                    model.kind, model.metrics)
    artifacts = {pyfunc.WEIGHTS: str(model_dir / WEIGHTS_NAME), pyfunc.CONFIG: str(model_dir / CONFIG_NAME),
                 pyfunc.TOKENIZER: str(tokenizer.model_file)}
    if kind == "classify":
        artifacts[pyfunc.HEAD] = str(model_dir / config["classifier"].get("head_file", HEAD_NAME))
    example = input_example(kind, cfg)
    tags = {**lineage, "lmpipe.stage": spec.stage, "lmpipe.task": spec.task or "", "lmpipe.kind": kind,
            "lmpipe.model_path": spec.directory(), "lmpipe.model_fingerprint": model.fingerprint,
            "lmpipe.tokenizer_fingerprint": tokenizer.fingerprint,
            **{f"{METRIC_TAG}{m}": repr(v) for m, v in metrics.items() if v is not None}}
    with tempfile.TemporaryDirectory(prefix="lmpipe-register-") as tmp, \
            mlflow.start_run(run_name=f"register {name}", nested=True, tags={"lmpipe.stage": "register"}) as run:
        mlflow.log_params({"model_path": spec.directory(), "kind": kind, "registered_name": name,
                           **{f"metric_source.{m}": ref for m, ref in spec.metrics.items()}})
        mlflow.set_tags(tags)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_FILE), artifacts=artifacts, code_paths=[model_code(Path(tmp))],
            signature=pyfunc.signature_for(kind, cfg.max_new_tokens),
            input_example=example if example[1] else example[0], pip_requirements=serving_requirements(),
            registered_model_name=name, metadata={"lmpipe_kind": kind, "tokenizer_fingerprint": tokenizer.fingerprint},
        )
        # On the LoggedModel (the experiment's Models tab lists it by this name) as well as on the run.
        mlflow.log_metrics({**{m: v for m, v in metrics.items() if v is not None}, **model.eval_metrics},
                           model_id=info.model_id)
    version = int(info.registered_model_version)
    for key, value in {**tags, "lmpipe.run_id": run.info.run_id}.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if version == 1:
        client.update_registered_model(name, description=f"lmpipe {kind} model from {spec.directory()}; "
                                       "aliases: candidate (newest), champion (serve), previous (rollback).")
    smoke = smoke_test(name, version, kind, example, config)
    client.set_model_version_tag(name, str(version), "lmpipe.smoke_output", smoke[:250])
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    log.info("registered %s v%d (%s) from %s: %s", name, version, kind, spec.directory(),
             ", ".join(f"{m}={v}" for m, v in metrics.items()))
    return {"name": name, "version": version, "kind": kind, "path": spec.directory(), "run_id": run.info.run_id,
            "model_id": info.model_id,
            "model_uri": f"models:/{name}/{version}", "metrics": metrics, "metric_problems": model.problems,
            "smoke_output": smoke}


def check_model_dir(model_dir: Path, tokenizer: TokenizerInfo) -> tuple[dict[str, Any], str]:
    """(config.json, pyfunc kind) of a model directory, after checking it is whole and servable.

    Raises DataError (missing, corrupt, a masked-LM model that cannot generate) or
    FingerprintMismatch (trained with another tokenizer).
    """
    if not model_dir.is_dir():
        raise DataError("no model directory: run the stage that writes it (e.g. `dvc repro pretrain`) "
                        "or remove it from register.models", path=str(model_dir))
    if (model_dir / MANIFEST_NAME).is_file():
        verify_manifest(model_dir)
    model, config = load_model(model_dir)  # weights and config.json agree
    kind = pyfunc.model_kind(config)
    if kind != "classify" and model.config.bidirectional:
        raise DataError("a bidirectional (masked-LM) model cannot generate text, so it cannot be served: "
                        "register its fine-tuned classifier instead", path=str(model_dir))
    if kind == "classify":
        head = model_dir / config["classifier"].get("head_file", HEAD_NAME)
        if not head.is_file():
            raise DataError(f"classifier without its head: no {head.name}", path=str(model_dir))
    recorded = config.get("tokenizer_fingerprint")
    if recorded != tokenizer.fingerprint:
        raise FingerprintMismatch(
            f"{model_dir / CONFIG_NAME}: the model was trained with tokenizer {str(recorded)[:12]}, but "
            f"{tokenizer.directory} is {tokenizer.fingerprint[:12]}: re-run the training stages with this tokenizer"
        )
    return config, kind


def read_metrics(spec: ModelSpec, root: Path) -> tuple[dict[str, float | None], list[str]]:
    """The gate metrics of a model from its ``FILE:KEY`` references: (metric -> value or None, problems).

    A missing file or key gives None and a problem line (the gate then refuses the model); a file
    that is not JSON or a value that is not a number raises DataError.
    """
    values: dict[str, float | None] = {}
    problems = []
    for metric, ref in spec.metrics.items():
        file, _, key = ref.rpartition(":")
        path = root / file
        values[metric] = None
        if not path.is_file():
            problems.append(f"{metric}: {file} not found")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err}", path=str(path)) from None
        value = lookup(data, key)
        if value is None:
            problems.append(f"{metric}: no key {key!r} in {file}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"{key}: expected a number for gate metric {metric}, got {value!r}", path=str(path))
        values[metric] = float(value)
    return values, problems


EVALUATION_FILE = "reports/evaluation.json"
LM_SCORES = ("loss", "perplexity", "bpb")
CLASSIFICATION_SCORES = ("accuracy", "macro_f1", "macro_precision", "macro_recall")
INSTRUCTION_SCORES = ("bleu", "rouge_l", "exact_match")


def evaluation_metrics(directory: str, root: Path) -> dict[str, float]:
    """The evaluate stage's scores of the model at ``directory`` (relative to ``root``), read from
    ``reports/evaluation.json``: ``eval/<split or file>/<loss|perplexity|bpb>``, ``eval/speed/<key>``,
    ``eval/<task>/<score>`` for classifiers and instruction models. {} when the file is missing or
    does not name the model (evaluate did not score it); raises DataError when it is not JSON."""
    path = root / EVALUATION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err}", path=str(path)) from None
    target = Path(directory)
    same = lambda entry: isinstance(entry, dict) and Path(str(entry.get("path", ""))) == target  # noqa: E731
    found: dict[str, Any] = {}
    for model in (data.get("models") or {}).values():
        if same(model):
            for split, score in (model.get("lm") or {}).items():
                found.update({f"eval/{split}/{k}": score.get(k) for k in LM_SCORES})
            found.update({f"eval/speed/{k}": v for k, v in (model.get("speed") or {}).items()})
    for task, models in (data.get("classification") or {}).items():
        for result in models.values():
            if same(result):
                found.update({f"eval/{task}/{k}": result.get(k) for k in CLASSIFICATION_SCORES})
    for task, result in (data.get("instruction") or {}).items():
        if same(result):
            found.update({f"eval/{task}/{k}": result.get(k) for k in INSTRUCTION_SCORES})
    return {k: float(v) for k, v in found.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def lookup(data: Any, key: str) -> Any:
    """``data[key]``, or a walk along the dots of ``key`` through nested objects; None if absent."""
    if isinstance(data, dict) and key in data:
        return data[key]
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def input_example(kind: str, cfg: RegisterConfig) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """(input, params) stored with the model. MLflow runs it once while logging, so generative
    examples ask for few tokens."""
    if kind == "classify":
        return pd.DataFrame({"text": [cfg.example_text]}), None
    return pd.DataFrame({"prompt": [cfg.example_prompt]}), {"max_new_tokens": SMOKE_TOKENS}


def model_code(directory: Path) -> str:
    """Copy ``lmpipe/model/gpt.py`` to ``directory/lmpipe_gpt.py`` for the model's code_paths.

    The served model must not need this repository, so the file may import nothing from lmpipe;
    raises RuntimeError if it does (a change to gpt.py broke that contract).
    """
    source = Path(gpt_module.__file__)
    text = source.read_text(encoding="utf-8")
    if re.search(r"^\s*(from|import)\s+lmpipe\b", text, flags=re.M):
        raise RuntimeError(f"{source} imports lmpipe: the served model would need this repository")
    target = directory / f"{pyfunc.GPT_MODULE}.py"
    shutil.copyfile(source, target)
    return str(target)


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the served model (what pyfunc.py and gpt.py import)."""
    out = []
    for package in SERVING_PACKAGES:
        try:
            out.append(f"{package}=={package_version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def smoke_test(name: str, version: int, kind: str, example: tuple[pd.DataFrame, dict[str, Any] | None],
               config: dict[str, Any]) -> str:
    """Load the registered version back through MLflow and predict on its input example.

    Raises DataError when it does not load or answers nonsense, before any alias points at it.
    """
    import mlflow

    uri = f"models:/{name}/{version}"
    try:
        output = mlflow.pyfunc.load_model(uri).predict(example[0], params=example[1])
    except Exception as err:  # noqa: BLE001 - whatever broke, the version must not be promoted
        raise DataError(f"{uri} was registered but does not load and predict: {err}") from err
    if kind == "classify":
        label = str(output["label"].iloc[0])
        if label not in [str(x) for x in config["classifier"]["labels"]]:
            raise DataError(f"{uri} answered label {label!r}, not one of its labels")
        return f"{label} ({float(output['score'].iloc[0]):.3f})"
    return str(output["text"].iloc[0])


# ------------------------------------------------------------------------------------ lineage


def lineage_tags(paths: Paths) -> dict[str, str]:
    """Tags tying a version to the code and data that made it: git commit (and whether the tree
    had uncommitted changes), a fingerprint of the DVC-tracked outputs in dvc.lock, the token
    shards' meta.json hash, and the pipeline's MLflow run id."""
    commit, dirty = git_state(paths.root)
    meta = paths.tokens / "meta.json"
    return {
        "lmpipe.git_commit": commit,
        "lmpipe.git_dirty": str(dirty).lower(),
        "lmpipe.dvc_fingerprint": dvc_fingerprint(paths.root),
        "lmpipe.data_fingerprint": sha256_file(meta) if meta.is_file() else "",
        "lmpipe.pipeline_run_id": os.environ.get(PARENT_ENV, ""),
    }


def git_state(root: Path) -> tuple[str, bool]:
    """(HEAD commit or 'unknown', whether tracked files differ from it)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", False
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def dvc_fingerprint(root: Path) -> str:
    """sha256 over the recorded hashes of every stage's outputs in ``dvc.lock`` (the register
    stage's own entry left out, so it does not fingerprint itself); '' without a dvc.lock."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return ""
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except yaml.YAMLError as err:
        raise DataError(f"not valid YAML: {err}", path=str(lock)) from None
    outs = {
        stage: sorted((str(o.get("path")), str(o.get("md5") or o.get("etag") or "")) for o in entry.get("outs", []))
        for stage, entry in sorted(stages.items())
        if stage.split("@")[0] != "register" and isinstance(entry, dict)
    }
    return sha256_bytes(stable_json(outs).encode())
