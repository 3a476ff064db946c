"""The HTML report: one self-contained page from data to tokenizer to training to the comparison.

Reads what the earlier stages left (each part is skipped with a note when its input is missing):
``data/clean/clean_report.json``, ``data/split/manifest.json``, ``artifacts/tokenizer/report.json``,
``data/tokens/meta.json``, ``metrics/*.json`` and the loss curves ``plots/pretrain_loss.csv``,
``plots/distill*_loss.csv``, ``plots/finetune/<task>/dev.csv``; plus the evaluate stage's results.
Figures are matplotlib PNGs embedded as base64, so the page is one file that can be mailed,
attached to an MLflow run or opened from a DVC cache without its neighbours.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmpipe.config import Paths

STYLE = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330; margin: 0;
       background: #f4f5f7; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 32px 0 8px; border-bottom: 2px solid #e3e6eb;
padding-bottom: 4px; } h3 { font-size: 16px; margin: 20px 0 6px; }
p.note, .muted { color: #667085; } p.missing { color: #9a6700; background: #fff8c5; padding: 6px 10px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e3e6eb; padding: 4px 12px; text-align: right; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; white-space: pre-wrap; max-width: 640px; font-family: ui-monospace, Menlo, monospace;
          font-size: 13px; }
tr.highlight td { background: #eef6ff; font-weight: 600; }
img { max-width: 100%; margin: 6px 0; } .kpis { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.kpi { border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.kpi b { display: block; font-size: 20px; } .kpi span { color: #667085; font-size: 13px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #3b5bdb; }
"""


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: integers with thousands separators, floats with ``digits`` significant
    decimals; None and NaN as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{round(value):,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        places = 1 if abs(value) >= 100 else 2 if abs(value) >= 10 else digits
        text = f"{value:.{places}f}"
        return text.rstrip("0").rstrip(".") if "." in text and places == digits else text
    return html.escape(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], highlight: set[int] | None = None,
          text_columns: set[int] | None = None) -> str:
    """An HTML table; cells are formatted with :func:`fmt` unless they are in ``text_columns``."""
    left = ' style="text-align:left"'
    out = ["<table><tr>", *(f"<th{left if text_columns and i in text_columns else ''}>{html.escape(h)}</th>"
                            for i, h in enumerate(headers)), "</tr>"]
    for idx, row in enumerate(rows):
        out.append('<tr class="highlight">' if highlight and idx in highlight else "<tr>")
        for col, cell in enumerate(row):
            if text_columns and col in text_columns:
                out.append(f'<td class="text">{html.escape(str(cell))}</td>')
            else:
                out.append(f"<td>{fmt(cell)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def figure_html(fig: Any, alt: str) -> str:
    """Render a matplotlib figure as an embedded PNG and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Columns of a step-indexed CSV (``step,<a>,<b>``) as {column: [(step, value)]}, blanks dropped."""
    curves: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return curves
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value not in (None, ""):
                    try:
                        curves.setdefault(key, []).append((float(row["step"]), float(value)))
                    except ValueError:
                        continue
    return curves


def missing(what: str, how: str) -> str:
    return f'<p class="missing">{html.escape(what)} not available: {html.escape(how)}.</p>'


# ------------------------------------------------------------------------------------- sections


def data_section(paths: Paths) -> str:
    report = read_json(paths.clean / "clean_report.json")
    parts = ["<h2>1. Data: collection, cleaning, split</h2>"]
    if report is None:
        return parts[0] + missing("The clean report", "run `lmpipe clean`")
    docs_in, docs_out = report["input"]["docs"], report["output"]["docs"]
    bytes_in, bytes_out = report["input"]["bytes"], report["output"]["bytes"]
    parts.append(table(["", "documents", "bytes"], [
        ["collected (data/raw)", docs_in, bytes_in], ["kept (data/clean)", docs_out, bytes_out],
        ["kept %", 100 * docs_out / max(docs_in, 1), 100 * bytes_out / max(bytes_in, 1)]]))
    removed = sorted(((n, e["docs"], e["bytes"]) for n, e in report["removed"].items() if e["docs"]),
                     key=lambda r: -r[1])
    if removed:
        parts.append("<h3>Documents removed by each rule</h3>")
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(removed) + 1))
        ax.barh([r[0] for r in removed][::-1], [r[1] for r in removed][::-1], color="#4c6ef5")
        ax.set_xlabel("documents removed")
        parts.append(figure_html(fig, "documents removed per cleaning rule"))
        parts.append(table(["rule", "documents", "bytes"], removed))
    pii = report.get("pii", {})
    if pii.get("matches"):
        parts.append("<p>Personal data redacted: " + ", ".join(
            f"{fmt(count)} {html.escape(kind)}" for kind, count in pii["matches"].items())
            + f" in {fmt(pii.get('docs_modified', 0))} documents.</p>")
    manifest = read_json(paths.split / "manifest.json")
    if manifest is not None:
        counts = manifest.get("counts", {})
        rows = [[split, counts.get(f"docs.{split}"), counts.get(f"bytes.{split}")] for split in ("train", "val", "test")]
        parts.append("<h3>Split (by hash of the document id)</h3>" + table(["split", "documents", "bytes"], rows))
        extra = {k: v for k, v in counts.items() if not k.startswith(("docs.", "bytes."))}
        if extra:
            parts.append("<p class='note'>" + ", ".join(f"{html.escape(k)}: {fmt(v)}" for k, v in extra.items()) + "</p>")
    return "".join(parts)


