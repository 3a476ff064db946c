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
from lmpipe.evaluate.lm import file_stream, read_documents, score_tokens, windows
from lmpipe.evaluate.speed import measure
from lmpipe.evaluate.tasks import bleu, lcs_length, rouge_l
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


def test_rouge_l_by_hand_and_bleu() -> None:
    assert lcs_length(["a", "b", "c", "d", "e"], ["a", "c", "e", "f"]) == 3
    assert lcs_length([], ["a"]) == 0
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each.
    score = rouge_l("The cat sat on the mat", "the cat is on the mat")
    assert score["precision"] == pytest.approx(5 / 6) and score["recall"] == pytest.approx(5 / 6)
    assert score["f1"] == pytest.approx(5 / 6)
    partial = rouge_l("cat mat", "the cat is on the mat")
    assert partial["precision"] == 1.0 and partial["recall"] == pytest.approx(2 / 6)
    assert partial["f1"] == pytest.approx(2 * 1.0 * (2 / 6) / (1.0 + 2 / 6))
    assert rouge_l("", "x")["f1"] == 0.0
    perfect, signature = bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert perfect == pytest.approx(100.0) and "13a" in signature
    assert bleu(["dog"], ["the cat sat on the mat today"])[0] < 5


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
