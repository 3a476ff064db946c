"""Does pretraining help fine-tuning? SST-2 dev accuracy from random init, pretrained and distilled bases.

    cp configs/shared-text.yaml params.yaml && dvc repro finetune@cls distill
    python benchmarks/sst2_transfer.py                       # in that project directory
    python benchmarks/sst2_transfer.py --root DIR --task cls --steps 600 --json out.json

The project must hold the ``shared-text`` preset's outputs (``models/pretrain``, ``models/distill``
and the tokenizer). In one session this script then fine-tunes the task ``--task`` of
``params.yaml`` with the real ``finetune`` stage (``lmpipe finetune --task``) from three bases,
each with the same steps, learning rate, seed and data:

- **random init**: a model of ``models/pretrain``'s shape and tokenizer with freshly initialised
  weights (the pipeline's own init, seeded), written to ``models/random_init``;
- **pretrained**: ``models/pretrain``;
- **pretrained then distilled**: ``models/distill``, the student distilled from it.

Next to them are the task's two plain baselines on the same dev set: the majority class of train,
and bag-of-words (TF-IDF word 1-2-grams + logistic regression), computed by evaluate's own
:func:`lmpipe.evaluate.baselines.classification_baselines`,
fitted on the task's train rows (``--set finetune.tasks.cls.train_data.max_examples=2000`` limits
them for every row alike). Each fine-tune's ``metrics/finetune_<task>.json`` is kept as
``metrics/transfer/<base>.json``; the markdown table (dev accuracy, macro F1, parameters, seconds; a
finished fine-tune of the same settings is resumed, not retrained) goes to stdout and, with ``--json``, the numbers to a file. The last fine-tune leaves its model at
``models/finetune/<task>`` (run ``dvc repro`` to bring the pipeline's own back).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmpipe.config import Paths, load_params
from lmpipe.evaluate.baselines import classification_baselines
from lmpipe.evaluate.config import BaselineSettings, ClassificationEval
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import read_model_config, save_model

BASES = {"random init": "models/random_init", "pretrained": "models/pretrain",
         "pretrained then distilled": "models/distill"}


def write_random_init(root: Path, seed: int) -> Path:
    """``models/random_init``: ``models/pretrain``'s config (shape, tokenizer fingerprint) with fresh weights."""
    config = read_model_config(root / "models/pretrain")
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict(config["model"]))
    out = root / BASES["random init"]
    save_model(model, out, {k: v for k, v in config.items() if k not in ("model_type", "model", "training")})
    return out


def finetune(root: Path, task: str, init: str, overrides: list[str]) -> tuple[dict[str, Any], float]:
    lmpipe = Path(sys.executable).with_name("lmpipe")
    command = [str(lmpipe), "finetune", "--root", str(root), "--task", task,
               "-S", f"finetune.tasks.{task}.init={init}", *(a for o in overrides for a in ("-S", o))]
    start = time.perf_counter()
    subprocess.run(command, cwd=root, check=True)
    seconds = time.perf_counter() - start
    return json.loads((root / f"metrics/finetune_{task}.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="Project directory (default: .).")
    parser.add_argument("--task", default="cls", help="Classification task of finetune.tasks (default: cls).")
    parser.add_argument("--steps", type=int, help="Fine-tuning steps for every base (default: the task's).")
    parser.add_argument("--seed", type=int, default=1337, help="Seed of the random init (default: 1337).")
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES), metavar="BASE",
                        help=f"Bases to fine-tune from (default: all of {', '.join(map(repr, BASES))}).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Further finetune overrides for every row, e.g. finetune.tasks.cls.lr=1e-3 or "
                        "finetune.tasks.cls.train_data.max_examples=2000.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()
    root = args.root.resolve()
    overrides = list(args.set) + ([f"finetune.tasks.{args.task}.max_steps={args.steps}"] if args.steps else [])
    tasks = load_params(root / "params.yaml", overrides, sections=["finetune"]).finetune.tasks
    if args.task not in tasks:
        parser.error(f"no task {args.task!r} in finetune.tasks (tasks: {', '.join(tasks)})")
    spec = tasks[args.task]
    if spec.type != "classification":
        parser.error(f"finetune.tasks.{args.task} is not a classification task")
    baselines = classification_baselines(args.task, ClassificationEval(models={"finetuned": "."}, data=spec.dev_data,
                                                                       train_data=spec.train_data),
                                         BaselineSettings(), Paths(root), None, None, torch.device("cpu"),
                                         prompted=False)
    rows: dict[str, dict[str, Any]] = {
        "majority class of train": {"dev_accuracy": baselines["majority"]["accuracy"]},
        "bag-of-words (TF-IDF + logistic regression)": {"dev_accuracy": baselines["bag_of_words"]["accuracy"],
                                                        "dev_macro_f1": baselines["bag_of_words"]["macro_f1"]},
    }
    kept = root / "metrics/transfer"
    kept.mkdir(parents=True, exist_ok=True)
    for base in args.bases:
        if base == "random init":
            write_random_init(root, args.seed)
        metrics, seconds = finetune(root, args.task, BASES[base], overrides)
        (kept / f"{base.replace(' ', '_')}.json").write_text(json.dumps(metrics, indent=2))
        rows[f"{base} ({BASES[base]})"] = {
            "dev_accuracy": metrics["dev_accuracy"], "dev_macro_f1": metrics["dev_macro_f1"],
            "dev_accuracy_initial": metrics["dev_accuracy_initial"], "steps": metrics["steps"],
            "best_step": metrics["best_step"], "parameters": metrics["total_parameters"], "seconds": round(seconds, 1)}
    print(f"\nSST-2-style transfer, task {args.task}: {baselines['majority']['examples']:,} dev examples\n")
    print("| model | dev accuracy | dev macro F1 | best step / steps run | parameters | fine-tune s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        f1 = f"{row['dev_macro_f1']:.3f}" if "dev_macro_f1" in row else ""
        size = f"{row['parameters']:,}" if "parameters" in row else ""
        steps = f"{row['best_step']:,} / {row['steps']:,}" if "steps" in row else ""
        print(f"| {name} | {row['dev_accuracy']:.3f} | {f1} | {steps} | {size} | {row.get('seconds', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
