"""Named model sizes, from a CPU-sized toy to GPT-2 shapes.

A preset fixes the architecture except the vocabulary, which comes from the tokenizer. The GPT-2
shapes follow Radford et al. 2019 (table 2) with this project's defaults (rotary positions, no
biases); pass ``pos_encoding="learned", bias=True`` for the original layout.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lmpipe.model.gpt import GPT, GPTConfig, estimate_flops_per_token

PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on a laptop CPU; the default of the embedded pipeline.
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    # A step up that still fits a CPU run of an hour.
    "mini": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    # GPT-2 small (124M with the GPT-2 vocabulary) and up.
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "block_size": 1024},
}


def preset_config(name: str, vocab_size: int, **overrides: Any) -> GPTConfig:
    """GPTConfig of a named preset with the given vocabulary; ``overrides`` replace any field
    (None values are ignored, so optional config keys can be passed straight through).

    Raises KeyError for an unknown preset (message lists the known ones), ValueError for an
    impossible combination (e.g. n_embd not divisible by n_head).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise KeyError(f"unknown model keys: {', '.join(bad)}")
    values = {**PRESETS[name], "vocab_size": vocab_size}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**values)


def describe(cfg: GPTConfig) -> dict[str, float]:
    """Parameter counts and training FLOPs per token of a config, without allocating weights."""
    import torch

    with torch.device("meta"):
        model = GPT(cfg)
    return {
        "parameters": float(model.num_parameters()),
        "non_embedding_parameters": float(model.num_parameters(non_embedding=True)),
        "flops_per_token": estimate_flops_per_token(cfg),
    }
