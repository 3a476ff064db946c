"""Token classification: CoNLL and jsonl reading with path:line errors, word-to-piece alignment,
entity counts that match seqeval, a tagger that learns an easy tagging, and the registered
pyfunc's spans."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from test_finetune_helpers import config, save_random_model
from torch import nn

from lmpipe.config import Paths
from lmpipe.data.shards import ShardWriter, doc_id
from lmpipe.errors import DataError
from lmpipe.evaluate import tasks as eval_tasks
from lmpipe.evaluate.config import TokenClassificationEval
from lmpipe.evaluate.report import tasks_section
from lmpipe.model.classifier import load_classifier, load_token_classifier
from lmpipe.registry import register
from lmpipe.registry.config import RegisterConfig
from lmpipe.tokenizer import train as tokenizer_stage
from lmpipe.tokenizer.config import TokenizerConfig
from lmpipe.tokenizer.train import load_tokenizer
from lmpipe.train.finetune import tagging
from lmpipe.train.finetune.config import FilesData
from lmpipe.train.finetune.stage import run_task

pytestmark = pytest.mark.usefixtures("one_thread")

FIRST = ["Mara", "Tobin", "Lina", "Oskar", "Priya", "Felix"]
LAST = ["Novak", "Berger", "Silva", "Okafor"]
CITIES = ["Oslo", "Lima", "Hanoi", "Accra", "Vienna"]
FILLER = ["the", "report", "said", "that", "people", "went", "to", "see", "a", "new", "show", "in", "and", ","]

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def files(name: str, fmt: str = "auto") -> FilesData:
    return FilesData(type="files", paths=[name], format=fmt)  # type: ignore[arg-type]


def write(root: Path, name: str, text: str) -> Paths:
    (root / name).write_text(text, encoding="utf-8")
    return Paths(root)


def test_conll_sentences_skip_docstart_and_keep_the_last_column(tmp_path: Path) -> None:
    paths = write(tmp_path, "train.txt", CONLL)
    sentences = tagging.read_tagged(files("train.txt", "conll"), paths)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert tagging.resolve_tags(sentences, None) == ["B-MISC", "B-ORG", "B-PER", "I-PER", "O"]


@pytest.mark.parametrize(("text", "strict", "message"), [
    (CONLL.replace("call NN I-NP O", "call"), True, r"train\.txt:6: expected a token and its tag"),
    (CONLL.replace("B-MISC", "MISC"), True, r"train\.txt:5: tag 'MISC' is outside the IOB2 scheme"),
    (CONLL.replace("B-NP B-PER", "B-NP I-PER"), True, r"train\.txt:8: tag 'I-PER' follows 'O': in IOB2"),
    (CONLL.replace("I-NP I-PER", "I-NP I-LOC"), True, r"train\.txt:9: tag 'I-LOC' follows 'B-PER'"),
    ("-DOCSTART- -X- O\n\n", True, r"train\.txt: no sentences in this CoNLL file"),
])
def test_bad_conll_input_names_the_line(tmp_path: Path, text: str, strict: bool, message: str) -> None:
    paths = write(tmp_path, "train.txt", text)
    with pytest.raises(DataError, match=message):
        tagging.read_tagged(files("train.txt", "conll"), paths, strict)


def test_lenient_mode_reads_i_after_o_as_an_entity(tmp_path: Path) -> None:
    paths = write(tmp_path, "train.txt", CONLL.replace("B-NP B-PER", "B-NP I-PER"))
    sentences = tagging.read_tagged(files("train.txt", "conll"), paths, strict=False)
    assert tagging.entities(sentences[1].tags) == {("PER", 0, 1)}


@pytest.mark.parametrize(("line", "message"), [
    ('{"tokens": ["Mara", "went", "home"], "tags": ["B-PER", "O"]}', r"a\.jsonl:2: 3 tokens but 2 tags"),
    ('{"tokens": ["Mara"], "tags": "B-PER"}', r"a\.jsonl:2: column 'tags' must be a non-empty list, got str"),
    ('{"tokens": ["Mara"], "tags": [3]}', r"a\.jsonl:2: column 'tags': item 1 must be non-empty text, got 3"),
    ('{"tokens": ["Mara", "Oslo"], "tags": ["B-PER", "B-PLACE_"]}', None),
    ('{"words": ["Mara"], "tags": ["B-PER"]}', r"a\.jsonl:2: missing column 'tokens' \(columns: words, tags\)"),
    ('{"tokens": ["in", "Oslo"], "tags": ["O", "LOC"]}',
     r"a\.jsonl:2: token 2 \('Oslo'\): tag 'LOC' is outside the IOB2 scheme"),
])
def test_bad_jsonl_rows_name_the_line(tmp_path: Path, line: str, message: str | None) -> None:
    paths = write(tmp_path, "a.jsonl", '{"tokens": ["Lina", "ran"], "tags": ["B-PER", "O"]}\n' + line + "\n")
    if message is None:  # a well-formed row whose tag the label set lacks fails when it is encoded
        items = tagging.read_tagged(files("a.jsonl"), paths)
        with pytest.raises(DataError, match=r"a\.jsonl:2: token 2 \('Oslo'\): tag 'B-PLACE_' is not in the label"):
            tagging.build_examples(items, ["B-PER", "O"], tagging.WordEncoder(_StubPieces(), 2, 16))
        return
    with pytest.raises(DataError, match=message):
        tagging.read_tagged(files("a.jsonl"), paths)


class _StubPieces:
    """Two pieces per word (a stand-in for sentencepiece in the alignment arithmetic)."""

    def encode(self, word: str) -> list[int]:
        return [10 + len(word), 5]

    def unk_id(self) -> int:
        return 0


def test_one_piece_of_each_word_carries_its_tag_and_long_rows_are_windowed(tmp_path: Path) -> None:
    paths = write(tmp_path, "a.jsonl", '{"tokens": ["Mara", "saw", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}\n')
    items = tagging.read_tagged(files("a.jsonl"), paths)
    labels = ["B-LOC", "B-PER", "O"]
    (full,) = tagging.build_examples(items, labels, tagging.WordEncoder(_StubPieces(), 2, 16))
    assert full.ids.tolist() == [2, 14, 5, 13, 5, 14, 5]
    assert full.target.tolist() == [-100, 1, -100, 2, -100, 0, -100]
    (last,) = tagging.build_examples(items, labels, tagging.WordEncoder(_StubPieces(), 2, 16, "last"))
    assert last.ids.tolist() == full.ids.tolist() and last.target.tolist() == [-100, -100, 1, -100, 2, -100, 0]
    # too long for one window of 5: split between words, each window starting with the EOS
    windows = tagging.build_examples(items, labels, tagging.WordEncoder(_StubPieces(), 2, 5, "last"))
    assert [w.ids.tolist() for w in windows] == [[2, 14, 5, 13, 5], [2, 14, 5]]
    assert [w.target.tolist() for w in windows] == [[-100, -100, 1, -100, 2], [-100, -100, 0]]
    assert [(w.item, w.words) for w in windows] == [(0, 2), (0, 1)]
    # a word longer than a window alone keeps the pieces that fit
    tiny = tagging.build_examples(items, labels, tagging.WordEncoder(_StubPieces(), 2, 2))
    assert [w.ids.tolist() for w in tiny] == [[2, 14], [2, 13], [2, 14]]
    assert tagging.label_piece(bidirectional=False) == "last" and tagging.label_piece(bidirectional=True) == "first"


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, idx: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits


def test_dev_entity_counts_match_seqeval() -> None:
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER", "O", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["O", "I-PER", "O", "B-LOC"]]
    index = {t: i for i, t in enumerate(labels)}
    logits = torch.full((2, 5, 4), -5.0)
    target = torch.full((2, 5), -100)
    for row, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        for word, (gt, pt) in enumerate(zip(g, p, strict=True)):
            logits[row, word + 1, index[pt]] = 5.0
            target[row, word + 1] = index[gt]
    objective = tagging.TokenClassificationObjective(labels)
    sums = objective.eval_sums(_FixedLogits(logits), {"input": torch.zeros(2, 5, dtype=torch.long), "target": target,
                                                        "length": torch.tensor([5, 5])})
    ours = objective.metrics(sums)
    reference = tagging.entity_scores(gold, predicted)
    for key in ("precision", "recall", "f1", "token_accuracy"):
        assert ours[key] == pytest.approx(reference["overall"][key]), key
    assert reference["overall"]["f1"] == pytest.approx(4 / 7)  # 2 of 4 predicted entities right, 2 of 3 found
    assert reference["per_entity"]["LOC"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                              "support": 1}


def sentence(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """An easy tagging: names, surnames and cities are words of their own lists."""
    tokens: list[str] = []
    tags: list[str] = []
    for _ in range(rng.randint(2, 3)):
        tokens += rng.sample(FILLER, rng.randint(1, 3))
        tags += ["O"] * (len(tokens) - len(tags))
        if rng.random() < 0.6:
            person = [rng.choice(FIRST), *([rng.choice(LAST)] if rng.random() < 0.5 else [])]
            tokens += person
            tags += ["B-PER", *["I-PER"] * (len(person) - 1)]
        else:
            tokens.append(rng.choice(CITIES))
            tags.append("B-LOC")
    tokens.append(".")
    tags.append("O")
    return " ".join(tokens), {"kind": "entity", "tokens": tokens, "tags": tags}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    paths = Paths(tmp_path_factory.mktemp("ner"))
    for split, n, seed in (("train", 300, 1), ("val", 60, 2), ("test", 40, 3)):
        rng = random.Random(seed)
        docs = [sentence(rng) for _ in range(n)]
        writer = ShardWriter(paths.split / split, shard_docs=1000)
        writer.write(pa.table({"id": [doc_id(f"{i}:{t}") for i, (t, _) in enumerate(docs)], "text": [t for t, _ in docs],
                               "source": ["synthetic"] * n, "meta": [json.dumps(m) for _, m in docs]}))
        writer.close()
    tokenizer_stage.run(TokenizerConfig.model_validate({"vocab_size": 400, "num_threads": 1}), paths)
    info = tokenizer_stage.read_tokenizer_info(paths.tokenizer)
    save_random_model(paths.models / "pretrain", info.vocab_size, info.fingerprint)
    return paths


def test_tagger_learns_an_easy_tagging_and_serves_spans(project: Paths) -> None:
    cfg = config(ner={"type": "token_classification", "lr": 1e-2, "max_steps": 60, "eval_every": 20,
                      "micro_batch_size": 16, "test_data": {"type": "split", "split": "test", "kind": "entity"}})
    summary = {k.removeprefix("ner/"): v for k, v in run_task(cfg, "ner", project).items()}
    assert summary["dev_f1"] > 0.9 and summary["test_f1"] > 0.9
    assert summary["dev_f1_initial"] < 0.5  # the random head did not know it
    metrics = json.loads((project.metrics / "finetune_ner.json").read_text())
    assert set(metrics["test_per_entity"]) == {"LOC", "PER"}
    assert metrics["test_per_entity"]["PER"]["support"] > 0
    assert 0 < metrics["test_majority_f1"] <= 1
    out = project.models / "finetune" / "ner"
    model, labels, model_config = load_token_classifier(out)
    assert labels == ["B-LOC", "B-PER", "I-PER", "O"]
    assert model_config["classifier"]["label_piece"] == "last"  # a causal backbone
    with pytest.raises(DataError, match="describes a token classifier, not a text classifier"):
        load_classifier(out)

    # Registered and loaded back through MLflow, the model answers spans with character offsets.
    register_cfg = RegisterConfig.model_validate({
        "name_prefix": "tagtest", "example_text": "the show in Oslo",
        "models": [{"stage": "finetune", "task": "ner", "metrics": {"entity_f1": "metrics/finetune_ner.json:test_f1"}}],
    })
    result = register.run(register_cfg, project)
    assert result["tagtest-finetune-ner/version"] == 1
    served = mlflow.pyfunc.load_model("models:/tagtest-finetune-ner/1")
    text = "people went to see Priya Silva in Hanoi, and Felix."
    spans = served.predict(pd.DataFrame({"text": [text]}))["spans"].iloc[0]
    assert [(s["text"], s["label"]) for s in spans] == [("Priya Silva", "PER"), ("Hanoi", "LOC"), ("Felix", "PER")]
    assert all(text[s["start"]:s["end"]] == s["text"] for s in spans)
    long = " ".join([text] * 5)  # longer than the model's 64 positions: tagged in windows
    long_spans = served.predict(pd.DataFrame({"text": [long]}))["spans"].iloc[0]
    assert [(s["text"], s["label"]) for s in long_spans] == [(s["text"], s["label"]) for s in spans] * 5
    assert all(long[s["start"]:s["end"]] == s["text"] for s in long_spans)
    # the same tags as the lmpipe model computes for those words
    sp, info = load_tokenizer(project.tokenizer)
    words = ["people", "went", "to", "see", "Priya", "Silva", "in", "Hanoi", ",", "and", "Felix", "."]
    ((ids, positions),) = tagging.WordEncoder(sp, info.eos_id, 64, "last")(words)
    with torch.no_grad():
        predicted = model(torch.from_numpy(ids)[None]).argmax(-1)[0, positions].tolist()
    assert tagging.entities([labels[p] for p in predicted]) == {("PER", 4, 5), ("LOC", 7, 7), ("PER", 10, 10)}
    assert np.all(np.diff(positions) > 0)

    # evaluate scores the exported model as finetune did, and the report shows the per-entity table
    spec = TokenClassificationEval(models={"finetuned": "models/finetune/ner"})
    scores = eval_tasks.token_classification_scores("ner", spec, project, sp, info, torch.device("cpu"))
    assert scores["models"]["finetuned"]["f1"] == pytest.approx(metrics["test_f1"])
    assert scores["majority"]["f1"] == pytest.approx(metrics["test_majority_f1"])
    page = tasks_section({"token_classification": {"ner": scores}})
    assert "Token classification: ner" in page and "most frequent tag of each word" in page
    assert "<td class=\"text\">LOC</td>" in page and "<td class=\"text\">PER</td>" in page
    # on this easy data every word has one tag, so the baseline is (nearly) perfect: the page says when it wins
    tuned = scores["models"]["finetuned"]["f1"]
    assert ("loses to the most-frequent-tag baseline" in page) == (tuned < scores["majority"]["f1"])


def test_entity_documents_are_tagged_word_by_word() -> None:
    """The embedded default's entity documents: their text splits back into their tokens (by the
    served model's word pattern), and their tags are valid IOB2."""
    import re

    from lmpipe.data import synthetic, synthetic_entity
    from lmpipe.registry.pyfunc import WORD_PATTERN

    docs = [d for d in synthetic.generate(200, seed=3, entity_fraction=0.2) if d[1].get("kind") == "entity"]
    plain = [d for d in synthetic.generate(200, seed=3) if d[1].get("kind") != "entity"]
    assert len(docs) == 40
    assert plain == [d for d in synthetic.generate(200, seed=3, entity_fraction=0.2) if d[1].get("kind") != "entity"]
    for text, meta in docs:
        assert re.findall(WORD_PATTERN, text) == meta["tokens"]
        assert len(text.split()) >= 50 and text.isascii()
        sentence = tagging.TaggedSentence(meta["tokens"], meta["tags"], None)  # type: ignore[arg-type]
        tagging.check_scheme(sentence, strict=True)
    assert {t[2:] for _, m in docs for t in m["tags"] if t != "O"} == {"PER", "LOC", "ORG"}
    assert synthetic_entity.detokenize(["In", "Oslo", ",", "Mara", "."]) == "In Oslo, Mara."