def tokenizer_section(paths: Paths) -> str:
    head = "<h2>2. Tokenizer</h2>"
    report, info = read_json(paths.tokenizer / "report.json"), read_json(paths.tokenizer / "tokenizer.json")
    if report is None or info is None:
        return head + missing("The tokenizer report", "run `lmpipe tokenizer`")
    kpis = [("vocabulary", info.get("vocab_size")), ("bytes / token", report.get("bytes_per_token")),
            ("tokens / word", report.get("tokens_per_word")), ("byte fallback rate", report.get("byte_fallback_rate")),
            ("vocab coverage", report.get("vocab_coverage"))]
    parts = [head, f"<p>{html.escape(str(info.get('model_type', '')))} sentencepiece model, fingerprint "
             f"<code>{html.escape(str(info.get('fingerprint', ''))[:12])}</code>; compression measured on "
             f"{fmt(report.get('sample_bytes'))} bytes of the {html.escape(str(report.get('split', 'val')))} split.</p>",
             '<div class="kpis">', *(f'<div class="kpi"><b>{fmt(v, 3)}</b><span>{k}</span></div>' for k, v in kpis),
             "</div>"]
    languages = report.get("by_language") or {}
    if languages:
        parts.append("<h3>Per language</h3>" + table(
            ["language", "documents", "bytes", "tokens", "bytes / token", "tokens / character", "tokens / word"],
            [[lang, e.get("documents"), e.get("bytes"), e.get("tokens"), e.get("bytes_per_token"),
              e.get("tokens_per_char"), e.get("tokens_per_word")] for lang, e in languages.items()], text_columns={0}))
    meta = read_json(paths.tokens / "meta.json")
    if meta is not None:
        rows = [[s, e.get("documents"), e.get("tokens"), e.get("bytes")] for s, e in meta.get("splits", {}).items()]
        parts.append("<h3>Token shards (data/tokens)</h3>" + table(["split", "documents", "tokens", "bytes"], rows))
    top = report.get("top_tokens", [])[:12]
    if top:
        parts.append("<details><summary>Most frequent tokens</summary>" + table(
            ["piece", "id", "share"], [[t["piece"], t["id"], t["share"]] for t in top], text_columns={0}) + "</details>")
    return "".join(parts)


