"""model.safetensors + config.json round trip, without pickle, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmpipe.errors import DataError
from lmpipe.model import GPT, GPTConfig, load_model, read_model_config, save_model


@pytest.mark.parametrize("variant", [{}, {"tie_weights": False, "pos_encoding": "learned", "bias": True},
                                     {"pos_encoding": "sinusoidal", "norm": "rmsnorm", "n_kv_head": 1}])
def test_round_trip_gives_identical_outputs(tmp_path: Path, variant: dict) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, **variant)).eval()
    save_model(model, tmp_path, extra={"tokenizer_fingerprint": "abc"})
    loaded, config = load_model(tmp_path)
    assert config["tokenizer_fingerprint"] == "abc"
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_weights
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_tied_head_is_stored_once(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    save_model(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)), tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "wte.weight" in stored and "lm_head.weight" not in stored
    assert not any("rope" in name for name in stored)  # derived tables are not weights


def test_missing_and_corrupt_files_raise_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no config.json"):
        load_model(tmp_path)
    save_model(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot read weights"):
        load_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_model(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)), tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(DataError, match="do not match config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DataError, match="model_type"):
        read_model_config(tmp_path)


def test_loading_refuses_a_model_of_another_tokenizer_before_reading_weights(tmp_path: Path) -> None:
    from lmpipe.errors import FingerprintMismatch
    from lmpipe.model.io import ExpectedTokenizer

    save_model(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)), tmp_path,
               extra={"tokenizer_fingerprint": "a" * 64})
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # never read: the check comes first
    with pytest.raises(FingerprintMismatch) as err:
        load_model(tmp_path, tokenizer=ExpectedTokenizer("b" * 64, "artifacts/tokenizer", "retrain it"))
    message = str(err.value)
    assert f"{tmp_path / 'config.json'}: the model was trained with tokenizer {'a' * 12}" in message
    assert f"artifacts/tokenizer holds tokenizer {'b' * 12}: retrain it" in message and "\n" not in message
    save_model(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)), tmp_path / "none")
    with pytest.raises(FingerprintMismatch, match="records no tokenizer fingerprint"):
        read_model_config(tmp_path / "none", ExpectedTokenizer("b" * 64, "artifacts/tokenizer"))
    assert read_model_config(tmp_path, ExpectedTokenizer("a" * 64, "x"))["tokenizer_fingerprint"] == "a" * 64
