"""Efficiency: parameters, size on disk, and generation speed (tokens/s, latency per token).

Generation is greedy decoding with the model's KV cache from a fixed random prompt, always for
exactly ``new_tokens`` tokens (no stop token), timed with the device synchronised. Models are
timed in interleaved rounds (every model once per round, ``repeats`` rounds, after ``warmup``
untimed ones) and the median is reported: on a shared machine load changes during a run, and
interleaving spreads it over all models instead of penalising whichever ran at a busy moment.

- batch 1: ``latency_ms_per_token`` (time per generated token, what a user waits) and tokens/s;
- batched: tokens/s over the batch (throughput).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmpipe.evaluate.config import SpeedSettings
from lmpipe.evaluate.lm import autocast_for
from lmpipe.model.gpt import GPT

log = logging.getLogger(__name__)


def size_on_disk(directory: Path) -> int:
    """Bytes of the weight files of a model directory (model.safetensors and a classifier head)."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors") if p.is_file())


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU with the torch thread count used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (no-op for None)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(model: GPT, prompt: torch.Tensor, new_tokens: int, device: torch.device, precision: str) -> float:
    """Seconds for one greedy generation of ``new_tokens`` tokens after ``prompt`` (B, P)."""
    with autocast_for(device, precision):
        _sync(device)
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0.0)
        _sync(device)
    return time.perf_counter() - start


def measure(models: dict[str, GPT], settings: SpeedSettings, device: torch.device,
            precision: str = "auto") -> dict[str, dict[str, float]]:
    """Generation speed of every model at every batch size: ``{name: {tokens_per_s_b<B>,
    latency_ms_per_token_b<B>, seconds_b<B>}}`` (medians over the timed rounds)."""
    if not models:
        return {}
    block = min(m.config.block_size for m in models.values())
    prompt_len = min(settings.prompt_tokens, block - 1)
    new_tokens = min(settings.new_tokens, block - prompt_len)  # stay inside the context: no window slides
    generator = torch.Generator().manual_seed(0)
    vocab = min(m.config.vocab_size for m in models.values())
    prompts = {b: torch.randint(vocab, (b, prompt_len), generator=generator).to(device) for b in settings.batch_sizes}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in settings.batch_sizes}
    with torch_threads(settings.threads):
        for round_no in range(settings.warmup + settings.repeats):
            for name, model in models.items():
                model.eval()
                for batch in settings.batch_sizes:
                    seconds = time_generation(model, prompts[batch], new_tokens, device, precision)
                    if round_no >= settings.warmup:
                        times[(name, batch)].append(seconds)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for (name, batch), values in times.items():
        seconds = statistics.median(values)
        out[name][f"tokens_per_s_b{batch}"] = batch * new_tokens / seconds
        out[name][f"latency_ms_per_token_b{batch}"] = 1000 * seconds / new_tokens
    for name, numbers in out.items():
        log.info("speed %s: %s", name, ", ".join(f"{k} {v:.1f}" for k, v in numbers.items()))
    return out


def speed_settings_used(settings: SpeedSettings, models: dict[str, GPT], device: torch.device) -> dict[str, Any]:
    """What the speed numbers were measured with, for the report and metrics."""
    block = min((m.config.block_size for m in models.values()), default=settings.prompt_tokens + 1)
    prompt_len = min(settings.prompt_tokens, block - 1)
    with torch_threads(settings.threads):
        name = device_name(device)
    return {"device": name, "prompt_tokens": prompt_len, "new_tokens": min(settings.new_tokens, block - prompt_len),
            "batch_sizes": list(settings.batch_sizes), "repeats": settings.repeats, "warmup": settings.warmup}
