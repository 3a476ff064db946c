"""LoRA: only adapters train, the merged export computes what the adapter model computes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from test_finetune_helpers import config, make_project

from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.model.classifier import ClassificationModel, load_classifier
from lmpipe.model.gpt import GPT, GPTConfig, optim_groups
from lmpipe.model.io import load_model
from lmpipe.train.finetune.config import LoraSettings
from lmpipe.train.finetune.stage import run_task
from lmpipe.train.lora import apply_lora, merge, parameter_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_lora_trains_only_adapters_and_merged_model_matches() -> None:
    model = tiny_gpt()
    base = {name: t.clone() for name, t in model.state_dict().items()}
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1))
    counts = parameter_counts(peft_model)
    # 2 layers x (c_attn 32->96, attn c_proj 32->32, c_fc 32->128, mlp c_proj 128->32), r=4
    assert counts["trainable_parameters"] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    # weight decay on: frozen weights must not even be in the optimizer, or decay would move them
    optimizer = torch.optim.AdamW(optim_groups(peft_model, 0.1), lr=1e-2)
    data = torch.randint(0, 64, (8, 17))
    peft_model.train()
    for _ in range(5):
        _, loss = peft_model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {name.replace("base_layer.", ""): t for name, t in model.state_dict().items() if "lora_" not in name}
    assert set(after) == set(base)
    for name, tensor in base.items():
        assert torch.equal(after[name], tensor), f"{name} changed"
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained

    peft_model.eval()
    probe = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        adapted = peft_model(probe)[0]
        merged = merge(peft_model)
        assert type(merged) is GPT
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(probe)[0], adapted, atol=1e-5, rtol=0)
        assert not torch.allclose(tiny_gpt()(probe)[0], adapted, atol=1e-4)  # the update is not nothing


def test_unknown_target_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"q_proj match\(es\) no Linear layer .*c_attn, c_fc, c_proj"):
        apply_lora(tiny_gpt(), LoraSettings(target_modules=["c_attn", "q_proj"]))


def test_stage_lora_export_matches_base_plus_adapter(tmp_path_factory: pytest.TempPathFactory) -> None:
    project: Paths = make_project(tmp_path_factory.mktemp("lora"), n_train=80, n_val=20, n_test=4)
    cfg = config(lora_cls={"type": "classification", "method": "lora", "lr": 1e-2, "max_steps": 8,
                           "test_data": None, "lora": {"r": 4, "dropout": 0.1}})
    summary = run_task(cfg, "lora_cls", project)
    assert summary["lora_cls/trainable_parameters"] < summary["lora_cls/total_parameters"] / 4
    out = project.models / "finetune" / "lora_cls"
    exported, labels, model_config = load_classifier(out)
    assert model_config["finetune"]["method"] == "lora" and labels == ["negative", "positive"]

    base, _ = load_model(project.models / "pretrain")
    base_state, exported_state = base.state_dict(), exported.backbone.state_dict()
    for name, tensor in base_state.items():
        merged_into = any(f".{target}.weight" in name for target in ("c_attn", "c_proj", "c_fc"))
        assert torch.equal(exported_state[name], tensor) != merged_into, name

    rebuilt = ClassificationModel(base, len(labels), "last", dropout=0.1)
    adapted = PeftModel.from_pretrained(rebuilt, str(out / "adapter")).eval()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    idx = torch.randint(4, 300, (4, 12))
    lengths = torch.tensor([12, 9, 5, 2])
    with torch.no_grad():
        torch.testing.assert_close(exported(idx, lengths), adapted(idx, lengths), atol=1e-5, rtol=0)