def training_section(paths: Paths) -> str:
    parts = ["<h2>3. Training</h2>"]
    curves = {"pretrain": read_curve(paths.plots / "pretrain_loss.csv"),
              "distill (student)": read_curve(paths.plots / "distill_loss.csv"),
              "baseline (no teacher)": read_curve(paths.plots / "distill_baseline_loss.csv")}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        parts.append(missing("Loss curves", "run `lmpipe pretrain` and `lmpipe distill`"))
    else:
        plt = _plt()
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), sharey=True, squeeze=False)
        for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
            # The student's training loss is its distillation objective (a KL), not a cross-entropy.
            train_label = "train objective (KL)" if name.startswith("distill") else "train loss"
            for key, style, label in (("train_loss", "-", train_label), ("val_loss", "o-", "val loss")):
                if key in curve:
                    ax.plot(*zip(*curve[key], strict=True), style, label=label, markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.legend()
        axes[0][0].set_ylabel("loss (nats/token)")
        parts.append(figure_html(fig, "training loss curves"))
    root = paths.plots / "finetune"
    dev = {p.parent.name: c for p in sorted(root.glob("*/dev.csv")) if (c := read_curve(p))} if root.is_dir() else {}
    if dev:
        plt = _plt()
        fig, axes = plt.subplots(1, len(dev), figsize=(4.5 * len(dev), 3.2), squeeze=False)
        for ax, (task, curve) in zip(axes[0], dev.items(), strict=True):
            for key, points in curve.items():
                ax.plot(*zip(*points, strict=True), "o-", label=key.replace("_", " "), markersize=3)
            ax.set_title(f"finetune {task}: dev metrics")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        parts.append(figure_html(fig, "finetune dev curves"))
    rows = []
    for name in ("pretrain", "distill", "distill_baseline"):
        metrics = read_json(paths.metrics / f"{name}.json")
        if isinstance(metrics, dict):
            rows.append([name, metrics.get("steps"), metrics.get("parameters"), metrics.get("train_loss"),
                         metrics.get("val_loss"), metrics.get("val_bpb"), metrics.get("tokens_per_s")])
    if rows:
        parts.append(table(["stage", "steps", "parameters", "final train objective", "val loss", "val bits/byte",
                            "train tokens/s"], rows))
        parts.append("<p class='note'>As logged by each training stage: the distilled student's objective is its "
                     "KL to the teacher, the others' cross-entropy; val loss and bits per byte on the stage's val "
                     "batches (the full val split is scored in sections 4 and 5).</p>")
    return "".join(parts)


def comparison_section(results: dict[str, Any]) -> str:
    head = "<h2>4. Teacher vs student vs baseline</h2>"
    comparison = results.get("comparison")
    if not comparison and results.get("comparison_skipped"):
        return head + f"<p class='note'>No comparison: {html.escape(results['comparison_skipped'])}.</p>"
    if not comparison:
        return head + missing("The comparison", "list the teacher and students in evaluate.models and "
                              "evaluate.compare (and run `lmpipe distill`)")
    rows = comparison["rows"]
    batches = comparison["batch_sizes"]
    headers = ["model", "parameters", "% of teacher", "size on disk (MB)", f"{comparison['split']} bits/byte",
               "quality retained %"]
    for b in batches:
        headers += [f"tokens/s (batch {b})", f"speed-up (batch {b})"]
    body = []
    for row in rows:
        cells = [row["model"], row["parameters"], row["parameters_pct"], row["size_bytes"] / 1e6, row.get("bpb"),
                 row.get("quality_retained_pct")]
        for b in batches:
            cells += [row.get(f"tokens_per_s_b{b}"), row.get(f"speedup_b{b}")]
        body.append(cells)
    parts = [head, f"<p>Quality retained = teacher bits per byte / model bits per byte on "
             f"<b>{html.escape(comparison['split'])}</b> (lower bits per byte is better); speed-up = generated "
             "tokens/s relative to the teacher, measured in the same interleaved rounds on the same device. The "
             "baseline is the student architecture trained without the teacher for the same number of steps.</p>",
             table(headers, body, highlight={i for i, r in enumerate(rows) if r["role"] == "teacher"})]
    plt = _plt()
    names = [r["model"] for r in rows]
    colours = ["#868e96" if r["role"] == "teacher" else "#4c6ef5" for r in rows]
    panels = [("parameters (% of teacher)", [r["parameters_pct"] for r in rows], 100.0),
              ("quality retained (%)", [r.get("quality_retained_pct") or 0.0 for r in rows], 100.0)]
    if batches:
        panels.append((f"speed-up, batch {batches[0]} (x)", [r.get(f"speedup_b{batches[0]}") or 0.0 for r in rows],
                       1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, values, ref) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=colours)
        ax.axhline(ref, color="#495057", linestyle="--", linewidth=1)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    parts.append(figure_html(fig, "teacher vs student comparison"))
    return "".join(parts)


def skipped_notes(results: dict[str, Any], what: str, label: str) -> str:
    """One note per model whose ``what`` measurement was skipped (a masked LM's causal ones), with the reason."""
    return "".join(f"<p class='note'>{html.escape(label)} of <b>{html.escape(name)}</b> skipped: "
                   f"{html.escape(model['skipped'][what])}.</p>"
                   for name, model in results.get("models", {}).items() if what in model.get("skipped", {}))


def masked_lm_part(results: dict[str, Any]) -> str:
    """Masked-token loss and accuracy and pseudo-perplexity of the masked-LM models."""
    rows = [[name, data, score.get("mask_rate"), score.get("masked_tokens"), score["masked_loss"],
             score["masked_accuracy"], score.get("pseudo_windows"), score.get("pseudo_tokens"),
             score.get("pseudo_perplexity")]
            for name, model in results.get("models", {}).items() for data, score in model.get("masked", {}).items()]
    if not rows:
        return ""
    return ("<h3>Masked language modelling</h3><p>Masked-LM models are scored as they were trained: tokens masked "
            "at the pretraining rate (80% mask token, 10% random, 10% kept; the same seeded masks for every model), "
            "masked-token loss in nats and accuracy over the masked positions; pseudo-perplexity (Salazar et al. "
            "2020) masks each token of a sample of windows in turn.</p>"
            + table(["model", "data", "mask rate", "masked tokens", "masked loss", "masked accuracy",
                     "pseudo-PPL windows", "pseudo-PPL tokens", "pseudo-perplexity"], rows))


def lm_section(results: dict[str, Any]) -> str:
    models = results.get("models", {})
    parts = ["<h2>5. Language modelling</h2>",
             "<p>Loss in nats per token, perplexity = exp(loss), bits per byte = total bits / UTF-8 bytes of the text "
             "(independent of the tokenizer).</p>", skipped_notes(results, "lm", "Causal loss and bits per byte"),
             masked_lm_part(results)]
    sets = sorted({s for m in models.values() for s in m.get("lm", {})}, key=lambda s: (s not in ("val", "test"), s))
    if not sets:
        if any("masked" in m for m in models.values()):
            return "".join(parts)
        return "".join(parts) + missing("LM scores", "configure evaluate.models and evaluate.splits")
    models = {n: m for n, m in models.items() if m.get("lm")}  # the bits-per-byte plot: causal models only
    rows = []
    for name, model in models.items():
        for split in sets:
            score = model.get("lm", {}).get(split)
            if score:
                rows.append([name, split, score.get("tokens"), score["loss"], score["perplexity"], score.get("bpb")])
                for lang, part in (score.get("by_language") or {}).items():
                    rows.append([name, f"{split} ({lang})", part.get("tokens"), part["loss"], None, part.get("bpb")])
    parts.append(table(["model", "data", "tokens scored", "loss", "perplexity", "bits/byte"], rows))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(12, 2 + 1.5 * len(models) * len(sets) / 2), 3.2))
    width = 0.8 / len(sets)
    for i, split in enumerate(sets):
        values = [models[n].get("lm", {}).get(split, {}).get("bpb") or 0.0 for n in models]
        bars = ax.bar([j + i * width for j in range(len(models))], values, width, label=split)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7)
    ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(models))], list(models))
    ax.set_ylabel("bits per byte")
    shown = [v for n in models for v in (models[n].get("lm", {}).get(d, {}).get("bpb") for d in sets) if v]
    if shown and max(shown) > 10 * min(shown):  # an out-of-domain eval file next to in-domain splits
        ax.set_yscale("log")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(sets), frameon=False)
    parts.append(figure_html(fig, "bits per byte per model"))
    return "".join(parts)


