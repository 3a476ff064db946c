"""A tiny Chinese (and some English) corpus through clean, split, tokenizer, tokenize, pretrain,
instruction tuning and evaluate, each stage function as the CLI calls it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmpipe.config import Paths
from lmpipe.data import clean, split, synthetic_zh
from lmpipe.data.config import CleanConfig, SplitConfig
from lmpipe.data.gate import record_validation
from lmpipe.data.shards import ShardWriter, doc_id, make_table
from lmpipe.data.synthetic import generate
from lmpipe.evaluate import run as evaluate
from lmpipe.evaluate.config import EvaluateConfig
from lmpipe.tokenizer import shards as tokenize
from lmpipe.tokenizer import train as tokenizer
from lmpipe.tokenizer.config import TokenizeConfig, TokenizerConfig
from lmpipe.train.finetune import stage as finetune
from lmpipe.train.finetune.config import FinetuneConfig
from lmpipe.train.pretrain import stage as pretrain
from lmpipe.train.pretrain.config import PretrainConfig

pytestmark = pytest.mark.slow


def raw_corpus(paths: Paths) -> None:
    """Chinese stories, reviews and instructions with their noise, and a few English documents."""
    records = list(generate(40, noise_fraction=0.1, seed=3, zh_fraction=6.0))
    rng = random.Random(4)
    records += [synthetic_zh.instruction(rng) for _ in range(60)]
    writer = ShardWriter(paths.raw, 1000)
    texts = [t for t, _ in records]
    writer.write(make_table([doc_id(t) for t in texts], texts, ["synthetic"] * len(texts),
                            [json.dumps(m, ensure_ascii=False) for _, m in records]))
    writer.close()


def test_chinese_corpus_from_clean_to_evaluate(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    raw_corpus(paths)
    summary = clean.run(CleanConfig.model_validate({"language": {"keep": ["zh", "en"]}, "workers": 1}), paths)
    report = json.loads((paths.clean / "clean_report.json").read_text())
    assert report["by_language"]["zh"]["output"] > 250 and report["by_language"]["en"]["output"] > 30
    assert summary["removed.exact_dedup"] > 0
    record_validation(paths, True, {})  # the validate stage and its gate have their own tests
    split.run(SplitConfig(val_fraction=0.1, test_fraction=0.1, decontaminate_train=False), paths)

    tokenizer.run(TokenizerConfig(vocab_size=1024, num_threads=1), paths)
    tok_report = json.loads((paths.tokenizer / "report.json").read_text())
    assert tok_report["unk_rate"] == 0.0 and set(tok_report["by_language"]) == {"en", "zh"}
    assert tok_report["by_language"]["zh"]["tokens_per_char"] > 0
    tokenize.run(TokenizeConfig(workers=1), paths)

    model = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 128}
    pretrain.run(PretrainConfig.model_validate({
        "model": model, "max_steps": 30, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 5, "eval_every": 30,
        "checkpoint_every": 30, "eval_batches": 2, "sample_tokens": 0, "progress": False}), paths)
    finetune.run(FinetuneConfig.model_validate({"tasks": {"sft": {
        "type": "sft", "method": "full", "max_steps": 10, "eval_every": 10, "micro_batch_size": 8, "warmup_steps": 2,
        "train_data": {"type": "split", "split": "train", "kind": "instruction"},
        "dev_data": {"type": "split", "split": "val", "kind": "instruction"}, "sample_data": None}}}), paths)

    evaluate.run(EvaluateConfig.model_validate({
        "models": {"teacher": "models/pretrain"}, "compare": {"teacher": "teacher", "students": []},
        "classification": {}, "speed": {"enabled": False}, "prompts": ["从前，在"], "sample_tokens": 8,
        "instruction": {"sft": {"model": "models/finetune/sft", "max_examples": 6, "max_new_tokens": 24,
                                "data": {"type": "split", "split": "test", "kind": "instruction"}}}}), paths)
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    teacher = metrics["teacher"]
    for data in ("val", "test"):
        by_language = teacher[data]["by_language"]
        assert set(by_language) == {"en", "zh"} and all(part["bpb"] > 0 for part in by_language.values())
    details = json.loads((paths.reports / "evaluation.json").read_text())
    sft = details["instruction"]["sft"]
    assert "tok:zh" in sft["bleu_signature"] and 0 <= metrics["sft"]["rouge_l"] <= 1
    assert any(any("\u4e00" <= c <= "\u9fff" for c in s["reference"]) for s in sft["samples"])
    if "by_language" in sft:  # English instructions among the test prompts too
        assert "tok:zh" in sft["by_language"]["zh"]["bleu_signature"]
        assert "tok:13a" in sft["by_language"]["other"]["bleu_signature"]
    page = (paths.reports / "report.html").read_text()
    assert "val (zh)" in page and "tok:zh" in page
