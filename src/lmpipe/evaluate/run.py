"""Stage ``evaluate``: score every configured model, compare teacher and students, write the report.

Reads ``artifacts/tokenizer/`` (its fingerprint is the one every model and token shard must
carry, else FingerprintMismatch), ``data/tokens/`` for the configured splits, the model
directories of ``evaluate.models`` and of the task sections, eval files, and for the report the
earlier stages' reports, metrics and loss curves. Writes (atomically):

- ``metrics/evaluate.json`` (DVC metrics, numbers only): per model LM loss / perplexity / bits per
  byte per split and eval file, parameters, size on disk, tokens/s and ms/token per batch size;
  for a masked LM (``pretrain.objective: mlm``) masked-token loss and accuracy and pseudo-perplexity
  instead (:mod:`lmpipe.evaluate.masked`), its causal measurements skipped with the reason;
  the comparison (quality retained %, parameters %, speed-up x) per student; task scores;
- ``plots/evaluate_bpb.csv`` (model, then bits per byte per split / eval file),
  ``plots/evaluate_speed.csv`` (model, tokens/s per batch size) and ``plots/evaluate_comparison.csv``
  (model, parameters_pct, quality_retained_pct, speedup), one row per model, for ``dvc plots`` bars;
- ``reports/evaluation.json`` (everything, samples and settings included) and ``reports/report.html``.
All of them are logged to the stage's MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.errors import DataError
from lmpipe.evaluate import baselines, harness, lm, masked, speed, tasks
from lmpipe.evaluate.config import EvaluateConfig
from lmpipe.evaluate.report import build_report
from lmpipe.io import atomic_write, write_json
from lmpipe.model.gpt import GPT
from lmpipe.model.io import is_masked_lm

log = logging.getLogger(__name__)

MASKED_SUMMARY = ("masked_loss", "masked_accuracy", "pseudo_perplexity")  # a masked LM's numbers in MLflow


def run(cfg: EvaluateConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe evaluate``; see the module docstring for inputs and outputs.

    Raises FingerprintMismatch for a model or token shards of another tokenizer, DataError for
    missing models (unless ``missing: skip``), shards, eval files or malformed rows.
    """
    from lmpipe.tokenizer.train import load_tokenizer

    sp, info = load_tokenizer(paths.tokenizer)
    device = pick_device(cfg.device)
    model_dirs = resolve_models(cfg, paths)
    if cfg.lm_eval.enabled:
        harness.check_model(cfg, paths)
    maskings: dict[str, dict[str, Any]] = {}  # masked LMs: the masking each was pretrained with
    for name, directory in model_dirs.items():  # refuse a mismatched model before any slow work
        config = lm.check_model_tokenizer(directory, info.fingerprint)
        if is_masked_lm(config):
            maskings[name] = masked.masking_of(config, directory)

    models: dict[str, GPT] = {}
    results: dict[str, Any] = {"models": {}}
    for name, directory in model_dirs.items():
        model, config = lm.load_checked(directory, info.fingerprint, device)
        models[name] = model
        results["models"][name] = {
            "path": str(directory.relative_to(paths.root)) if directory.is_relative_to(paths.root) else str(directory),
            "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "size_bytes": speed.size_on_disk(directory), "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
            "distill": config.get("distill"), "objective": "mlm" if name in maskings else "clm", "lm": {}}
        if name in maskings:  # scored on masked tokens instead; the causal measurements say why they are absent
            results["models"][name].update({"masked": {}, "skipped": dict(masked.SKIPPED)})
    causal = {name: model for name, model in models.items() if name not in maskings}

    for data_name, (tokens, n_bytes, groups) in streams(cfg, paths, sp, info).items():
        for name, model in models.items():
            if name in maskings:
                scores = masked.masked_scores(model, tokens, maskings[name], cfg.masked_lm, batch_size=cfg.batch_size,
                                              device=device, precision=cfg.precision)
                results["models"][name]["masked"][data_name] = scores
                log.info("%s on %s: masked loss %.4f, masked accuracy %.4f, pseudo-perplexity %s", name, data_name,
                         scores["masked_loss"], scores["masked_accuracy"],
                         f"{scores['pseudo_perplexity']:.3f}" if "pseudo_perplexity" in scores else "n/a")
                continue
            score = lm.score_tokens(model, tokens, n_bytes, stride=cfg.stride, batch_size=cfg.batch_size, device=device,
                                    precision=cfg.precision, groups=groups)
            results["models"][name]["lm"][data_name] = score
            log.info("%s on %s: loss %.4f, bits/byte %s", name, data_name, score["loss"],
                     f"{score['bpb']:.4f}" if "bpb" in score else "n/a")

    if cfg.speed.enabled and causal:
        measured = speed.measure(causal, cfg.speed, device, cfg.precision)
        for name, values in measured.items():
            results["models"][name]["speed"] = values
        results["speed_settings"] = speed.speed_settings_used(cfg.speed, causal, device)
    if cfg.sample_tokens and cfg.prompts:
        for name, model in causal.items():
            results["models"][name]["samples"] = tasks.sample_generations(
                model, sp, info.eos_id, cfg.prompts, cfg.sample_tokens, cfg.sample_temperature, cfg.seed, device)
    del models, causal

    classification = {name: spec.model_copy(update={"models": {
        m: d for m, d in spec.models.items() if present(cfg, paths, f"classification.{name}.models.{m}", d)}})
        for name, spec in cfg.classification.items()}
    results["classification"] = {name: tasks.classification_scores(name, spec, paths, sp, info, device)
                                 for name, spec in classification.items() if spec.models}
    tagging = {name: spec.model_copy(update={"models": {
        m: d for m, d in spec.models.items() if present(cfg, paths, f"token_classification.{name}.models.{m}", d)}})
        for name, spec in cfg.token_classification.items()}
    results["token_classification"] = {name: tasks.token_classification_scores(name, spec, paths, sp, info, device)
                                       for name, spec in tagging.items() if spec.models}
    results["instruction"] = {name: tasks.instruction_scores(name, spec, paths, sp, info, device)
                              for name, spec in cfg.instruction.items()
                              if present(cfg, paths, f"instruction.{name}.model", spec.model)}
    for name, by_model in results["classification"].items():  # the register stage finds a model's scores by path
        for model_name, result in by_model.items():
            result["path"] = classification[name].models[model_name]
    for name, result in results["instruction"].items():
        result["path"] = cfg.instruction[name].model
    if cfg.baselines.enabled and (results["classification"] or results["instruction"]) \
            and present(cfg, paths, "baselines.model", cfg.baselines.model):
        results["baselines"] = baselines.baseline_tables(cfg, paths, sp, info, device, results)
    if cfg.lm_eval.enabled:
        results["lm_eval"] = harness.evaluate_harness(cfg, paths, str(device))
    results["comparison"] = comparison(cfg, results)
    return write_outputs(cfg, paths, results)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("evaluate.device is cuda but no CUDA device is visible (use auto or cpu)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def present(cfg: EvaluateConfig, paths: Paths, key: str, relative: str) -> bool:
    """Whether the model directory configured at ``evaluate.<key>`` exists. A missing one is a
    DataError, or with ``missing: skip`` a warning and False."""
    directory = paths.root / relative
    if (directory / "config.json").is_file():
        return True
    if cfg.missing == "skip":
        log.warning("evaluate.%s: %s has no model; skipped", key, directory)
        return False
    raise DataError(f"evaluate.{key}: no model here (run the stage that writes it, or set evaluate.missing: skip)",
                    path=str(directory))


def resolve_models(cfg: EvaluateConfig, paths: Paths) -> dict[str, Path]:
    """Name -> model directory of the LM models that exist (see :func:`present`)."""
    return {name: paths.root / relative for name, relative in cfg.models.items()
            if present(cfg, paths, f"models.{name}", relative)}


def streams(cfg: EvaluateConfig, paths: Paths, sp: Any, info: Any) -> dict[str, tuple[Any, float | None, Any]]:
    """Token streams to score, by name: the configured splits (with the language of each position
    when a split has several, for bits per byte per language), then the eval files."""
    out: dict[str, tuple[Any, float | None, Any]] = {}
    for split in cfg.splits:
        out[split] = lm.split_stream(paths.tokens, split, info.fingerprint, cfg.max_tokens, paths.split / split)
    for spec in cfg.eval_files:
        docs = lm.read_documents(paths.root / spec.path, spec.format, spec.text_field)
        out[spec.name] = (*lm.file_stream(docs, sp, info.eos_id, cfg.max_tokens), None)
    return out


def comparison(cfg: EvaluateConfig, results: dict[str, Any]) -> dict[str, Any] | None:
    """Teacher and students side by side: parameters (% of teacher), quality retained (teacher bpb /
    model bpb, %), tokens/s and speed-up (x) per batch size. None when the teacher is not evaluated,
    or is a masked LM (then ``results["comparison_skipped"]`` says so)."""
    models = results["models"]
    spec = cfg.compare
    if spec.teacher not in models:
        log.warning("evaluate.compare.teacher %r was not evaluated: no comparison table", spec.teacher)
        return None
    teacher = models[spec.teacher]
    if teacher.get("objective") == "mlm":  # the report says why the table is absent
        results["comparison_skipped"] = (f"the teacher {spec.teacher!r} is a masked LM: it has no bits per byte or "
                                         "decoding speed to compare students with")
        log.warning("evaluate.compare: %s; no comparison table", results["comparison_skipped"])
        return None
    batches = list(cfg.speed.batch_sizes) if "speed_settings" in results else []
    rows = []
    for name in [spec.teacher, *[s for s in spec.students if s in models and s != spec.teacher]]:
        model = models[name]
        row: dict[str, Any] = {"model": name, "role": "teacher" if name == spec.teacher else "student",
                               "parameters": model["parameters"], "size_bytes": model["size_bytes"],
                               "parameters_pct": 100.0 * model["parameters"] / teacher["parameters"],
                               "size_pct": 100.0 * model["size_bytes"] / max(teacher["size_bytes"], 1)}
        bpb, teacher_bpb = (m["lm"].get(spec.quality_split, {}).get("bpb") for m in (model, teacher))
        if bpb and teacher_bpb:
            row["bpb"], row["quality_retained_pct"] = bpb, 100.0 * teacher_bpb / bpb
        for b in batches:
            tps, ref = model["speed"][f"tokens_per_s_b{b}"], teacher["speed"][f"tokens_per_s_b{b}"]
            row[f"tokens_per_s_b{b}"], row[f"speedup_b{b}"] = tps, tps / ref
        rows.append(row)
    missing_students = [s for s in spec.students if s not in models]
    if missing_students:
        log.warning("evaluate.compare.students not evaluated: %s", ", ".join(missing_students))
    return {"teacher": spec.teacher, "split": spec.quality_split, "batch_sizes": batches, "rows": rows}


def numeric_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the results, nested for ``dvc metrics`` (no text, no samples)."""
    out: dict[str, Any] = {}
    for name, model in results["models"].items():
        entry: dict[str, Any] = {k: model[k] for k in ("parameters", "non_embedding_parameters", "size_bytes")}
        entry.update({data: {k: v for k, v in score.items() if k not in ("tokens", "by_language")}
                      for data, score in model["lm"].items()})
        for data, score in model["lm"].items():
            if score.get("by_language"):
                entry[data]["by_language"] = {lang: {k: v for k, v in part.items() if k != "tokens"}
                                              for lang, part in score["by_language"].items()}
        entry.update({data: {k: v for k, v in score.items() if not k.endswith(("_tokens", "_windows"))}
                      for data, score in model.get("masked", {}).items()})
        entry.update(model.get("speed", {}))
        out[name] = entry
    if results.get("comparison"):
        out["comparison"] = {row["model"]: {k: v for k, v in row.items() if isinstance(v, int | float)
                                            and k not in ("parameters", "size_bytes")}
                             for row in results["comparison"]["rows"] if row["role"] == "student"}
    for task, models in results.get("classification", {}).items():
        out[task] = {n: {k: r[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall")}
                     for n, r in models.items()}
    for task, result in results.get("token_classification", {}).items():
        out[task] = {n: {k: r[k] for k in ("f1", "precision", "recall", "token_accuracy")}
                     for n, r in [*result["models"].items(), ("majority", result["majority"])]}
    for task, result in results.get("instruction", {}).items():
        out[task] = {k: result[k] for k in ("bleu", "rouge_l", "exact_match")}
        if "by_language" in result:
            out[task]["by_language"] = {lang: {k: part[k] for k in ("bleu", "rouge_l", "exact_match")}
                                        for lang, part in result["by_language"].items()}
    if results.get("baselines"):
        out["baselines"] = baselines.numeric(results["baselines"])
    if results.get("lm_eval"):
        out["lm_eval"] = {task: dict(scores) for task, scores in results["lm_eval"]["tasks"].items()}
    return out


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(",".join(header) + "\n")
        handle.writelines(",".join(str(v) for v in row) + "\n" for row in rows)


def write_outputs(cfg: EvaluateConfig, paths: Paths, results: dict[str, Any]) -> dict[str, Any]:
    """Metrics, plots, the details JSON and the report; MLflow logging; returns the summary."""
    metrics = numeric_metrics(results)
    metrics_path = paths.metrics / "evaluate.json"
    write_json(metrics_path, metrics)
    models = results["models"]
    data_names = list(dict.fromkeys(d for m in models.values() for d, score in m["lm"].items() if "bpb" in score))
    speed_keys = [f"tokens_per_s_b{b}" for b in cfg.speed.batch_sizes]
    # Wide tables, one row per model: what `dvc plots` bar templates take (x: a column, y: model).
    plots = {
        "evaluate_bpb.csv": (["model", *data_names],
                             [[n, *(m["lm"].get(d, {}).get("bpb", "") for d in data_names)] for n, m in models.items()]),
        "evaluate_speed.csv": (["model", *speed_keys],
                               [[n, *(m["speed"][k] for k in speed_keys)] for n, m in models.items() if "speed" in m]),
    }
    if results.get("comparison"):
        first = results["comparison"]["batch_sizes"][:1]
        plots["evaluate_comparison.csv"] = (
            ["model", "parameters_pct", "quality_retained_pct", "speedup"],
            [[r["model"], r["parameters_pct"], r.get("quality_retained_pct", ""),
              r.get(f"speedup_b{first[0]}", "") if first else ""] for r in results["comparison"]["rows"]])
    plot_paths = []
    for name, (header, rows) in plots.items():
        _csv(paths.plots / name, header, rows)
        plot_paths.append(paths.plots / name)
    details_path = paths.reports / "evaluation.json"
    write_json(details_path, results)
    report_path = paths.reports / "report.html"
    with atomic_write(report_path, "w", encoding="utf-8") as handle:
        handle.write(build_report(results, paths, cfg.report_title))
    log.info("report written to %s", report_path)
    tracker = tracking.active()
    tracker.set_tags({"evaluate.models": ",".join(models)})
    summary: dict[str, Any] = {"models": len(models)}
    for row in (results.get("comparison") or {}).get("rows", []):
        if row["role"] == "student":
            summary.update({f"{row['model']}.{k}": v for k, v in row.items()
                            if k in ("quality_retained_pct", "parameters_pct") or k.startswith("speedup")})
    for name, model in models.items():
        summary.update({f"{name}.{data}.{k}": score[k] for data, score in model.get("masked", {}).items()
                        for k in MASKED_SUMMARY if k in score})
    for task, table in (results.get("baselines") or {}).items():
        summary.update({f"{task}.{method}.{table['metric']}": row[table["metric"]] for method, row in table["rows"].items()})
    if results.get("lm_eval"):
        summary.update(harness.flat(results["lm_eval"]))
    summary["artifacts"] = [str(p) for p in (metrics_path, *plot_paths, details_path, report_path)]
    return summary