def test_tagger_fine_tunes_from_a_masked_lm_encoder(project: Paths) -> None:
    """The BERT-style path: a bidirectional base, each word's tag on its first piece."""
    info = tokenizer_stage.read_tokenizer_info(project.tokenizer)
    save_random_model(project.models / "pretrain_mlm", info.vocab_size, info.fingerprint, seed=1, bidirectional=True)
    cfg = config(enc={"type": "token_classification", "init": "models/pretrain_mlm", "lr": 1e-2, "max_steps": 60,
                      "eval_every": 20, "micro_batch_size": 16})
    summary = {k.removeprefix("enc/"): v for k, v in run_task(cfg, "enc", project).items()}
    assert summary["dev_f1"] > 0.8 > summary["dev_f1_initial"]
    _, _, model_config = load_token_classifier(project.models / "finetune" / "enc")
    assert model_config["classifier"]["label_piece"] == "first"


def test_padding_in_a_batch_does_not_change_a_bidirectional_taggers_loss() -> None:
    """A short window batched with a long one scores as when alone: the collated lengths keep a
    masked-LM encoder from attending to the padding (training, dev sums and prediction all read them)."""
    from lmpipe.model.classifier import TokenClassificationModel
    from lmpipe.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    backbone = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, bidirectional=True))
    model = TokenClassificationModel(backbone, 3, dropout=0.0).eval()
    short = tagging.TagExample(np.array([2, 5, 6, 7]), np.array([-100, 0, 1, 2]), 0, 3)
    long = tagging.TagExample(np.arange(2, 14), np.array([-100] + [2] * 11), 1, 11)
    collate = tagging.TagCollate(pad_id=0)
    objective = tagging.TokenClassificationObjective(["B-X", "I-X", "O"])
    together = objective.eval_sums(model, collate([short, long]))
    apart = objective.eval_sums(model, collate([short])) + objective.eval_sums(model, collate([long]))
    torch.testing.assert_close(together[:3], apart[:3], atol=1e-4, rtol=1e-5)
