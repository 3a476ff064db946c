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
  ``<prefix>-<stage>[-<task>]`` with lineage, metric and floor tags. Only after the registered
  version was loaded back through MLflow and answered its input example does it get the model
  fingerprint tag (what makes a rerun treat the model as registered) and the ``candidate`` alias;
  a version that fails this smoke test is tagged ``lmpipe.smoke=failed`` and a rerun registers
  the model again;
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
from lmpipe.model.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExpectedTokenizer,
    load_model,
    read_model_config,
    refuse_masked_lm,
)
from lmpipe.registry import pyfunc
from lmpipe.registry.config import ModelSpec, RegisterConfig
from lmpipe.registry.promote import CANDIDATE, FLOOR_TAG, METRIC_TAG, promote_if_better
from lmpipe.tokenizer.shards import unigram_bits_per_byte, unigram_entropy
from lmpipe.tokenizer.train import TokenizerInfo, read_tokenizer_info
from lmpipe.tracking import PARENT_ENV, setup_mlflow

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(pyfunc.__file__)
HEAD_NAME = "head.safetensors"
# What the served model imports; pinned to this environment's versions (local build tags dropped).
SERVING_PACKAGES = ("mlflow", "torch", "safetensors", "sentencepiece", "pandas", "numpy")
SMOKE_TOKENS = 8
FINGERPRINT_TAG = "lmpipe.model_fingerprint"
SMOKE_TAG = "lmpipe.smoke"
HEAD_KINDS = ("classify", "tag")  # pyfunc kinds with a head file next to the backbone
# The absolute floor a model kind's first champion must clear, per gate metric: what a model that
# ignores its input reaches on the same data. Language models (generate, chat) must beat the
# unigram entropy of the val token shards (bits per byte for val_bpb, nats per token for
# dev_loss); classifiers must beat always answering the majority class, token classifiers tagging
# each word with its most frequent training tag. A metric with no floor
# here never makes a first champion by itself (`lmpipe promote NAME --version N --force` does).
KIND_FLOORS = {
    "generate": {"val_bpb": "unigram_bpb"},
    "chat": {"val_bpb": "unigram_bpb", "dev_loss": "unigram_nats"},
    "classify": {"accuracy": "majority_class"},
    "tag": {"entity_f1": "majority_class"},  # each word's most frequent training tag (finetune's majority_f1)
}


