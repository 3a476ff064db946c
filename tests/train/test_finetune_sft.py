"""Instruction tuning: prompt masking, data sources, the stage's outputs and MLflow logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_finetune_helpers import config, make_project, save_random_model

from lmpipe.config import Paths, TrackingConfig
from lmpipe.errors import DataError, FingerprintMismatch
from lmpipe.io import verify_manifest
from lmpipe.model.gpt import IGNORE_INDEX
from lmpipe.model.io import load_model
from lmpipe.tokenizer.train import load_tokenizer
from lmpipe.tracking import stage_run
from lmpipe.train.finetune import sft
from lmpipe.train.finetune.config import FilesData, HFData
from lmpipe.train.finetune.stage import run_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return make_project(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def template(project: Paths) -> sft.ChatTemplate:
    return sft.ChatTemplate.from_tokenizer(*load_tokenizer(project.tokenizer))


CONVERSATION = [sft.Message("system", "Be brief."), sft.Message("user", "Opposite? hot"),
                sft.Message("assistant", "cold."), sft.Message("user", "And big?"), sft.Message("assistant", "small.")]


def test_only_assistant_tokens_are_targets(template: sft.ChatTemplate) -> None:
    [example], counts = sft.build_examples([CONVERSATION], template, max_length=64)
    ids, targets = example.ids, example.targets
    assert counts == {"truncated": 0, "dropped": 0}
    # Independent reading of the layout: tokens after <|assistant|> up to and including <|end|>.
    expected = np.full(len(ids) - 1, IGNORE_INDEX)
    inside = False
    for pos in range(1, len(ids)):
        if inside or ids[pos - 1] == template.role_ids["assistant"]:
            expected[pos - 1] = ids[pos]
            inside = ids[pos] != template.end_id
    np.testing.assert_array_equal(targets, expected)
    assert ids[0] == template.eos_id  # starts like every pretraining document
    trained = [int(t) for t in targets if t != IGNORE_INDEX]
    assert template.decode(trained) == "cold.<|end|>small.<|end|>"
    # (the leading EOS is a control piece: it decodes to nothing)
    assert template.decode([int(t) for t in ids]).startswith("<|system|>Be brief.<|end|><|user|>Opposite? hot<|end|>")


def test_prompt_logits_do_not_change_the_loss(project: Paths, template: sft.ChatTemplate) -> None:
    [example], _ = sft.build_examples([CONVERSATION], template, max_length=64)
    model, _ = load_model(project.models / "pretrain")
    inputs = torch.from_numpy(example.inputs)[None]
    targets = torch.from_numpy(example.targets)[None]
    logits, model_loss = model(inputs, targets)
    logits = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, model_loss)
    prompt = targets[0] == IGNORE_INDEX
    assert prompt.sum() > 10 and (~prompt).sum() > 4
    perturbed = logits.detach().clone()
    perturbed[0, prompt] += 50 * torch.randn_like(perturbed[0, prompt])
    same = F.cross_entropy(perturbed.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.equal(same, loss.detach())
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[0, prompt]) == 0
    assert torch.count_nonzero(logits.grad[0, ~prompt]) > 0


def test_batches_are_right_padded_with_ignored_targets(template: sft.ChatTemplate) -> None:
    short = [sft.Message("user", "Hi"), sft.Message("assistant", "ok.")]
    examples, _ = sft.build_examples([CONVERSATION, short], template, max_length=64)
    batch = sft.collate(examples, pad_id=3)
    n = int(batch["length"][1])
    assert (batch["input"][1, n:] == 3).all() and (batch["target"][1, n:] == IGNORE_INDEX).all()
    assert batch["input"].shape == batch["target"].shape == (2, int(batch["length"].max()))


def test_conversations_longer_than_max_length_are_cut_or_dropped(template: sft.ChatTemplate) -> None:
    first_answer = len(template.prompt(CONVERSATION[:2]))  # position of the first answer token
    long_prompt = [sft.Message("user", "word " * 80), sft.Message("assistant", "ok.")]
    examples, counts = sft.build_examples([CONVERSATION, long_prompt], template, max_length=first_answer + 1)
    assert counts == {"truncated": 2, "dropped": 1}
    [kept] = examples
    full = template.render(CONVERSATION)[0]
    assert len(kept.inputs) == first_answer + 1  # cut on the right: the prompt stays whole
    np.testing.assert_array_equal(kept.targets[kept.targets != IGNORE_INDEX], full[first_answer:first_answer + 2])


def test_rows_from_jsonl_json_and_hf(project: Paths, tmp_path: Path) -> None:
    rows = [{"instruction": "Opposite?", "input": "hot", "output": "cold."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"prompt": "Opposite?", "response": "wet."}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows[2:]))
    paths = Paths(tmp_path)
    got = sft.read_conversations(FilesData(type="files", paths=["a.jsonl"]), paths, system_prompt="Be kind.")
    assert got[0] == [sft.Message("system", "Be kind."), sft.Message("user", "Opposite?\n\nhot"),
                      sft.Message("assistant", "cold.")]
    assert got[1][1:] == [sft.Message("user", "Hi"), sft.Message("assistant", "Hello.")]
    renamed = FilesData(type="files", paths=["b.json"], columns={"instruction": "prompt", "output": "response"})
    assert sft.read_conversations(renamed, paths) == [[sft.Message("user", "Opposite?"), sft.Message("assistant", "wet.")]]
    hf = HFData(type="hf", path="json", data_files="a.jsonl", max_examples=1)
    assert sft.read_conversations(hf, paths) == [got[0][1:]]


@pytest.mark.parametrize(("line", "message"), [
    ('{"instruction": "Opposite?", "output": ""}', r"a\.jsonl:2: column 'output' is empty"),
    ('{"instruction": "Opposite?"}', r"a\.jsonl:2: missing column 'output'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"a\.jsonl:2: messages\[0\]: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"a\.jsonl:2: messages has no assistant turn"),
    ("not json", r"a\.jsonl:2: not valid JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"instruction": "Opposite?", "input": "hot", "output": "cold."}'
    (tmp_path / "a.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(DataError, match=message):
        sft.read_conversations(FilesData(type="files", paths=["a.jsonl"]), Paths(tmp_path))


def test_answer_loss_falls_and_outputs_are_complete(project: Paths) -> None:
    cfg = config(sft_full={"type": "sft", "method": "full", "lr": 3e-3, "max_steps": 30, "eval_every": 10})
    with stage_run("finetune", TrackingConfig(experiment="finetune-tests"), project.root) as tracker:
        summary = run_task(cfg, "sft_full", project)
    assert summary["sft_full/dev_loss"] < 0.75 * summary["sft_full/dev_loss_initial"]
    metrics = json.loads((project.metrics / "finetune_sft_full.json").read_text())
    assert metrics["dev_loss"] == pytest.approx(summary["sft_full/dev_loss"])
    sample = metrics["sample"]
    assert sample["prompt"].startswith("user: Opposite?") and isinstance(sample["generated"], str)
    out = project.models / "finetune" / "sft_full"
    verify_manifest(out)
    model, model_config = load_model(out)
    info = load_tokenizer(project.tokenizer)[1]
    assert model_config["tokenizer_fingerprint"] == info.fingerprint
    assert model_config["chat_template"]["end_id"] == info.special_tokens["<|end|>"]
    assert model_config["finetune"]["type"] == "sft"
    assert (project.plots / "finetune" / "sft_full" / "dev.csv").read_text().startswith("step,loss,perplexity")

    client = mlflow.MlflowClient()
    history = client.get_metric_history(tracker.run_id, "sft_full/dev/loss")
    assert [m.step for m in history] == [0, 10, 20, 30]
    table = mlflow.load_table("sft_full/samples.json", run_ids=[tracker.run_id])  # an MLflow table, not text
    assert list(table.columns[:3]) == ["prompt", "reference", "generated"]
    assert table["generated"].iloc[0] == sample["generated"]
    logged = {a.path for a in client.list_artifacts(tracker.run_id, "sft_full/model")}
    assert "sft_full/model/model.safetensors" in logged


def test_model_from_another_tokenizer_is_refused(project: Paths) -> None:
    save_random_model(project.models / "other", vocab_size=370, fingerprint="f" * 64)
    cfg = config(other={"type": "sft", "init": "models/other"})
    with pytest.raises(FingerprintMismatch, match="trained with tokenizer ffffffffffff"):
        run_task(cfg, "other", project)
    shutil.rmtree(project.models / "other")