def efficiency_section(results: dict[str, Any]) -> str:
    models = results.get("models", {})
    settings = results.get("speed_settings")
    parts = ["<h2>6. Efficiency</h2>"]
    rows = [[n, m.get("parameters"), m.get("non_embedding_parameters"), m.get("size_bytes", 0) / 1e6,
             m.get("n_layer"), m.get("n_embd")] for n, m in models.items()]
    parts.append(table(["model", "parameters", "non-embedding", "size on disk (MB)", "layers", "width"], rows))
    parts.append(skipped_notes(results, "speed", "Generation speed"))
    if not settings:
        if all("speed" in m.get("skipped", {}) for m in models.values()):
            return "".join(parts)
        return "".join(parts) + missing("Generation speed", "enable evaluate.speed")
    parts.append(f"<p>Greedy generation with the KV cache on <b>{html.escape(settings['device'])}</b>: "
                 f"{settings['prompt_tokens']}-token prompt, {settings['new_tokens']} new tokens, median of "
                 f"{settings['repeats']} interleaved rounds after {settings['warmup']} warm-up rounds.</p>")
    headers, keys = ["model"], []
    for b in settings["batch_sizes"]:
        headers += [f"tokens/s (batch {b})", f"ms/token (batch {b})"]
        keys += [f"tokens_per_s_b{b}", f"latency_ms_per_token_b{b}"]
    parts.append(table(headers, [[n, *(m.get("speed", {}).get(k) for k in keys)] for n, m in models.items()]))
    return "".join(parts)