def run(cfg: RegisterConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe register`` (see the module docstring for what it reads and writes).

    Raises DataError for a missing or corrupt model directory or metrics file, ConfigError for a
    masked LM listed as a text generator, FingerprintMismatch when a model was trained with another
    tokenizer.
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
    floors: dict[str, float]  # metric -> absolute floor of a first champion (KIND_FLOORS)
    eval_metrics: dict[str, float]  # the evaluate stage's numbers of this model directory


def prepare(spec: ModelSpec, cfg: RegisterConfig, paths: Paths, tokenizer: TokenizerInfo) -> Prepared:
    """Check a model directory and read its metrics (raises as :func:`check_model_dir` and :func:`read_metrics`)."""
    name = spec.registered_name(cfg.name_prefix)
    directory = paths.root / spec.directory()
    config, kind = check_model_dir(directory, tokenizer)
    metrics, problems = read_metrics(spec, paths.root)
    floors, floor_problems = absolute_floors(kind, spec, paths)
    for problem in problems:
        log.warning("%s: %s (the gate will not pass)", name, problem)
    for problem in floor_problems:
        log.warning("%s: %s (it cannot become the first champion by the gate)", name, problem)
    return Prepared(spec, name, directory, config, kind, metrics, problems + floor_problems,
                    fingerprint_path(directory), floors, evaluation_metrics(spec.directory(), paths.root))


def absolute_floors(kind: str, spec: ModelSpec, paths: Paths) -> tuple[dict[str, float], list[str]]:
    """(metric -> floor, problems) of a model's gate metrics, by :data:`KIND_FLOORS`.

    Unigram floors come from the val split of ``data/tokens/`` (checked against the tokenizer);
    the majority-class floor from the key ``<prefix>majority_accuracy`` next to the metric's
    ``<prefix>accuracy`` in its metrics file (the fine-tune stage writes ``test_majority_accuracy``
    next to ``test_accuracy``), or ``<prefix>majority_f1`` next to a token classifier's ``<prefix>f1``.
    A floor that cannot be read is a problem line, not an error: the model is still registered, it
    just cannot be a first champion automatically.
    """
    floors: dict[str, float] = {}
    problems: list[str] = []
    for metric, ref in spec.metrics.items():
        source = KIND_FLOORS.get(kind, {}).get(metric)
        if source is None:
            problems.append(f"{metric}: a {kind} model has no absolute floor for this metric")
            continue
        try:
            if source == "unigram_bpb":
                floors[metric] = unigram_bits_per_byte(paths.tokens, "val", paths.tokenizer)
            elif source == "unigram_nats":
                floors[metric] = _unigram_nats(paths)
            else:
                file, _, key = ref.rpartition(":")
                stem = key.removesuffix("f1").removesuffix("accuracy")  # test_f1 -> test_majority_f1
                majority_ref = f"{file}:{stem}majority_{key[len(stem):]}"
                values, missing = read_metrics(spec.model_copy(update={"metrics": {metric: majority_ref}}), paths.root)
                problems.extend(f"floor: {m}" for m in missing)
                majority = values[metric]
                if majority is not None:
                    floors[metric] = majority
        except (DataError, FingerprintMismatch) as err:
            problems.append(f"{metric}: no {source} floor ({err})")
    return floors, problems


def _unigram_nats(paths: Paths) -> float:
    from lmpipe.tokenizer.shards import TokenShardReader

    reader = TokenShardReader(paths.tokens, read_tokenizer_info(paths.tokenizer).fingerprint)
    tokens = reader.tokens("val")
    if tokens.shape[0] == 0:
        raise DataError("the val split has no tokens", path=str(paths.tokens))
    return unigram_entropy(tokens, reader.vocab_size)


def registered_version_of(model: Prepared, client: Any) -> int | None:
    """The newest version of ``model.name`` logged from exactly this model directory (same
    fingerprint), or None when the registry has none (or no such registered model yet)."""
    versions = client.search_model_versions(f"name='{model.name}'")  # [] before the first version
    same = [int(v.version) for v in versions if (v.tags or {}).get(FINGERPRINT_TAG) == model.fingerprint]
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
    """Log, register, tag and smoke-test one model; set its ``candidate`` alias. Returns its report entry.

    The fingerprint tag, which makes a rerun skip this model as registered, is set only after the
    smoke test passed; a failed one leaves the version tagged ``lmpipe.smoke=failed`` and raises
    DataError.
    """
    import mlflow

    spec, name, model_dir, config, kind, metrics = (model.spec, model.name, model.directory, model.config,
                                                    model.kind, model.metrics)
    artifacts = {pyfunc.WEIGHTS: str(model_dir / WEIGHTS_NAME), pyfunc.CONFIG: str(model_dir / CONFIG_NAME),
                 pyfunc.TOKENIZER: str(tokenizer.model_file)}
    if kind in HEAD_KINDS:
        artifacts[pyfunc.HEAD] = str(model_dir / config["classifier"].get("head_file", HEAD_NAME))
    example = input_example(kind, cfg)
    tags = {**lineage, "lmpipe.stage": spec.stage, "lmpipe.task": spec.task or "", "lmpipe.kind": kind,
            "lmpipe.model_path": spec.directory(), "lmpipe.tokenizer_fingerprint": tokenizer.fingerprint,
            **{f"{METRIC_TAG}{m}": repr(v) for m, v in metrics.items() if v is not None},
            **{f"{FLOOR_TAG}{m}": repr(v) for m, v in model.floors.items()}}
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
    try:
        smoke = smoke_test(name, version, kind, example, config)
    except DataError as err:
        client.set_model_version_tag(name, str(version), SMOKE_TAG, "failed")
        client.set_model_version_tag(name, str(version), "lmpipe.smoke_output", str(err)[:250])
        raise
    client.set_model_version_tag(name, str(version), "lmpipe.smoke_output", smoke[:250])
    client.set_model_version_tag(name, str(version), SMOKE_TAG, "passed")
    client.set_model_version_tag(name, str(version), FINGERPRINT_TAG, model.fingerprint)
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    log.info("registered %s v%d (%s) from %s: %s", name, version, kind, spec.directory(),
             ", ".join(f"{m}={v}" for m, v in metrics.items()))
    return {"name": name, "version": version, "kind": kind, "path": spec.directory(), "run_id": run.info.run_id,
            "model_id": info.model_id,
            "model_uri": f"models:/{name}/{version}", "metrics": metrics, "metric_problems": model.problems,
            "smoke_output": smoke}


def check_model_dir(model_dir: Path, tokenizer: TokenizerInfo) -> tuple[dict[str, Any], str]:
    """(config.json, pyfunc kind) of a model directory, after checking it is whole and servable.

    The directory must carry a valid manifest.json that lists its weights, config.json (and a
    classifier's head) with the sha256 they have now: a model without one was not written by a
    training stage, or was changed after it.

    A classifier is served whatever its backbone (a masked-LM encoder too); a masked LM itself
    cannot generate, so it is refused with a ConfigError from its config.json alone.

    Raises DataError (missing, no or a wrong manifest, corrupt), ConfigError (a masked LM to serve
    as a generator) or FingerprintMismatch (trained with another tokenizer).
    """
    if not model_dir.is_dir():
        raise DataError("no model directory: run the stage that writes it (e.g. `dvc repro pretrain`) "
                        "or remove it from register.models", path=str(model_dir))
    early = read_model_config(model_dir)
    if pyfunc.model_kind(early) not in HEAD_KINDS:
        refuse_masked_lm(early, model_dir, "register.models", "a served generate or chat model writes text")
    listed = verify_manifest(model_dir)["files"]  # DataError without a manifest, or a file differs
    # weights and config.json agree, and the model was trained with this tokenizer
    _, config = load_model(model_dir, tokenizer=ExpectedTokenizer(
        tokenizer.fingerprint, str(tokenizer.directory), "re-run the training stages with this tokenizer"))
    required = [WEIGHTS_NAME, CONFIG_NAME]
    if pyfunc.model_kind(config) in HEAD_KINDS:
        required.append(str(config["classifier"].get("head_file", HEAD_NAME)))
    unlisted = [name for name in required if name not in listed]
    if unlisted:
        raise DataError(f"{MANIFEST_NAME} does not list {', '.join(unlisted)}: not a complete stage output "
                        "(re-run the stage that writes it)", path=str(model_dir))
    kind = pyfunc.model_kind(config)
    if kind in HEAD_KINDS:
        head = model_dir / config["classifier"].get("head_file", HEAD_NAME)
        if not head.is_file():
            raise DataError(f"classifier without its head: no {head.name}", path=str(model_dir))
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
TOKEN_CLASSIFICATION_SCORES = ("f1", "precision", "recall")


def evaluation_metrics(directory: str, root: Path) -> dict[str, float]:
    """The evaluate stage's scores of the model at ``directory`` (relative to ``root``), read from
    ``reports/evaluation.json``: ``eval/<split or file>/<loss|perplexity|bpb>``, ``eval/speed/<key>``,
    ``eval/<task>/<score>`` for classifiers, token classifiers and instruction models. {} when the
    file is missing or does not name the model (evaluate did not score it); raises DataError when it
    is not JSON."""
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
    for task, result in (data.get("token_classification") or {}).items():
        for scores in (result.get("models") or {}).values():
            if same(scores):
                found.update({f"eval/{task}/{k}": scores.get(k) for k in TOKEN_CLASSIFICATION_SCORES})
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
    if kind in HEAD_KINDS:
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
    if kind == "tag":
        spans = output["spans"].iloc[0]
        types = {str(x)[2:] for x in config["classifier"]["labels"] if str(x) != "O"}
        if not isinstance(spans, list) or any(s.get("label") not in types for s in spans):
            raise DataError(f"{uri} answered {spans!r}, not a list of spans of its entity types")
        return ", ".join(f"{s['text']} ({s['label']})" for s in spans) or "(no entities)"
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
