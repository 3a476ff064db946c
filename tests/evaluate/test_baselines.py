"""Baselines next to the fine-tuned scores: prompt layout, continuation scoring, the tables in
metrics/evaluate.json and the report's plain verdict."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_eval_helpers import make_eval_project, save_gpt

from lmpipe.config import Paths
from lmpipe.evaluate import baselines
from lmpipe.evaluate.config import EvaluateConfig
from lmpipe.evaluate.report import baselines_part
from lmpipe.evaluate.run import run
from lmpipe.tokenizer.train import load_tokenizer
from lmpipe.train.finetune import classify


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, str]:
    return make_eval_project(tmp_path_factory.mktemp("baselines"))


def test_prompt_keeps_every_shot_that_fits_and_the_whole_query(project: tuple[Paths, str]) -> None:
    paths, _ = project
    sp, info = load_tokenizer(paths.tokenizer)
    shots = [("the movie was good and the plot was great", "positive"), ("awful acting and a dull story", "negative")]
    query = "the acting was superb"
    wide = baselines.PromptBuilder(sp, info.eos_id, "{text}\nSentiment:", "text", 256)
    context, used = wide.build(query, shots, 3)
    expected_end = [*sp.encode(query), *sp.encode("\nSentiment:")]
    assert used == 2 and context[0] == info.eos_id and context[-len(expected_end):] == expected_end
    assert context[1:1 + len(sp.encode(shots[0][0]))] == list(sp.encode(shots[0][0]))  # room: texts kept whole
    narrow = baselines.PromptBuilder(sp, info.eos_id, "{text}\nSentiment:", "text", 64)
    context, used = narrow.build(query, shots * 3, 3)
    assert 0 < used < 6 and len(context) + 3 <= 64  # cut texts, fewer shots, the continuation still fits
    assert context[-len(expected_end):] == expected_end
    assert narrow.build(query, [], 3) == ([info.eos_id, *expected_end], 0)


def test_continuation_nats_are_the_continuation_tokens_cross_entropy(project: tuple[Paths, str]) -> None:
    paths, fingerprint = project
    model = save_gpt(paths.root / "scratch", fingerprint, seed=7).eval()
    pairs = [([2, 5, 9, 11], [40, 41]), ([2, 7], [12, 13, 14]), ([2, 3, 4, 5, 6, 7, 8], [50])]
    got = baselines.continuation_nats(model, pairs, batch_size=2, device=torch.device("cpu"))
    for (context, continuation), nats in zip(pairs, got, strict=True):
        sequence = torch.tensor([[*context, *continuation]])
        with torch.no_grad():
            logits, _ = model(sequence[:, :-1])
        expected = F.cross_entropy(logits[0, len(context) - 1:], sequence[0, len(context):], reduction="sum")
        assert nats == pytest.approx(float(expected), rel=1e-5)  # padding and batching change nothing


def test_tables_name_every_method_the_report_says_who_loses_and_shows_lm_eval(project: tuple[Paths, str]) -> None:
    paths, _ = project
    cfg = EvaluateConfig.model_validate({
        "speed": {"enabled": False}, "sample_tokens": 0, "splits": ["val"], "baselines": {"shots": [0, 2]},
        "classification": {"cls": {"models": {"finetuned": "models/finetune/cls"}}},
        "instruction": {"sft": {"model": "models/finetune/sft", "max_examples": 4, "max_new_tokens": 2}},
        "lm_eval": {"enabled": True, "limit": 4, "batch_size": 8}})
    summary = run(cfg, paths)
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    table = metrics["baselines"]
    cls, sft = table["cls"], table["sft"]
    assert list(cls) == ["majority", "bag_of_words", "zero_shot", "few_shot_2", "finetuned"]
    assert list(sft) == ["zero_shot", "few_shot_2", "finetuned"]
    train = classify.read_labelled(cfg.classification["cls"].train_data, paths)
    test = classify.read_labelled(cfg.classification["cls"].data, paths)
    counts = Counter(t.label for t in train)
    majority = json.loads((paths.reports / "evaluation.json").read_text())["baselines"]["cls"]["rows"]["majority"]["label"]
    assert counts[majority] == max(counts.values())
    assert cls["majority"]["accuracy"] == pytest.approx(sum(t.label == majority for t in test) / len(test))
    assert cls["bag_of_words"]["accuracy"] >= 0.9  # the sentiment word decides the label in this data
    assert all(0 <= cls[m]["accuracy"] <= 1 for m in cls) and cls["few_shot_2"]["shots_used"] >= 0
    assert all(r["bpb"] > 0 and r["loss"] > 0 for r in sft.values()) and "exact_match" in sft["finetuned"]
    assert summary["cls.bag_of_words.accuracy"] == cls["bag_of_words"]["accuracy"]
    page = (paths.reports / "report.html").read_text()
    assert "Baselines: cls" in page and "Baselines: sft" in page
    assert "The fine-tuned model of cls loses to bag-of-words" in page  # a random-init head loses to it
    assert set(metrics["lm_eval"]) == {"lmpipe_cls", "lmpipe_perplexity_test"}  # evaluate.lm_eval runs it inside
    assert "lm-evaluation-harness: models/pretrain" in page and summary["lm_eval.lmpipe_cls.acc"] >= 0


def test_verdict_names_each_baseline_that_wins_or_says_none_does() -> None:
    rows = {"majority": {"accuracy": 0.5, "examples": 10}, "bag_of_words": {"accuracy": 0.83, "examples": 10},
            "tuned": {"accuracy": 0.77, "examples": 10}}
    for row in rows.values():
        row.update(macro_f1=0.5, macro_precision=0.5, macro_recall=0.5)
    table = {"type": "classification", "metric": "accuracy", "finetuned": ["tuned"], "rows": rows}
    table["loses_to"] = baselines.loses_to(table)
    assert table["loses_to"] == [["tuned", "bag_of_words"]]
    assert "The fine-tuned model tuned loses to bag-of-words (TF-IDF + logistic regression) (0.83" in \
        baselines_part("cls", table)
    rows["tuned"]["accuracy"] = 0.9
    table["loses_to"] = baselines.loses_to(table)
    assert table["loses_to"] == [] and "beats every baseline" in baselines_part("cls", table)
    answers = {"zero_shot": {"bpb": 2.0}, "finetuned": {"bpb": 2.5}}  # bits per byte: lower is better
    assert baselines.loses_to({"metric": "bpb", "finetuned": ["finetuned"], "rows": answers}) == [
        ["finetuned", "zero_shot"]]


@pytest.mark.parametrize("section", [
    {"classification": {"cls": {"models": {"m": "models/m"},
                                "data": {"type": "files", "paths": ["dev.tsv"]}}}},
    {"token_classification": {"ner": {"models": {"m": "models/m"},
                                      "data": {"type": "files", "paths": ["dev.conll"], "format": "conll"}}}},
    {"instruction": {"sft": {"model": "models/m", "data": {"type": "hf", "path": "tatsu-lab/alpaca"}}}},
])
def test_rows_from_outside_the_split_need_the_baselines_train_rows_named(section: dict) -> None:
    with pytest.raises(ValueError, match="train_data: set the baselines' labelled training rows"):
        EvaluateConfig.model_validate(section)
    task = next(iter(next(iter(section.values())).values()))
    task["train_data"] = {"type": "files", "paths": ["train.tsv"]}
    EvaluateConfig.model_validate(section)  # named: accepted
    del task["train_data"], task["data"]
    EvaluateConfig.model_validate(section)  # both from data/split: the defaults belong together