def tasks_section(results: dict[str, Any]) -> str:
    parts = ["<h2>7. Tasks</h2>"]
    classification, instruction = results.get("classification", {}), results.get("instruction", {})
    tagging = results.get("token_classification", {})
    if not classification and not instruction and not tagging and not results.get("lm_eval"):
        return "".join(parts) + missing("Task scores", "configure evaluate.classification / token_classification / "
                                        "instruction")
    for task, models in classification.items():
        parts.append(f"<h3>Classification: {html.escape(task)}</h3>")
        parts.append(table(["model", "examples", "accuracy", "macro F1", "macro precision", "macro recall",
                            "majority-class accuracy"],
                           [[n, r["examples"], r["accuracy"], r["macro_f1"], r["macro_precision"], r["macro_recall"],
                             r["majority_accuracy"]] for n, r in models.items()]))
    for task, result in tagging.items():
        parts.append(token_classification_part(task, result))
    for task, result in instruction.items():
        parts.append(f"<h3>Instructions: {html.escape(task)}</h3>")
        rows = [["all", result["examples"], result["bleu"], result["rouge_l"], result["exact_match"],
                 result["bleu_signature"]]]
        rows += [[lang, part["examples"], part["bleu"], part["rouge_l"], part["exact_match"], part["bleu_signature"]]
                 for lang, part in result.get("by_language", {}).items()]
        parts.append(table(["references", "prompts", "BLEU", "ROUGE-L F1", "exact match", "sacrebleu signature"], rows,
                           text_columns={0, 5}))
        parts.append(table(["prompt", "reference", "generated", "ROUGE-L"],
                           [[s["prompt"], s["reference"], s["generated"], s["rouge_l"]] for s in result["samples"]],
                           text_columns={0, 1, 2}))
    for task, baseline_table in results.get("baselines", {}).items():
        parts.append(baselines_part(task, baseline_table))
    if results.get("lm_eval"):
        parts.append(lm_eval_part(results["lm_eval"]))
    return "".join(parts)


