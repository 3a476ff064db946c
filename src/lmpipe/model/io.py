"""Save and load a GPT as ``model.safetensors`` + ``config.json``.

safetensors holds raw tensors and a JSON header, so loading a model never runs pickle: a model
file from anywhere is safe to open. Tied weights are stored once (the LM head is the embedding)
and re-tied on load. ``config.json`` holds the GPTConfig under ``"model"`` plus whatever the
producing stage adds (tokenizer fingerprint, objective, training summary).

A masked-LM model (``pretrain.objective: mlm``, a bidirectional encoder) suits every use that
reads its hidden states (classification heads) but none that predicts tokens left to right
(generation, instruction tuning, next-token distillation, a causal-LM export): each such reader
calls :func:`refuse_masked_lm` on config.json before it reads data or weights.

Every reader of a model that a tokenizer feeds passes the tokenizer it will use
(:class:`ExpectedTokenizer`): the model's recorded fingerprint is checked here, once, before any
weight is read, so no stage can score, fine-tune, distil or serve a model with another tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lmpipe.errors import ConfigError, DataError, FingerprintMismatch
from lmpipe.io import write_bytes, write_json
from lmpipe.model.gpt import GPT, GPTConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "lmpipe-gpt"


@dataclass(frozen=True)
class ExpectedTokenizer:
    """The tokenizer a model will be used with: its fingerprint, what holds it (named in the
    error, e.g. ``artifacts/tokenizer`` or ``data/tokens/meta.json``) and what to do on a mismatch."""

    fingerprint: str
    source: str
    remedy: str = "re-run the stages that trained it with this tokenizer"


def check_tokenizer(config: dict[str, Any], directory: Path, expected: ExpectedTokenizer) -> None:
    """Refuse a model whose config.json records another tokenizer fingerprint, or none.

    Raises FingerprintMismatch with one line naming config.json, both fingerprints and the remedy.
    """
    recorded = config.get("tokenizer_fingerprint")
    if recorded == expected.fingerprint:
        return
    what = f"was trained with tokenizer {str(recorded)[:12]}" if recorded else "records no tokenizer fingerprint"
    raise FingerprintMismatch(
        f"{directory / CONFIG_NAME}: the model {what}, but {expected.source} holds tokenizer "
        f"{expected.fingerprint[:12]}: {expected.remedy}"
    )


def is_masked_lm(config: dict[str, Any]) -> bool:
    """Whether config.json (its ``model`` section) is a bidirectional, masked-LM model's."""
    model = config.get("model")
    return isinstance(model, dict) and bool(model.get("bidirectional"))


def refuse_masked_lm(config: dict[str, Any], directory: Path, key: str, use: str) -> None:
    """ConfigError (one line: the params key, the directory, why) when config.json is a masked
    LM's: ``use`` says what needs a causal one, e.g. "instruction tuning generates answers"."""
    if is_masked_lm(config):
        raise ConfigError(
            f"{key}: {directory} was pretrained as a masked LM (pretrain.objective: mlm), whose every token sees "
            f"the tokens after it, but {use} left to right: point it at a causal model (pretrain.objective: clm)"
        )


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """Contiguous CPU fp32-or-native tensors of the model, a tied LM head left out."""
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: GPT, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically).

    ``extra`` is merged into config.json next to ``"model"``. Returns the written paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    # One metadata key only: safetensors writes metadata in hash-map order, and the same weights
    # must give the same bytes (DVC and the manifest hash them).
    write_bytes(weights, save_safetensors(model_state(model), metadata={"format": "pt"}))
    config = {"model_type": MODEL_TYPE, "model": model.config.to_dict(), **(extra or {})}
    write_json(directory / CONFIG_NAME, config)
    return [weights, directory / CONFIG_NAME]


def read_model_config(directory: str | os.PathLike[str], tokenizer: ExpectedTokenizer | None = None) -> dict[str, Any]:
    """The parsed config.json of a model directory, checked against ``tokenizer`` when given.

    Raises DataError if missing or not a GPT's, FingerprintMismatch (see :func:`check_tokenizer`).
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise DataError("no config.json: not a model directory (run the stage that writes it)", path=str(directory))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err}", path=str(path)) from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE or "model" not in config:
        raise DataError(f"model_type is not {MODEL_TYPE!r} or 'model' is missing", path=str(path))
    if tokenizer is not None:
        check_tokenizer(config, Path(directory), tokenizer)
    return config


def load_model(directory: str | os.PathLike[str], device: str | torch.device = "cpu", *,
               tokenizer: ExpectedTokenizer | None = None) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the GPT saved in ``directory``; returns (model in eval mode, config.json contents).

    Raises DataError naming the file when config.json or the weights are missing, corrupt or do
    not match each other; FingerprintMismatch when ``tokenizer`` is given and the model was
    trained with another one (checked before the weights are read).
    """
    directory = Path(directory)
    config = read_model_config(directory, tokenizer)
    try:
        cfg = GPTConfig.from_dict(config["model"])
    except (TypeError, ValueError) as err:
        raise DataError(f"model: {err}", path=str(directory / CONFIG_NAME)) from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(f"no {WEIGHTS_NAME}", path=str(directory))
    try:
        state = load_safetensors(weights.read_bytes())
    except (SafetensorError, ValueError) as err:
        raise DataError(f"cannot read weights: {err}", path=str(weights)) from None
    with torch.device("meta"):
        model = GPT(cfg)
    if cfg.tie_weights and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise DataError(
            f"weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})",
            path=str(weights),
        )
    if cfg.tie_weights:  # assign=True replaced the parameters: tie them again
        model.lm_head.weight = model.wte.weight
    _rebuild_buffers(model)
    return model.to(device).eval(), config


def _rebuild_buffers(model: GPT) -> None:
    """Non-persistent buffers (rotary / sinusoidal tables) are derived from the config; after a
    meta-device build they must be computed for real."""
    from lmpipe.model.gpt import rotary_tables, sinusoidal_table

    cfg = model.config
    if cfg.pos_encoding == "rope":
        model.rope_cos, model.rope_sin = rotary_tables(cfg)
    elif cfg.pos_encoding == "sinusoidal":
        model.pos_table = sinusoidal_table(cfg.block_size, cfg.n_embd)
