"""The scoring functions of the evaluate stage: LM windows, loss and bits per byte, ROUGE-L,
BLEU, generation speed and the config's checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmpipe.errors import DataError
from lmpipe.evaluate.config import EvaluateConfig, SpeedSettings
from lmpipe.evaluate.lm import file_stream, read_documents, score_tokens, split_groups, windows
from lmpipe.evaluate.speed import measure
from lmpipe.evaluate.tasks import CJKTokenizer, bleu, rouge_l, text_scores
from lmpipe.model.gpt import GPT, GPTConfig


def tiny_gpt(block: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=block, n_layer=2, n_head=2, n_embd=16)).eval()


def test_windows_score_every_token_once() -> None:
    for n, block, stride in ((40, 16, 16), (40, 16, 4), (17, 16, 16), (5, 16, 8)):
        spans = windows(n, block, stride)
        scored = [t for _, begin, end in spans for t in range(begin + 1, end + 1)]
        assert scored == list(range(1, n))  # every target index once, in order
        assert all(end - start <= block for start, _, end in spans)
    assert windows(1, 16, 16) == []


def test_score_matches_full_context_cross_entropy_and_bits_per_byte() -> None:
    model = tiny_gpt(block=32)
    tokens = np.random.default_rng(0).integers(0, 50, size=25)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens[None, :-1]))
    direct = F.cross_entropy(logits[0], torch.from_numpy(tokens[1:])).item()
    for stride in (None, 5):  # the whole stream fits one window: every token sees its full context
        score = score_tokens(model, tokens, n_bytes=96.0, stride=stride, batch_size=3)
        assert score["loss"] == pytest.approx(direct, rel=1e-5) and score["tokens"] == 24
        assert score["bpb"] == pytest.approx(direct * 24 / math.log(2) / 96.0, rel=1e-5)
        assert score["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert "bpb" not in score_tokens(model, tokens, None)


def test_bits_per_byte_per_language_from_the_split_documents(tmp_path: Path) -> None:
    from lmpipe.data.shards import ShardWriter, make_table

    # a split of four documents (en, zh, en, zh) and a token stream laid out as tokenize writes it
    texts = ["a cat", "我爱北京", "the dog sat", "天安门"]
    langs = ["en", "zh", "en", "zh"]
    writer = ShardWriter(tmp_path / "val", 100)
    writer.write(make_table([f"d{i}" for i in range(4)], texts, ["s"] * 4, [f'{{"lang":"{lang}"}}' for lang in langs]))
    writer.close()
    eos = 0
    rng = np.random.default_rng(2)
    lengths = [3, 4, 5, 2]
    tokens = np.concatenate([np.r_[rng.integers(1, 50, size=n), eos] for n in lengths])
    groups = split_groups(tmp_path / "val", tokens, eos)
    assert groups is not None and groups.names == ["en", "zh"]
    assert groups.ids.tolist() == [0] * 4 + [1] * 5 + [0] * 6 + [1] * 3  # each document with its EOS
    assert groups.n_bytes.tolist() == [len(b"a cat") + len(b"the dog sat"), len("我爱北京天安门".encode())]
    model = tiny_gpt(block=32)
    n_bytes = float(sum(len(t.encode()) for t in texts))
    score = score_tokens(model, tokens, n_bytes, groups=groups)
    en, zh = score["by_language"]["en"], score["by_language"]["zh"]
    # the first token is never a target; every other position is scored in its own language
    assert en["tokens"] == 9 and zh["tokens"] == 8 and en["tokens"] + zh["tokens"] == score["tokens"]
    nats = en["loss"] * en["tokens"] + zh["loss"] * zh["tokens"]
    assert nats / score["tokens"] == pytest.approx(score["loss"], rel=1e-6)
    assert zh["bpb"] == pytest.approx(zh["loss"] * 8 / math.log(2) / groups.n_bytes[1], rel=1e-6)
    assert en["bpb"] == pytest.approx(en["loss"] * 9 / math.log(2) / (groups.n_bytes[0] * 9 / 9), rel=1e-6)
    # a prefix keeps the positions' languages and prorates the bytes
    head = groups.prefix(6)
    assert head.ids.tolist() == [0] * 4 + [1] * 2 and head.n_bytes[1] == pytest.approx(groups.n_bytes[1] * 2 / 8)
    # one language, or documents that do not match the stream: no per-language numbers
    assert split_groups(tmp_path / "val", tokens[:-1], eos) is None


def test_sliding_window_gives_more_context_than_disjoint_windows() -> None:
    model = tiny_gpt(block=8)
    tokens = np.random.default_rng(1).integers(0, 50, size=60)
    disjoint = score_tokens(model, tokens, None)
    sliding = score_tokens(model, tokens, None, stride=2, batch_size=7)
    assert disjoint["tokens"] == sliding["tokens"] == 59
    assert disjoint["loss"] != pytest.approx(sliding["loss"], rel=1e-6)
    with pytest.raises(DataError, match="nothing to score"):
        score_tokens(model, tokens[:1], None)


def test_eval_file_documents_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_text("héllo world\n\n = Heading = \nlast line\n", encoding="utf-8")
    docs = read_documents(path, "text", "text")
    assert docs == ["héllo world", " = Heading = ", "last line"]

    class Chars:  # a stand-in tokenizer: one id per character
        def encode(self, texts: list[str]) -> list[list[int]]:
            return [[ord(c) % 50 + 1 for c in text] for text in texts]

    ids, n_bytes = file_stream(docs, Chars(), 0, max_tokens=1000)
    assert ids[0] == 0 and list(ids).count(0) == 4 and n_bytes == sum(len(d.encode()) for d in docs)
    ids, n_bytes = file_stream(docs, Chars(), 0, max_tokens=20)  # whole documents only, bytes of those
    assert len(ids) == 1 + 11 + 1 and n_bytes == len("héllo world".encode())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no text field 'text'"):
        read_documents(tmp_path / "bad.jsonl", "jsonl", "text")
    with pytest.raises(DataError, match="eval file not found"):
        read_documents(tmp_path / "missing.txt", "text", "text")


def test_rouge_l_matches_reference_values_and_bleu() -> None:
    # Lin (2004), section 3.1: against "police killed the gunman", "police kill the gunman" has an LCS
    # of 3 words (ROUGE-L 3/4) and "the gunman kill police" of 2 (ROUGE-L 2/4).
    assert rouge_l("police kill the gunman", "police killed the gunman")["f1"] == pytest.approx(3 / 4)
    assert rouge_l("the gunman kill police", "police killed the gunman")["f1"] == pytest.approx(2 / 4)
    # rouge-score's tokenisation: case and punctuation do not count
    score = rouge_l("The cat sat on the mat.", "the cat is on the mat")
    assert score["precision"] == pytest.approx(5 / 6) and score["recall"] == pytest.approx(5 / 6)
    partial = rouge_l("cat mat", "the cat is on the mat")
    assert partial["precision"] == 1.0 and partial["recall"] == pytest.approx(2 / 6)
    assert partial["f1"] == pytest.approx(2 * 1.0 * (2 / 6) / (1.0 + 2 / 6))
    assert rouge_l("", "x")["f1"] == 0.0
    perfect, signature = bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert perfect == pytest.approx(100.0) and "13a" in signature
    assert bleu(["dog"], ["the cat sat on the mat today"])[0] < 5


def test_rouge_l_and_bleu_tokenize_chinese() -> None:
    from rouge_score import rouge_scorer

    # each Chinese character is a token: LCS of 我爱北京 and 我爱北京天安门 is 4 of 4 and 4 of 7
    score = rouge_l("我爱北京", "我爱北京天安门")
    assert score["precision"] == 1.0 and score["recall"] == pytest.approx(4 / 7)
    assert score["f1"] == pytest.approx(8 / 11)
    # the library's default tokenizer keeps only a-z and 0-9: Chinese answers would score nothing
    assert rouge_scorer.RougeScorer(["rougeL"]).score("我爱北京天安门", "我爱北京")["rougeL"].fmeasure == 0.0
    assert CJKTokenizer().tokenize("GPT-2 模型, v1.5") == ["gpt", "2", "模", "型", "v1", "5"]
    mixed = rouge_l("答案是60个苹果", "答案是 60 个 apples")
    assert mixed["precision"] == pytest.approx(5 / 7) and mixed["recall"] == pytest.approx(5 / 6)
    # sacrebleu's zh tokenizer for Chinese references: one character per token, so a close answer
    # scores; with 13a the whole sentence would be one token and score 0
    close, signature = bleu(["今天上海的火车晚点了二十分钟。"], ["今天去上海的火车晚点了二十分钟。"])
    assert "tok:zh" in signature and close > 50
    import sacrebleu

    assert sacrebleu.BLEU(tokenize="13a").corpus_score(["今天上海的火车晚点了二十分钟。"],
                                                       [["今天去上海的火车晚点了二十分钟。"]]).score < 1


def test_text_scores_per_reference_language() -> None:
    answers = ["the cat sat on the mat", "我爱北京", "a dog"]
    references = ["the cat sat on the mat", "我爱北京天安门", "the dog barked"]
    scores = text_scores(answers, references)
    assert scores["examples"] == 3 and "tok:zh" in scores["bleu_signature"]
    by_language = scores["by_language"]
    assert by_language["zh"]["examples"] == 1 and by_language["zh"]["rouge_l"] == pytest.approx(8 / 11)
    assert "tok:zh" in by_language["zh"]["bleu_signature"] and "tok:13a" in by_language["other"]["bleu_signature"]
    assert by_language["other"]["exact_match"] == 0.5 and scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx(np.mean([1.0, 8 / 11, rouge_l("a dog", "the dog barked")["f1"]]))
    assert "by_language" not in text_scores(["the cat"], ["the cat"])


def test_speed_measures_every_model_and_batch_size() -> None:
    settings = SpeedSettings(batch_sizes=[1, 3], prompt_tokens=4, new_tokens=6, repeats=1, warmup=0, threads=1)
    results = measure({"a": tiny_gpt(), "b": tiny_gpt()}, settings, torch.device("cpu"))
    assert set(results) == {"a", "b"}
    for values in results.values():
        assert values["tokens_per_s_b3"] > 0
        # tokens/s at batch 1 and the latency per token describe the same timing
        assert values["tokens_per_s_b1"] == pytest.approx(1000 / values["latency_ms_per_token_b1"])


def test_config_rejects_bad_names() -> None:
    with pytest.raises(ValidationError, match="is a split name"):
        EvaluateConfig.model_validate({"eval_files": [{"name": "val", "path": "x.txt"}]})
    with pytest.raises(ValidationError, match="must be letters"):
        EvaluateConfig.model_validate({"models": {"bad name": "models/x"}})
