"""``transformers`` export: each exact mapping loads offline with transformers and reproduces the
lmpipe model's logits (and greedy generations); other architectures are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmpipe.config import Paths
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import load_model
from lmpipe.registry import export_hf
from lmpipe.registry.export_hf import ExportError, architecture, run_export

VARIANTS = [
    ({}, "GPTNeoXForCausalLM"),
    ({"bias": True, "n_kv_head": 1, "tie_weights": False}, "GPTNeoXForCausalLM"),
    ({"norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1}, "LlamaForCausalLM"),
    ({"norm": "rmsnorm", "mlp": "swiglu", "bias": True, "tie_weights": False, "rope_theta": 500.0}, "LlamaForCausalLM"),
    ({"pos_encoding": "learned", "bias": True}, "GPT2LMHeadModel"),
    ({"pos_encoding": "learned", "n_kv_head": 1, "tie_weights": False}, "GPT2LMHeadModel"),
]


def save_sharp(paths: Paths, models: Any, **overrides: Any) -> GPT:
    """A tiny model with weights scaled up from GPT-2's init, so logits are large and any
    mapping error (a rotary convention, a transposed matrix) shows far above fp32 noise."""
    model = models.pretrain(paths, seed=11, val_bpb=1.0, n_head=4, n_embd=64, **overrides)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(6.0)
    from lmpipe.model.io import save_model

    config = json.loads((paths.models / "pretrain" / "config.json").read_text())
    save_model(model, paths.models / "pretrain", extra={k: v for k, v in config.items() if k not in ("model", "model_type")})
    return model


@pytest.mark.parametrize(("overrides", "expected"), VARIANTS, ids=[v[1] + str(i) for i, v in enumerate(VARIANTS)])
def test_export_loads_in_transformers_with_matching_logits(project: Paths, models: Any, overrides: dict[str, Any],
                                                           expected: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_sharp(project, models, **overrides)
    result = run_export(project)
    out = project.root / "artifacts" / "hf" / "pretrain"
    assert result["architecture"] == expected and Path(result["out_dir"]) == out
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected]
    model, _ = load_model(project.models / "pretrain")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == expected
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the quiet river\nlaughed 2024 times"
    from lmpipe.tokenizer.train import load_tokenizer

    sp, _ = load_tokenizer(project.tokenizer)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(sp.encode(text))


def test_transformers_generate_matches_lmpipe_greedy_decoding(project: Paths, models: Any) -> None:
    from transformers import AutoModelForCausalLM

    save_sharp(project, models, norm="rmsnorm", mlp="swiglu", n_kv_head=2)
    run_export(project, out="exported")
    model, _ = load_model(project.models / "pretrain")
    hf = AutoModelForCausalLM.from_pretrained(project.root / "exported", local_files_only=True, dtype=torch.float32)
    prompt = torch.tensor([[2, 10, 11, 12]])
    ours = model.generate(prompt, 12, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         attention_mask=torch.ones_like(prompt))
    assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize("overrides", [
    {"pos_encoding": "sinusoidal"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"bidirectional": True},
    {"qk_norm": True}, {"embed_scale": True}, {"mlp": "relu2"},
])
def test_architectures_without_an_exact_mapping_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ExportError, match="no exact transformers|bidirectional"):
        architecture(GPTConfig(vocab_size=64, **overrides))


def test_a_wrong_mapping_is_caught_and_leaves_no_output(project: Paths, models: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporting Q/K in the interleaved rotary convention (the classic Llama conversion bug) must
    fail verification, and the half-written export must not appear."""
    save_sharp(project, models, norm="rmsnorm", mlp="swiglu")
    convert = export_hf.convert

    def interleaved(cfg: GPTConfig, state: dict[str, torch.Tensor], special: dict[str, int]) -> Any:
        hf_config, tensors = convert(cfg, state, special)
        half = cfg.head_dim // 2
        order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
        for name in [n for n in tensors if n.endswith("q_proj.weight")]:
            w = tensors[name].reshape(cfg.n_head, cfg.head_dim, -1)
            tensors[name] = w[:, order].reshape(cfg.n_head * cfg.head_dim, -1)
        return hf_config, tensors

    monkeypatch.setattr(export_hf, "convert", interleaved)
    with pytest.raises(ExportError, match="logits differ"):
        run_export(project)
    assert not (project.root / "artifacts" / "hf" / "pretrain").exists()
    assert not [p for p in (project.root / "artifacts" / "hf").iterdir()], "no temporary directory left behind"


def test_export_refuses_a_model_from_another_tokenizer(project: Paths, models: Any) -> None:
    from lmpipe.errors import FingerprintMismatch

    models.pretrain(project, seed=0, val_bpb=1.0)
    path = project.models / "pretrain" / "config.json"
    config = json.loads(path.read_text())
    config["tokenizer_fingerprint"] = "f" * 64
    path.write_text(json.dumps(config))
    with pytest.raises(FingerprintMismatch):
        run_export(project)