def token_classification_part(task: str, result: dict[str, Any]) -> str:
    """Entity-level scores of each tagger and of the most-frequent-tag baseline, one plain line
    when a tagger loses to it, and the per-entity table of each tagger."""
    majority = result["majority"]
    rows = [[f"fine-tuned: {n}", r["examples"], r["f1"], r["precision"], r["recall"], r["token_accuracy"]]
            for n, r in result["models"].items()]
    rows.append(["baseline: most frequent tag of each word in train", majority["examples"], majority["f1"],
                 majority["precision"], majority["recall"], majority["token_accuracy"]])
    parts = [f"<h3>Token classification: {html.escape(task)}</h3>",
             "<p>Entity-level scores (seqeval, conlleval's definition: an entity counts when its type and both "
             "ends match), micro-averaged over entities.</p>",
             table_rows(["model", "sentences", "entity F1", "precision", "recall", "token accuracy"], rows,
                        set(range(len(result["models"]))))]
    for name, scores in result["models"].items():
        if scores["f1"] < majority["f1"]:
            parts.append(f"<p class='missing'><b>The fine-tuned model {html.escape(name)} loses to the "
                         f"most-frequent-tag baseline</b> on entity F1: {fmt(scores['f1'])} against "
                         f"{fmt(majority['f1'])}.</p>")
        parts.append(f"<p>Per entity type, {html.escape(name)}:</p>")
        parts.append(table(["entity", "support", "F1", "precision", "recall"],
                           [[entity, s["support"], s["f1"], s["precision"], s["recall"]]
                            for entity, s in scores["per_entity"].items()], text_columns={0}))
    return "".join(parts)


def lm_eval_part(result: dict[str, Any]) -> str:
    """lm-evaluation-harness's scores of the exported model on the project's own tasks."""
    rows = [[task, scores.get("examples"), scores.get("acc"), scores.get("acc_norm"), scores.get("bits_per_byte"),
             scores.get("byte_perplexity"), scores.get("word_perplexity")] for task, scores in result["tasks"].items()]
    return (f"<h3>lm-evaluation-harness: {html.escape(result['model'])}</h3>"
            f"<p>lm-eval {html.escape(result['lm_eval_version'])} on the model's Hugging Face export "
            f"({html.escape(result['architecture'])}), with tasks written from this project's data: classification "
            "as multiple choice (acc: the choice of highest log-likelihood; acc_norm: per byte), and a split's "
            "documents as rolling-loglikelihood perplexity.</p>"
            + table(["task", "documents", "acc", "acc_norm", "bits/byte", "byte perplexity", "word perplexity"], rows,
                    text_columns={0}))


METHOD_NAMES = {"majority": "majority class", "bag_of_words": "bag-of-words (TF-IDF + logistic regression)",
                "zero_shot": "base model, zero-shot"}


def method_name(method: str, row: dict[str, Any], tuned: Sequence[str]) -> str:
    if method in tuned:
        return f"fine-tuned: {method}"
    if method.startswith("few_shot_"):
        return f"base model, {row.get('shots')}-shot ({fmt(row.get('shots_used'), 2)} fitted on average)"
    return METHOD_NAMES.get(method, method)


