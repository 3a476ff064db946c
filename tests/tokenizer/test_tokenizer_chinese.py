"""The tokenizer on Chinese and English: the defaults cover CJK (rare characters become byte pieces,
never unknowns) and the report gives compression per language."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import sentencepiece as spm

from lmpipe.config import Paths
from lmpipe.data import synthetic_zh
from lmpipe.data.shards import ShardWriter, doc_id
from lmpipe.tokenizer import train
from lmpipe.tokenizer.config import TokenizerConfig
from lmpipe.tokenizer.report import spaced_words

ENGLISH = ["The baker opened the shop before dawn and lit the ovens.", "Rain fell on the quiet garden all night.",
           "Children laughed in the market while the old man sold bread."]


def documents(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    docs, langs = [], []
    for idx in range(n):
        if idx % 3 == 2:
            docs.append(" ".join(rng.sample(ENGLISH, 2)))
            langs.append("en")
        else:
            docs.append(synthetic_zh.GENERATORS[rng.choice(("story", "review", "instruction"))](rng)[0])
            langs.append("zh")
    return docs, langs


def write_split(root: Path, split: str, n: int, seed: int) -> None:
    docs, langs = documents(n, seed)
    writer = ShardWriter(root / "data" / "split" / split, shard_docs=100)
    writer.write(pa.table({"id": [doc_id(d) for d in docs], "text": docs, "source": ["test"] * n,
                           "meta": [json.dumps({"lang": lang}) for lang in langs]}))
    writer.close()


def test_chinese_defaults_and_report_per_language(tmp_path: Path) -> None:
    for split, n, seed in (("train", 240, 0), ("val", 30, 1)):
        write_split(tmp_path, split, n, seed)
    paths = Paths(tmp_path)
    defaults = TokenizerConfig()
    assert defaults.byte_fallback and defaults.character_coverage == 0.9995  # sentencepiece's advice for CJK
    train.run(TokenizerConfig(vocab_size=1200, num_threads=1), paths)
    report = json.loads((paths.tokenizer / "report.json").read_text())
    assert report["unk_rate"] == 0.0
    zh, en = report["by_language"]["zh"], report["by_language"]["en"]
    assert zh["documents"] == 20 and en["documents"] == 10
    assert zh["tokens_per_word"] is None and en["tokens_per_word"] > 0  # Chinese has no spaces to count
    # Chinese pieces join characters: under one token per character, about three bytes per character
    assert 0 < zh["tokens_per_char"] < 1 and zh["bytes_per_token"] > 3
    assert zh["bytes"] / zh["chars"] > 2.5 and en["bytes"] == en["chars"]
    assert zh["tokens"] + en["tokens"] == report["sample_tokens"]
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer / "tokenizer.model"))
    rare = "龘靐齉"  # in no training document: byte pieces, and the text comes back whole
    ids = sp.encode(f"从前{rare}。")
    assert sp.unk_id() not in ids and any(sp.is_byte(i) for i in ids) and sp.decode(ids) == f"从前{rare}。"


def test_spaced_words_only_for_text_written_with_spaces() -> None:
    assert spaced_words("two words here") == 3
    assert spaced_words("自然语言处理是人工智能的一个重要分支") is None
    assert spaced_words("GPT 模型") is None and spaced_words("the 模型 is good") == 4
