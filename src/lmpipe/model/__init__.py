"""The GPT model in plain PyTorch: architecture, size presets, safetensors save/load, and the GPT
with a classification head."""

from lmpipe.model.classifier import (
    ClassificationModel,
    TokenClassificationModel,
    load_classifier,
    load_token_classifier,
)
from lmpipe.model.gpt import GPT, GPTConfig, KVCache, estimate_flops_per_token, sample_next
from lmpipe.model.io import load_model, read_model_config, save_model
from lmpipe.model.presets import PRESETS, describe, preset_config

__all__ = [
    "GPT",
    "ClassificationModel",
    "PRESETS",
    "GPTConfig",
    "KVCache",
    "TokenClassificationModel",
    "describe",
    "estimate_flops_per_token",
    "load_classifier",
    "load_model",
    "load_token_classifier",
    "preset_config",
    "read_model_config",
    "sample_next",
    "save_model",
]