def baselines_part(task: str, table: dict[str, Any]) -> str:
    """The task's table (baselines, then the fine-tuned models) and one plain sentence: which
    fine-tuned model loses to which baseline, or that none does."""
    rows, tuned = table["rows"], table["finetuned"]
    parts = [f"<h3>Baselines: {html.escape(task)}</h3>"]
    marked = {i for i, m in enumerate(rows) if m in tuned}
    if table["type"] == "classification":
        parts.append(table_rows(
            ["method", "examples", "accuracy", "macro F1", "macro precision", "macro recall"],
            [[method_name(m, r, tuned), r["examples"], r["accuracy"], r["macro_f1"], r["macro_precision"],
              r["macro_recall"]] for m, r in rows.items()], marked))
        what = "accuracy"
    else:
        parts.append(table_rows(
            ["method", "answers", "answer loss (nats/token)", "answer bits/byte", "exact match"],
            [[method_name(m, r, tuned), r["examples"], r["loss"], r["bpb"], r.get("exact_match")]
             for m, r in rows.items()], marked))
        what = "bits per byte of the reference answers (lower is better)"
    if table.get("prompted_skipped"):
        parts.append(f"<p class='note'>Prompted baselines (zero- and few-shot) skipped: "
                     f"{html.escape(table['prompted_skipped'])}.</p>")
    key = table["metric"]
    if table["loses_to"]:
        for model in tuned:
            beaten = [b for t, b in table["loses_to"] if t == model]
            if beaten:
                who = f"The fine-tuned model of {task}" if model == "finetuned" else f"The fine-tuned model {model}"
                parts.append(f"<p class='missing'><b>{html.escape(who)} loses to "
                             + ", ".join(f"{html.escape(method_name(b, rows[b], tuned))} ({fmt(rows[b][key], 4)})"
                                         for b in beaten)
                             + f"</b> on {what}: it scores {fmt(rows[model][key], 4)}.</p>")
    else:
        parts.append(f"<p class='note'>The fine-tuned model beats every baseline on {what}.</p>")
    return "".join(parts)


def table_rows(headers: list[str], body: list[list[Any]], highlight: set[int]) -> str:
    return table(headers, body, highlight=highlight, text_columns={0})


def samples_section(results: dict[str, Any]) -> str:
    rows = [[name, s["prompt"] or "(new document)", s["continuation"]]
            for name, model in results.get("models", {}).items() for s in model.get("samples", [])]
    notes = skipped_notes(results, "samples", "Sample generations")
    if not rows:
        return f"<h2>8. Sample generations</h2>{notes}" if notes else ""
    return "<h2>8. Sample generations</h2>" + notes + table(["model", "prompt", "continuation"], rows,
                                                            text_columns={1, 2})


def metrics_appendix(paths: Paths) -> str:
    files = sorted(paths.metrics.glob("*.json")) if paths.metrics.is_dir() else []
    parts = []
    for path in files:
        if path.name == "evaluate.json":
            continue
        data = read_json(path)
        if isinstance(data, dict):
            flat = [(k, v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)]
            parts.append(f"<details><summary>metrics/{html.escape(path.name)}</summary>{table(['key', 'value'], flat)}"
                         "</details>")
    return "<h2>Appendix: stage metrics</h2>" + "".join(parts) if parts else ""


def build_report(results: dict[str, Any], paths: Paths, title: str) -> str:
    """The whole report page as an HTML string."""
    models = results.get("models", {})
    settings = results.get("speed_settings") or {}
    intro = (f"<p class='muted'>{len(models)} model(s) evaluated: {html.escape(', '.join(models))}"
             + (f"; speed measured on {html.escape(settings['device'])}" if settings else "") + ".</p>")
    body = [data_section(paths), tokenizer_section(paths), training_section(paths), comparison_section(results),
            lm_section(results), efficiency_section(results), tasks_section(results), samples_section(results),
            metrics_appendix(paths)]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><main><h1>{html.escape(title)}</h1>{intro}{''.join(body)}"
            "</main></body></html>\n")
