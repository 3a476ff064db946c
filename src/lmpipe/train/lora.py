"""LoRA (Hu et al. 2021) on the project's own model through ``peft``.

``peft.get_peft_model`` works on any ``nn.Module`` whose target layers are ``nn.Linear``: it
freezes every weight, wraps each targeted Linear with trainable low-rank matrices A (r x in) and B
(out x r, zero-initialised, so training starts from the pretrained function), and keeps the modules
in ``modules_to_save`` (a classification head) fully trainable. For export the update
(alpha / r) * B A is added into the base weights (``merge_and_unload``), giving a plain model of
the original architecture that loads with :func:`lmpipe.model.io.load_model` and runs at the
original speed. The adapter alone can be written too (``adapter/``, peft's file names).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save as save_safetensors
from torch import nn

from lmpipe.errors import ConfigError
from lmpipe.io import write_bytes, write_json
from lmpipe.train.finetune.config import LoraSettings

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last-name parts of the model's Linear layers (what ``target_modules`` matches)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, settings: LoraSettings, *, modules_to_save: Sequence[str] = (),
               where: str = "lora.target_modules") -> PeftModel:
    """Wrap ``model`` with LoRA adapters on ``settings.target_modules``; only the adapters (and
    ``modules_to_save``) stay trainable. Raises ConfigError when a target matches no Linear layer."""
    available = linear_names(model)
    unknown = [t for t in settings.target_modules if t not in available]
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} match(es) no Linear layer of the model "
                          f"(Linear layers: {', '.join(available)})")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none",
                        modules_to_save=list(modules_to_save) or None)
    return get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (shared tensors counted once)."""
    params = list(model.parameters())  # unique tensors
    return {"trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params)}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel (its Linear layers carry the adapters), else the model."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def merge(model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its base weights (in place; a non-peft
    model is returned as is). ``safe_merge`` refuses weights that became NaN/inf."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    return model


def save_adapter(model: PeftModel, directory: Path) -> list[Path]:
    """Write the adapter weights and config as peft names them (``adapter_model.safetensors``,
    ``adapter_config.json``), so ``PeftModel.from_pretrained(base, directory)`` can reload them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    weights = directory / "adapter_model.safetensors"
    write_bytes(weights, save_safetensors(state, metadata={"format": "pt"}))
    config: dict[str, Any] = model.peft_config["default"].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    write_json(directory / "adapter_config.json", config)
    return [weights, directory / "adapter_config.json"]
