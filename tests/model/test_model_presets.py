"""Size presets and their parameter / FLOP accounting."""

from __future__ import annotations

import pytest

from lmpipe.model import PRESETS, describe, preset_config


def test_gpt2_small_shape_has_gpt2_parameter_count() -> None:
    # GPT-2 small with its own layout (learned positions, biases, 50257 tokens) has 124,439,808
    # parameters (Radford et al. 2019; the Hugging Face checkpoint's count).
    cfg = preset_config("gpt2-small", 50257, pos_encoding="learned", bias=True)
    assert describe(cfg)["parameters"] == 124_439_808


def test_presets_grow_and_overrides_apply() -> None:
    sizes = [describe(preset_config(name, 8192))["parameters"] for name in PRESETS]
    assert sizes == sorted(sizes)
    tiny = preset_config("tiny", 8192, n_layer=2, dropout=None)
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.block_size, tiny.dropout) == (2, 128, 4, 128, 0.0)
    info = describe(tiny)
    assert info["flops_per_token"] > 6 * info["non_embedding_parameters"]


def test_unknown_preset_or_key_is_named() -> None:
    with pytest.raises(KeyError, match="known: tiny"):
        preset_config("huge", 100)
    with pytest.raises(KeyError, match="n_layers"):
        preset_config("tiny", 100, n_layers=3)
