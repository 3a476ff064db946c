"""lm-evaluation-harness (EleutherAI's ``lm-eval``) on the Hugging Face export of a model, offline.

Tasks are written here from the project's own data, so nothing is fetched:

- ``lmpipe_<task>``: each classification task of ``evaluate.classification`` as multiple choice
  (its test rows; the prompt and label words of the task, as the prompted baselines use them):
  lm-eval's ``acc`` (highest log-likelihood choice) and ``acc_norm`` (per byte);
- ``lmpipe_perplexity_<split>``: the documents of a split as a rolling-loglikelihood task:
  ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``.

Each task is a task YAML plus a jsonl data file in a working directory (``dataset_path: json``
with local ``data_files``); the model is exported with :func:`lmpipe.registry.export_hf.export_hf`
(verified against the lmpipe model) into the same directory. ``HF_DATASETS_OFFLINE`` and
``HF_HUB_OFFLINE`` are set before lm-eval is imported, so neither datasets nor the hub is asked
for anything remote.

``lmpipe lm-eval`` writes ``metrics/lm_eval.json`` and ``reports/lm_eval.json`` and logs them to an
MLflow run; with ``evaluate.lm_eval.enabled`` the evaluate stage runs the same and puts the
results into its report and metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lmpipe.config import Paths
from lmpipe.errors import DataError
from lmpipe.evaluate.config import EvaluateConfig
from lmpipe.model.io import read_model_config, refuse_masked_lm

log = logging.getLogger(__name__)

# Metric -> lm-eval's aggregation of it, per output type (as its wikitext task defines them).
METRICS = {"multiple_choice": {"acc": "mean", "acc_norm": "mean"},
           "loglikelihood_rolling": {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                                     "bits_per_byte": "bits_per_byte"}}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_tasks(cfg: EvaluateConfig, paths: Paths, directory: Path) -> list[str]:
    """Task YAMLs and their jsonl data in ``directory``; returns the task names.

    Raises DataError when there is no task, or for bad rows (read as evaluate reads them)."""
    from lmpipe.train.finetune import classify

    settings = cfg.lm_eval
    names = []
    for name in settings.classification if settings.classification is not None else list(cfg.classification):
        spec = cfg.classification[name]
        rows = classify.read_labelled(spec.data, paths)[:settings.limit]
        labels = classify.resolve_labels(classify.read_labelled(spec.train_data, paths), None)
        gold = classify.label_ids(rows, labels)
        words = [spec.label_words.get(label, label) for label in labels]
        data = directory / f"{name}.jsonl"
        _jsonl(data, [{"query": spec.prompt.replace("{text}", r.text), "choices": words, "gold": int(g)}
                      for r, g in zip(rows, gold, strict=True)])
        names.append(_task_yaml(directory, f"lmpipe_{name}", data, {
            "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}", "target_delimiter": " "}))
    if settings.perplexity_split:
        texts = split_texts(paths, settings.perplexity_split)[:settings.limit]
        data = directory / f"perplexity_{settings.perplexity_split}.jsonl"
        _jsonl(data, [{"text": text} for text in texts])
        names.append(_task_yaml(directory, f"lmpipe_perplexity_{settings.perplexity_split}", data, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}"}))
    if not names:
        raise DataError("evaluate.lm_eval: no task (list classification tasks or set perplexity_split)")
    return names


def _task_yaml(directory: Path, task: str, data: Path, spec: dict[str, Any]) -> str:
    metrics = [{"metric": m, "aggregation": aggregation, "higher_is_better": m.startswith("acc")}
               for m, aggregation in METRICS[spec["output_type"]].items()]
    kwargs = {"data_files": {"test": str(data)}, "cache_dir": str(directory / "datasets-cache")}
    body = {"task": task, "dataset_path": "json", "dataset_kwargs": kwargs,
            "test_split": "test", **spec, "metric_list": metrics, "metadata": {"version": 1.0}}
    (directory / f"{task}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return task


def split_texts(paths: Paths, split: str) -> list[str]:
    """The non-empty documents of data/split/<split>, in order."""
    from lmpipe.data.shards import iter_shards

    directory = paths.split / split
    if not directory.is_dir():
        raise DataError(f"no split {split!r} (run `lmpipe split`)", path=str(directory))
    return [t for _, table in iter_shards(directory) for t in table.column("text").to_pylist() if t]


def offline() -> None:
    """Make datasets and huggingface_hub work from local files only. They read the environment when
    imported, so where this process imported them already their settings are switched too."""
    import sys

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))):
        if module in sys.modules:
            for name in names:
                if hasattr(sys.modules[module], name):
                    setattr(sys.modules[module], name, True)


def check_model(cfg: EvaluateConfig, paths: Paths) -> Path:
    """The directory of ``evaluate.lm_eval.model`` after checking, from its config.json alone, that
    it can be exported as a causal LM. Raises DataError (no model there) or ConfigError (a masked LM)."""
    model_dir = paths.root / cfg.lm_eval.model
    if not (model_dir / "config.json").is_file():
        raise DataError("evaluate.lm_eval.model: no model here (run the stage that writes it)", path=str(model_dir))
    refuse_masked_lm(read_model_config(model_dir), model_dir, "evaluate.lm_eval.model",
                     "lm-evaluation-harness scores log-likelihoods on its causal-LM export")
    return model_dir


def evaluate_harness(cfg: EvaluateConfig, paths: Paths, device: str = "cpu") -> dict[str, Any]:
    """Export ``evaluate.lm_eval.model``, write the tasks, run lm-eval; returns
    {model, architecture, tasks: {task: {metric: value, examples}}, lm_eval_version}."""
    offline()
    from lmpipe.registry.export_hf import export_hf

    settings = cfg.lm_eval
    model_dir = check_model(cfg, paths)
    paths.root.joinpath(".lmpipe-tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lm-eval-", dir=paths.root / ".lmpipe-tmp") as tmp:
        work = Path(tmp)
        export = export_hf(model_dir, work / "hf", paths.tokenizer)
        tasks = write_tasks(cfg, paths, work)
        raw = _simple_evaluate(work, tasks, settings.batch_size, device)
    out: dict[str, Any] = {"model": settings.model, "architecture": export["architecture"],
                           "lm_eval_version": raw["version"], "tasks": {}}
    for task in tasks:
        scores = raw["results"][task]
        entry = {m: float(scores[f"{m},none"]) for m in ("acc", "acc_norm", "word_perplexity", "byte_perplexity",
                                                          "bits_per_byte") if f"{m},none" in scores}
        entry["examples"] = int(raw["n_samples"].get(task, {}).get("effective", 0))
        out["tasks"][task] = entry
        log.info("lm-eval %s: %s", task, ", ".join(f"{k} {v:.4g}" for k, v in entry.items()))
    return out


def _simple_evaluate(work: Path, tasks: list[str], batch_size: int, device: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(work), include_defaults=False)
    result = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(work / "hf"), "dtype": "float32"}, tasks=tasks,
        batch_size=batch_size, device=device, task_manager=manager, log_samples=False, bootstrap_iters=0,
        random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    if result is None:
        raise DataError("lm-eval returned no results")
    from importlib.metadata import version

    return {"results": result["results"], "n_samples": result.get("n-samples", {}), "version": version("lm_eval")}


def command(args: argparse.Namespace) -> int:
    """``lmpipe lm-eval``: run lm-evaluation-harness with the ``evaluate.lm_eval`` settings."""
    from lmpipe.config import load_params
    from lmpipe.evaluate.run import pick_device
    from lmpipe.io import write_json
    from lmpipe.tracking import stage_run

    root = Path(args.root).resolve()
    params = load_params(root / args.params, args.overrides, sections=["tracking", "evaluate"])
    cfg = params.section("evaluate")
    assert isinstance(cfg, EvaluateConfig)
    paths = Paths(root)
    with stage_run("lm-eval", params.tracking, root) as tracker:
        tracker.log_params(cfg.lm_eval.model_dump(mode="json"))
        result = evaluate_harness(cfg, paths, str(pick_device(cfg.device)))
        metrics_path, details_path = paths.metrics / "lm_eval.json", paths.reports / "lm_eval.json"
        write_json(metrics_path, {task: dict(scores) for task, scores in result["tasks"].items()})
        write_json(details_path, result)
        tracker.log_metrics(flat(result))
        for path in (metrics_path, details_path):
            tracker.log_artifact(path)
    log.info("lm-eval done: %s", json.dumps(flat(result)))
    return 0


def flat(result: dict[str, Any]) -> dict[str, float]:
    """``lm_eval.<task>.<metric>`` -> value, for MLflow and summaries."""
    return {f"lm_eval.{task}.{k}": v for task, scores in result["tasks"].items() for k, v in scores.items()}
