"""Recipe quality: the pipeline's pretraining recipe against a bare PyTorch GPT loop at equal wall time.

    python benchmarks/recipe_quality.py --corpus ../shared/data/tinyshakespeare/input.txt \\
        --corpus ../shared/data/wikitext2/valid.txt --seconds 120
    python benchmarks/recipe_quality.py ... --ablate            # a row per recipe option, plus all winners

For each corpus, in one process on one machine: the first 90% of the file (cut at a line end) is
the training text and the last 10% the held-out text. A temporary project directory gets them as
``data/split/{train,val,test}`` (documents are runs of lines ending at a blank line, so the
held-out documents hold exactly the held-out bytes), then the real ``tokenizer`` stage (it reads
the training text only) and ``tokenize`` stage write the token files both sides train on:

- **bare**: a GPT-2 written below (learned positions, pre-LayerNorm, GELU, tied embedding, no
  biases) with the pipeline model's shape, trained by a plain loop as nanoGPT's: AdamW with the
  recipe's lr, betas and weight decay (on every matrix), linear warmup, cosine decay over the
  wall-clock budget, gradient clipping; random windows of the token file. No other tricks.
- **pipeline**: :func:`lmpipe.train.pretrain.stage.train`, the stage itself, with the recipe of
  ``--params`` (its ``pretrain`` section; ``--set`` changes keys of it) and ``max_time`` = the same
  budget, which holds its final validation and checkpoint too.

Both models are then scored by one function on the held-out tokens: every token predicted once
(non-overlapping windows of the context length, the first opened by EOS), bits per byte = total
loss in nats / ln 2 / the held-out text's UTF-8 bytes. The same score on the training text
itself is printed next to it: where the two part, the run is memorising its text. With ``--ablate`` the pipeline trains a base
recipe (every option below off), each option alone on top of it, the options that lowered the
mean held-out bpb over the corpora together ("all winners"), and the ``--params`` recipe as is when
it differs from the base. The markdown table gives each row's bpb and its ratio to the bare loop.
On CUDA both sides train in bf16 (``--compile``: torch.compile on both).

The pipeline validates only at its last step unless a row sets ``eval_every``. A row that then
exports its best val evaluation (``export_weights: best``, the default) needs ``--val-share``: that
share of the training documents becomes its val split, which it does not train on, so no weights
are chosen by the held-out text.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpipe.config import Paths, load_params
from lmpipe.data.shards import ShardWriter, doc_ids, make_table
from lmpipe.model.io import load_model
from lmpipe.tokenizer import shards as tokenize_stage
from lmpipe.tokenizer import train as tokenizer_stage
from lmpipe.tokenizer.config import TokenizeConfig
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

REPO = Path(__file__).resolve().parents[1]
# Each option of the recipe: the params keys that turn it on, and those of the recipe without it.
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    "muon": (["optimizer=muon"], ["optimizer=adamw"]),
    "qk_norm": (["model.qk_norm=true"], ["model.qk_norm=false"]),
    "relu2": (["model.mlp=relu2"], ["model.mlp=gelu"]),
    "untied_head": (["model.tie_weights=false"], ["model.tie_weights=true"]),
    "embed_scale": (["model.embed_scale=true"], ["model.embed_scale=false"]),
}


# ------------------------------------------------------------------------------ the corpus


def documents(text: str, min_bytes: int) -> list[str]:
    """``text`` cut into documents at the first blank line after ``min_bytes``; they concatenate to ``text``."""
    docs, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.encode("utf-8"))
        if size >= min_bytes and not line.strip():
            docs.append("".join(current))
            current, size = [], 0
    if current:
        docs.append("".join(current))
    return docs


def prepare(corpus: Path, root: Path, params: Path, vocab_size: int, doc_bytes: int,
            val_share: float = 0.0) -> dict[str, Any]:
    """Write the project at ``root`` for ``corpus``: splits, tokenizer, tokens. Returns the held-out facts.

    With ``val_share``, one training document in round(1 / val_share) (evenly spread, as a random
    split would) is the pipeline's val split, which ``export_weights: best`` selects on; the
    pipeline trains on the others, the bare loop and the training-text score read them all. A
    contiguous val part would not do: the text just before the held-out part is where its names
    first occur (tinyshakespeare's last play). Without it the val split is the held-out text, read
    only by the pipeline's final evaluation (``eval_every: 0``)."""
    data = corpus.read_bytes()
    cut = data.find(b"\n", int(0.9 * len(data))) + 1 or len(data)
    train_docs = documents(data[:cut].decode("utf-8"), doc_bytes)
    test_docs = documents(data[cut:].decode("utf-8"), doc_bytes)
    every = round(1 / val_share) if val_share else 0
    val_docs = [d for i, d in enumerate(train_docs) if every and i % every == every - 1]
    paths = Paths(root)
    splits = {"train": [d for i, d in enumerate(train_docs) if not every or i % every != every - 1],
              "val": val_docs or test_docs, "test": test_docs}
    for split, docs in splits.items():
        writer = ShardWriter(paths.split / split)
        writer.write(make_table(doc_ids(docs), docs, [corpus.name] * len(docs), ["{}"] * len(docs)))
        writer.close()
    sections = load_params(params, [f"tokenizer.vocab_size={vocab_size}"], sections=["tokenizer"])
    tokenizer_stage.run(sections.tokenizer, paths)
    tokenize_stage.run(TokenizeConfig(splits=["train", "val", "test"]), paths)
    meta = json.loads((paths.tokens / "meta.json").read_text())
    tokens = {split: np.fromfile(paths.tokens / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
              for split in ("train", "val", "test")}
    # Every document ends with EOS, so the val documents append to the training ones as whole documents.
    train_tokens = np.concatenate([tokens["train"], tokens["val"]]) if val_docs else tokens["train"]
    return {"paths": paths, "meta": meta, "train_bytes": cut, "test_bytes": len(data) - cut,
            "val_bytes": sum(len(d.encode("utf-8")) for d in val_docs), "train_tokens": train_tokens,
            "test_tokens": tokens["test"]}


def scores(logits_of: Callable[[Tensor], Tensor], project: dict[str, Any], block_size: int,
           device: torch.device) -> dict[str, float]:
    """Bits per byte on the held-out text (``bpb``) and on the training text itself (``train_bpb``):
    the gap between the two is how much of what a run learnt does not carry to new text."""
    eos = int(project["meta"]["eos_id"])
    return {"bpb": bits_per_byte(logits_of, project["test_tokens"], eos, block_size, project["test_bytes"], device),
            "train_bpb": bits_per_byte(logits_of, project["train_tokens"], eos, block_size, project["train_bytes"],
                                       device)}


# ------------------------------------------------------------------------------ scoring


@torch.no_grad()
def bits_per_byte(logits_of: Callable[[Tensor], Tensor], tokens: np.ndarray, eos: int, block_size: int,
                  n_bytes: int, device: torch.device, batch: int = 32) -> float:
    """Total loss in nats of every held-out token / ln 2 / held-out UTF-8 bytes. Windows of
    ``block_size`` do not overlap; an EOS opens the first, as it opens every training document."""
    ids = torch.from_numpy(np.concatenate([[eos], tokens]))
    full = (len(ids) - 1) // block_size * block_size
    inputs, targets = ids[:full].view(-1, block_size), ids[1:full + 1].view(-1, block_size)
    pieces = list(zip(inputs.split(batch), targets.split(batch), strict=True))
    if full < len(ids) - 1:  # the shorter last window
        pieces.append((ids[full:-1][None], ids[full + 1:][None]))
    total = 0.0
    for x, y in pieces:
        logits = logits_of(x.to(device)).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
    return total / math.log(2) / n_bytes


# ------------------------------------------------------------------------------ the bare loop


class BareBlock(nn.Module):
    def __init__(self, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.out = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class BareGPT(nn.Module):
    """GPT-2's layout (Radford et al. 2019) as nanoGPT writes it, biases off; init N(0, 0.02),
    residual projections scaled by 1/sqrt(2 n_layer)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(BareBlock(n_head, n_embd) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def bare_run(cfg: PretrainConfig, project: dict[str, Any], seconds: float, device: torch.device,
             compile_model: bool) -> dict[str, Any]:
    """Train the bare GPT for ``seconds`` of wall time with the recipe's shape, batch and AdamW
    settings; score it on the held-out tokens."""
    meta = project["meta"]
    gpt = cfg.gpt_config(int(meta["vocab_size"]))
    torch.manual_seed(cfg.seed)
    model = BareGPT(gpt.vocab_size, gpt.block_size, gpt.n_layer, gpt.n_head, gpt.n_embd).to(device).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda" or None)
    forward = torch.compile(model) if compile_model else model
    data = project["train_tokens"]  # the whole training text, with the pipeline's val part when there is one
    generator = torch.Generator().manual_seed(cfg.seed)
    T, B = gpt.block_size, cfg.micro_batch_size
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    step, step_time, start = 0, 0.0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed + step_time > seconds:
            break
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            floor = cfg.lr * cfg.min_lr_ratio
            lr = floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(data) - T - 1, (B,), generator=generator).tolist()
        window = torch.from_numpy(np.stack([data[i:i + T + 1].astype(np.int64) for i in ix])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(window[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda" and step % 10:
            continue  # the clock is read after a sync every 10 steps on CUDA
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = (time.perf_counter() - start) / step
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    model.eval()
    return {**scores(model, project, T, device), "steps": step, "tokens": step * B * T, "seconds": train_seconds,
            "tokens_per_s": step * B * T / train_seconds, "parameters": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------ the pipeline


def recipe(params: Path, overrides: list[str], seconds: float, device: torch.device,
           compile_model: bool) -> PretrainConfig:
    """The ``pretrain`` section of ``params`` with ``overrides``, bounded by ``seconds`` of training.
    Evaluations only at the end and no samples unless ``overrides`` say otherwise."""
    quiet = ["eval_every=0", "eval_batches=4", "sample_tokens=0"]
    budget = [f"max_time={seconds}", "max_steps=1000000000", "checkpoint_every=0", "resume=false", "progress=false",
              "devices=1", "strategy=auto", f"accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
              f"compile={str(compile_model).lower()}"]
    sections = load_params(params, [f"pretrain.{o}" for o in (*quiet, *overrides, *budget)], sections=["pretrain"])
    return sections.pretrain


def resolved(cfg: PretrainConfig) -> dict[str, Any]:
    """What a recipe trains: its keys with the preset and model overrides resolved (an override
    null and one equal to the preset's value are the same recipe)."""
    return {**cfg.model_dump(exclude={"preset", "model"}), "model": cfg.gpt_config(vocab_size=2).to_dict()}


def pipeline_run(cfg: PretrainConfig, project: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train with the pretrain stage itself; score its exported model on the held-out tokens."""
    paths = project["paths"]
    started = time.perf_counter()
    summary = train(cfg, paths)
    seconds = time.perf_counter() - started
    model, _ = load_model(paths.models / "pretrain", device)
    return {**scores(lambda x: model(x)[0], project, model.config.block_size, device), "steps": summary["steps"], "tokens": summary["train_tokens"], "seconds": seconds,
            "tokens_per_s": summary["tokens_per_s"], "parameters": summary["parameters"],
            "export_step": summary.get("export_step", summary["steps"])}


# ------------------------------------------------------------------------------ main


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: a row per corpus and run, then each run's mean ratio to the bare loop."""
    lines = ["| corpus | run | parameters | steps (exported) | train tokens | tokens/s | training-text bpb | held-out bpb | vs bare |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios: dict[str, list[float]] = {}
    for corpus, runs in results.items():
        bare = runs["bare"]["bpb"]
        for name, row in runs.items():
            ratio = row["bpb"] / bare
            ratios.setdefault(name, []).append(ratio)
            steps = f"{row['steps']:,}" + (f" ({row['export_step']:,})" if row.get("export_step", row["steps"]) != row["steps"]
                                           else "")
            lines.append(f"| {corpus} | {name} | {row['parameters']:,} | {steps} | {row['tokens']:,} | "
                         f"{row['tokens_per_s']:,.0f} | {row['train_bpb']:.4f} | {row['bpb']:.4f} | {ratio:.3f} |")
    lines += ["", "| run | mean bpb ratio to bare (lower is better) |", "|---|---:|"]
    lines += [f"| {name} | {statistics.mean(values):.3f} |" for name, values in ratios.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, action="append", required=True,
                        help="A UTF-8 text file (repeat: at least two for the benchmark).")
    parser.add_argument("--seconds", type=float, default=120.0, help="Wall-clock training budget of every run.")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="Where the recipe (pretrain section) and the tokenizer settings come from.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Change a pretrain key of the recipe, e.g. --set lr=3e-3 --set model.n_layer=6.")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE...]",
                        help="Another row: the recipe with these pretrain keys changed (the bare loop keeps the "
                        "recipe's), e.g. --variant 'seq 256:model.block_size=256,micro_batch_size=8'. Two more "
                        "keys: vocab=N trains on a tokenizer of N pieces; bare makes the row a bare loop.")
    parser.add_argument("--vocab-size", type=int, default=4096, help="Tokenizer pieces (tokenizer.vocab_size).")
    parser.add_argument("--val-share", type=float, default=0.0,
                        help="Share of the training documents held back as the pipeline's val split, for rows that "
                        "select their weights on it (eval_every > 0); the bare loop trains on all of it.")
    parser.add_argument("--doc-bytes", type=int, default=2000, help="Documents end at a blank line after this.")
    parser.add_argument("--ablate", action="store_true", help="A row per recipe option, plus all winners.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides.")
    parser.add_argument("--cpu", action="store_true", help="Stay on CPU even when CUDA is available.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if len(args.corpus) < 2:
        print("note: one --corpus: a screening run; the benchmark judges a recipe on two texts or more", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    configured = recipe(args.params, args.overrides, args.seconds, device, args.compile)
    runs: dict[str, list[str]] = {"recipe": args.overrides}
    if args.ablate:
        off = [key for _, (_, without) in OPTIONS.items() for key in without]
        runs = {"base": [*args.overrides, *off]}
        runs.update({f"+{name}": [*runs["base"], *with_] for name, (with_, _) in OPTIONS.items()})
    for spec in args.variant:
        label, _, keys = spec.partition(":")
        if not label or not keys or label in runs:
            parser.error(f"--variant {spec!r}: expected a new LABEL:KEY=VALUE[,KEY=VALUE...]")
        runs[label] = [*args.overrides, *keys.split(",")]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="lmpipe-recipe-") as tmp:
        projects: dict[tuple[str, int], dict[str, Any]] = {}
        names = [corpus.stem if corpus.stem not in ("input", "valid", "train") else corpus.parent.name
                 for corpus in args.corpus]

        def project(index: int, vocab: int) -> dict[str, Any]:
            """The corpus's project at this many tokenizer pieces, prepared on first use."""
            key = (names[index], vocab)
            if key not in projects:
                projects[key] = made = prepare(args.corpus[index], Path(tmp) / f"corpus{index}-{vocab}", args.params,
                                               vocab, args.doc_bytes, args.val_share)
                print(f"{names[index]} ({vocab:,} pieces): {made['train_bytes']:,} train bytes, "
                      f"{made['test_bytes']:,} held-out bytes, {len(made['test_tokens']):,} held-out tokens", flush=True)
            return projects[key]

        def measure(label: str, overrides: list[str]) -> None:
            # Two keys of a row are not pretrain's: vocab=N (its own tokenizer) and bare (the bare loop).
            vocab = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("vocab=")), args.vocab_size)
            rest = [o for o in overrides if not o.startswith("vocab=") and o != "bare"]
            cfg = recipe(args.params, rest, args.seconds, device, args.compile)
            if cfg.eval_every and cfg.export_weights == "best" and not args.val_share and "bare" not in overrides:
                parser.error(f"{label}: eval_every {cfg.eval_every} with export_weights: best would pick weights "
                             "by the held-out text; hold a val split back with --val-share")
            for index, name in enumerate(names):
                made = project(index, vocab)
                if "bare" in overrides:
                    row = bare_run(cfg, made, args.seconds, device, args.compile)
                else:
                    row = pipeline_run(cfg, made, device)
                results.setdefault(name, {})[label] = row
                ratio = row["bpb"] / results[name]["bare"]["bpb"] if "bare" in results[name] else 1.0
                step = row.get("export_step", row["steps"])
                exported = f" (exported step {step:,})" if step != row["steps"] else ""
                print(f"{name} {label}: bpb {row['bpb']:.4f} ({ratio:.3f} of bare; training text "
                      f"{row['train_bpb']:.4f}), {row['steps']:,} steps"
                      f"{exported}, "
                      f"{row['parameters']:,} parameters, {row['tokens_per_s']:,.0f} tokens/s", flush=True)

        measure("bare", [*args.overrides, "bare"])
        for label, overrides in runs.items():
            measure(label, overrides)
        if args.ablate:
            def mean_ratio(label: str) -> float:
                return statistics.mean(r[label]["bpb"] / r["base"]["bpb"] for r in results.values())

            winners = [name for name in OPTIONS if mean_ratio(f"+{name}") < 1.0]
            print(f"winners over the base (mean held-out bpb lower): {', '.join(winners) or 'none'}", flush=True)
            if len(winners) > 1:
                measure("all winners", [*runs["base"], *(k for w in winners for k in OPTIONS[w][0])])
            if resolved(configured) != resolved(recipe(args.params, runs["base"], args.seconds, device, args.compile)):
                measure("recipe", args.overrides)
    bare_params = {name: runs_["bare"]["parameters"] for name, runs_ in results.items()}
    for name, runs_ in results.items():
        for label, row in runs_.items():
            if abs(row["parameters"] / bare_params[name] - 1) > 0.05:
                print(f"note: {name} {label} has {row['parameters']:,} parameters, the bare GPT "
                      f"{bare_params[name]:,} (more than 5% apart)")
    print()
    print(f"{args.seconds:g} s of training per run on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f" ({torch.get_num_threads()} CPU threads)")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
