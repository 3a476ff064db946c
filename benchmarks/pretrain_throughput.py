"""Pretrain throughput: the full ``pretrain`` stage against a bare PyTorch loop of the same model.

    python benchmarks/pretrain_throughput.py --preset tiny --batch-size 16 --steps 40 --repeats 3
    python benchmarks/pretrain_throughput.py ... --async-logging thread   # lmpipe's logging thread instead

Both sides train the same GPT (same config, init seed, AdamW groups, LR schedule, gradient
clipping, batches) on synthetic token shards. The pipeline side is ``lmpipe.train.pretrain.stage.train``
itself (Lightning Trainer, all stage callbacks, rich progress bar, MLflow logging to a temporary
SQLite store); the bare side is forward / backward / clip / step in a Python loop. Each repeat runs
bare then pipeline, so load from other processes hits both alike; the steady-state window skips
``--warmup`` steps (start-up, compilation) and the final step (validation, export). Reports
tokens/s, MFU (with --peak-flops, or a known GPU) and the median pipeline/bare ratio of the pairs; on
CPU also tokens per CPU-second of the process, which other processes' load disturbs far less
than wall time (use it on a shared machine; the two agree on an idle one).
On CUDA it trains in bf16 with flash attention; --compile applies torch.compile to both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lmpipe.config import Paths, TrackingConfig
from lmpipe.model.gpt import GPT, estimate_flops_per_token
from lmpipe.tracking import stage_run
from lmpipe.train.callbacks import ASYNC_BACKENDS, ASYNC_LOGGING_ENV
from lmpipe.train.data import TokenDataModule, open_token_split, write_synthetic_shards
from lmpipe.train.loop import PEAK_BF16_FLOPS
from lmpipe.train.module import build_optimizer, set_learning_rate
from lmpipe.train.pretrain.config import PretrainConfig


def mark(device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared machine the CPU time
    of the work is a steadier measure than wall time, which includes waiting for other processes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


class WindowTimer(Callback):
    """Wall and CPU time from the end of step ``first`` to the end of step ``last`` of the pipeline."""

    def __init__(self, first: int, last: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, last, device
        self.marks: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.stepped and trainer.global_step in (self.first, self.last):
            self.marks[trainer.global_step] = mark(self.device)

    @property
    def seconds(self) -> tuple[float, float]:
        (wall0, cpu0), (wall1, cpu1) = self.marks[self.first], self.marks[self.last]
        return wall1 - wall0, cpu1 - cpu0


def pipeline_run(cfg: PretrainConfig, root: Path, tokens: Path, device: torch.device, warmup: int,
                 steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds the stage took for steps warmup+1 .. warmup+steps."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "tokens").symlink_to(tokens)
    timer = WindowTimer(warmup, warmup + steps, device)
    from lmpipe.train.pretrain.stage import train

    with stage_run("pretrain", TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"), root):
        train(cfg, Paths(root), extra_callbacks=[timer])
    return timer.seconds


def bare_run(cfg: PretrainConfig, tokens: Path, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds a plain PyTorch loop takes for the same steps of the same model and data."""
    train_split, val_split = open_token_split(tokens, "train"), open_token_split(tokens, "val")
    gpt_cfg = cfg.gpt_config(int(train_split.meta["vocab_size"]))
    data = TokenDataModule(train_split, val_split, block_size=gpt_cfg.block_size, micro_batch_size=cfg.micro_batch_size,
                           accumulation=1, max_steps=cfg.max_steps, seed=cfg.seed, shuffle=True)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_cfg).to(device).train()
    optimizers = build_optimizer(model, cfg, device)
    forward = torch.compile(model) if cfg.compile else model
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    marks = {}
    for step, batch in enumerate(data.train_stream(0), start=1):
        x = batch["input"].to(device, non_blocking=True)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        set_learning_rate(optimizers, step - 1, cfg)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step in (warmup, warmup + steps):
            marks[step] = mark(device)
            if step == warmup + steps:
                break
    (wall0, cpu0), (wall1, cpu1) = marks[warmup], marks[warmup + steps]
    return wall1 - wall0, cpu1 - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per step.")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps before the window.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved bare/pipeline pairs.")
    parser.add_argument("--log-every", type=int, default=10, help="Pipeline log interval (steps).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides.")
    parser.add_argument("--cpu", action="store_true", help="Stay on CPU even when CUDA is available.")
    parser.add_argument("--peak-flops", type=float, default=None, help="Peak FLOP/s of the device, for MFU.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--async-logging", choices=ASYNC_BACKENDS, default="mlflow",
                        help="How the stage logs metrics without waiting: lmpipe's thread (default) or MLflow's "
                        "own asynchronous logging (LMPIPE_ASYNC_LOGGING).")
    parser.add_argument("--set", dest="model", action="append", default=[], metavar="KEY=VALUE",
                        help="Model override, e.g. --set n_layer=1 --set n_embd=16 (a near-empty model "
                        "isolates the per-step overhead of the pipeline).")
    args = parser.parse_args()
    os.environ[ASYNC_LOGGING_ENV] = args.async_logging
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.model)}
    cfg = PretrainConfig.model_validate({
        "preset": args.preset, "model": overrides, "micro_batch_size": args.batch_size, "max_steps": args.warmup + args.steps + 1,
        "warmup_steps": 2, "log_every": args.log_every, "eval_every": 0, "eval_batches": 2, "sample_every": 0,
        "sample_tokens": 16, "checkpoint_every": 0, "resume": False, "compile": args.compile,
        "accelerator": "gpu" if device.type == "cuda" else "cpu", "progress": True,
    })
    peak = args.peak_flops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for gpu, f in PEAK_BF16_FLOPS.items() if gpu in name), None)
    gpt_cfg = cfg.gpt_config(args.vocab_size)
    tokens_per_step = args.batch_size * gpt_cfg.block_size
    flops_per_token = estimate_flops_per_token(gpt_cfg)
    wall: dict[str, list[float]] = {"bare": [], "pipeline": []}
    cpu: dict[str, list[float]] = {"bare": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        tokens = Path(tmp) / "tokens"
        needed = (cfg.max_steps + 2) * tokens_per_step * 2
        write_synthetic_shards(tokens, vocab_size=args.vocab_size, train_tokens=needed,
                               val_tokens=4 * tokens_per_step, seed=0)
        for repeat in range(args.repeats):
            runs = {"bare": bare_run(cfg, tokens, device, args.warmup, args.steps),
                    "pipeline": pipeline_run(cfg, Path(tmp) / f"run{repeat}", tokens, device, args.warmup, args.steps)}
            for name, (wall_s, cpu_s) in runs.items():
                wall[name].append(args.steps * tokens_per_step / wall_s)
                cpu[name].append(args.steps * tokens_per_step / cpu_s)
            print(f"repeat {repeat}: tokens/s bare {wall['bare'][-1]:,.0f}, pipeline {wall['pipeline'][-1]:,.0f} "
                  f"(ratio {wall['pipeline'][-1] / wall['bare'][-1]:.3f}); tokens per CPU-second ratio "
                  f"{cpu['pipeline'][-1] / cpu['bare'][-1]:.3f}", flush=True)
    report: dict[str, Any] = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "block_size": gpt_cfg.block_size,
        "vocab_size": args.vocab_size, "steps": args.steps, "repeats": args.repeats, "compile": args.compile,
        "async_logging": args.async_logging,
        "flops_per_token": flops_per_token,
        "tokens_per_s": {k: statistics.median(v) for k, v in wall.items()},
        "tokens_per_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "pair_ratios": [p / b for p, b in zip(wall["pipeline"], wall["bare"], strict=True)],
        "pair_cpu_ratios": [p / b for p, b in zip(cpu["pipeline"], cpu["bare"], strict=True)],
    }
    # Each pair ran back to back, so its ratio sees the same machine load; the median over pairs
    # is the estimate (the ratio of the two medians mixes pairs taken under different loads).
    report["ratio"] = statistics.median(report["pair_ratios"])
    report["cpu_ratio"] = statistics.median(report["pair_cpu_ratios"])
    report["overhead_cpu_ms_per_step"] = statistics.median(
        1000 * tokens_per_step * (1 / p - 1 / b) for p, b in zip(cpu["pipeline"], cpu["bare"], strict=True))
    for name, rate in report["tokens_per_s"].items():
        mfu = f", MFU {flops_per_token * rate / peak:.1%}" if peak else ""
        print(f"{name:>8}: {rate:,.0f} tokens/s (median), {flops_per_token * rate / 1e9:.2f} GFLOP/s{mfu}")
    print(f"pipeline / bare tokens/s = {report['ratio']:.3f} (median of {args.repeats} back-to-back pairs: "
          f"{', '.join(f'{r:.3f}' for r in report['pair_ratios'])})")
    if device.type == "cpu":
        print(f"pipeline / bare tokens per CPU-second = {report['cpu_ratio']:.3f} (pairs: "
              f"{', '.join(f'{r:.3f}' for r in report['pair_cpu_ratios'])}); pipeline overhead "
              f"{report['overhead_cpu_ms_per_step']:.2f} CPU-ms per step")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
