"""The ``tokenizer`` stage: determinism, errors, special ids, the transformers export, round trips."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lmpipe.config import Paths
from lmpipe.data.shards import ShardWriter, doc_id
from lmpipe.errors import DataError
from lmpipe.tokenizer import train
from lmpipe.tokenizer.config import TokenizerConfig

WORDS = [
    "the", "a", "river", "stone", "carried", "quiet", "morning", "village", "baker", "bread", "warm",
    "window", "rain", "garden", "children", "laughed", "market", "story", "old", "new", "light", "dark",
    "walked", "slowly", "because", "after", "before", "mountain", "letter", "wrote", "friend",
    "remembered", "summer", "winter", "evening", "2024", "17", "3.5",
]
FOREIGN = ["北京的秋天很美。", "Café naïve façade", "Ελληνικά", "emoji 🎉"]


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Small deterministic documents: several lines of generated sentences, a little non-English."""
    rng = random.Random(seed)
    docs = []
    for idx in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
        if idx % 10 == 0:
            lines.append(rng.choice(FOREIGN))
        docs.append("\n".join(lines))
    return docs


def write_split(root: Path, split: str, docs: list[str], shard_docs: int = 50) -> None:
    writer = ShardWriter(root / "data" / "split" / split, shard_docs=shard_docs)
    writer.write(pa.table({"id": [doc_id(d) for d in docs], "text": docs,
                           "source": ["test"] * len(docs), "meta": ["{}"] * len(docs)}))
    writer.close()


def make_project(root: Path, n_train: int = 300, seed: int = 0) -> Paths:
    write_split(root, "train", corpus(n_train, seed))
    write_split(root, "val", corpus(40, seed + 1))
    write_split(root, "test", corpus(20, seed + 2))
    return Paths(root)


def tiny(**overrides: object) -> TokenizerConfig:
    """Tiny vocabularies keep training well under a second."""
    return TokenizerConfig.model_validate({"vocab_size": 400, "num_threads": 1, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    paths = make_project(tmp_path_factory.mktemp("tok"))
    train.run(tiny(), paths)
    return paths


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_same_corpus_and_seed_give_byte_identical_model(tmp_path: Path, model_type: str) -> None:
    outputs = []
    for name in ("a", "b", "other-seed"):
        paths = make_project(tmp_path / name)
        # input_sentence_size below the corpus's line count: the seed decides the sample
        cfg = tiny(model_type=model_type, input_sentence_size=200, seed=7 if name == "other-seed" else 1234)
        summary = train.run(cfg, paths)
        assert summary["vocab_size"] == 400
        outputs.append(paths.tokenizer)
    a, b, other = outputs
    for name in ("tokenizer.model", "tokenizer.vocab", "tokenizer.json", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    info = json.loads((a / "tokenizer.json").read_text())
    assert info["fingerprint"] == train.sha256_file(a / "tokenizer.model")
    assert (other / "tokenizer.model").read_bytes() != (a / "tokenizer.model").read_bytes()
    # A fresh process (fresh native random state) trains the same bytes too.
    child = subprocess.run(
        [sys.executable, "-c", TRAIN_IN_CHILD, cfg.model_copy(update={"seed": 1234}).model_dump_json(),
         str(tmp_path / "a" / "data" / "split" / "train")],
        capture_output=True, check=True,
    )
    assert child.stdout == (a / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_model_bytes_do_not_depend_on_the_thread_or_core_count(tmp_path: Path, model_type: str) -> None:
    """num_threads 1 and 2, and the default (all cores) on a process pinned to one core: one model."""
    paths = make_project(tmp_path, n_train=600)
    train_dir = paths.split / "train"
    models = {threads: train.train_sentencepiece(tiny(model_type=model_type, num_threads=threads), train_dir)[0]
              for threads in (1, 2)}
    assert models[1] == models[2]
    default = tiny(model_type=model_type).model_copy(update={"num_threads": None})
    one_core = subprocess.run([sys.executable, "-c", TRAIN_IN_CHILD, default.model_dump_json(), str(train_dir)],
                              capture_output=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert one_core.stdout == models[1]


TRAIN_IN_CHILD = """
import sys
from pathlib import Path
from lmpipe.tokenizer import train
from lmpipe.tokenizer.config import TokenizerConfig
model, _ = train.train_sentencepiece(TokenizerConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]))
sys.stdout.buffer.write(model)
"""


def test_empty_corpus_is_a_clear_data_error(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["", "   ", "\n\n"])
    with pytest.raises(DataError, match="no text to train the tokenizer on") as err:
        train.run(tiny(), Paths(tmp_path))
    assert str(tmp_path / "data" / "split" / "train") in str(err.value)
    assert not Paths(tmp_path).tokenizer.exists()


def test_missing_train_split_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory not found"):
        train.run(tiny(), Paths(tmp_path))


def test_vocabulary_too_large_for_corpus(tmp_path: Path) -> None:
    paths = make_project(tmp_path, n_train=20)
    with pytest.raises(DataError, match="Vocabulary size too high.*tokenizer.vocab_size"):
        train.run(tiny(vocab_size=5000, hard_vocab_limit=True), paths)
    summary = train.run(tiny(vocab_size=5000), paths)  # soft limit: a smaller vocabulary
    assert 300 < summary["vocab_size"] < 5000
    with pytest.raises(DataError, match="required_chars.*raise tokenizer.vocab_size"):
        train.run(tiny(vocab_size=270), paths)  # 256 bytes + 8 specials leave no room for characters


def test_special_tokens_have_stable_ids(trained: Paths, tmp_path: Path) -> None:
    sp, info = train.load_tokenizer(trained.tokenizer)
    assert (info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, 3)
    assert info.special_tokens == {"<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}
    assert sp.id_to_piece(2) == "<|endoftext|>" and sp.id_to_piece(3) == "<|pad|>"
    ids = sp.encode("<|user|>hello there<|end|>")
    assert ids[0] == 5 and ids[-1] == 7
    # Another corpus, other sizes: the special ids do not move.
    other = make_project(tmp_path, n_train=120, seed=9)
    train.run(tiny(vocab_size=350, model_type="bpe"), other)
    assert train.read_tokenizer_info(other.tokenizer).special_tokens == info.special_tokens


SAMPLES = [
    "The river carried the stone.\nChildren laughed, 2024!",
    "<|system|>be brief<|end|>\n<|user|>hello  there<|end|>\n<|assistant|>hi<|end|>",
    "  leading spaces and\ttabs\r\nand a literal <|endoftext|> in text",
    "北京的秋天很美。 Café naïve ½ ﬁ Ελληνικά 🎉 unseen: ж ש 𝔘",
    "",
]


@pytest.mark.parametrize("options", [{"model_type": "unigram"}, {"model_type": "bpe"},
                                     {"model_type": "bpe", "normalization": "nfkc"}])
def test_transformers_export_gives_sentencepiece_ids(tmp_path: Path, options: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    paths = make_project(tmp_path)
    summary = train.run(tiny(**options), paths)
    assert summary["transformers_parity"] == 1.0
    sp, info = train.load_tokenizer(paths.tokenizer)
    hf = AutoTokenizer.from_pretrained(str(paths.tokenizer / "hf"), local_files_only=True)
    samples = SAMPLES + corpus(30, seed=5)
    if options["model_type"] == "unigram":  # see transformers_backend: literal control strings differ
        samples = [s.replace("<|endoftext|>", "") for s in samples]
    for text in samples:
        ids = sp.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == sp.decode(ids)
    assert hf.eos_token_id == info.eos_id and hf.pad_token_id == info.pad_id
    assert hf.convert_tokens_to_ids("<|assistant|>") == info.special_tokens["<|assistant|>"]


def test_report_and_metrics(trained: Paths) -> None:
    metrics = json.loads((trained.metrics / "tokenizer.json").read_text())
    assert 1.0 < metrics["bytes_per_token"] < 10.0
    assert 1.0 <= metrics["tokens_per_word"] < 5.0
    assert metrics["unk_rate"] == 0.0
    assert 0.0 < metrics["byte_fallback_rate"] < 0.2  # the rare non-Latin characters of the corpus
    assert 0.0 < metrics["vocab_coverage"] <= 1.0
    report = json.loads((trained.tokenizer / "report.json").read_text())
    assert report["split"] == "val" and len(report["top_tokens"]) == 25
    counts = [t["count"] for t in report["top_tokens"]]
    assert counts == sorted(counts, reverse=True)


@pytest.fixture(scope="module", params=["identity", "nfkc"])
def processor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    paths = make_project(tmp_path_factory.mktemp(f"norm-{request.param}"), n_train=150)
    train.run(tiny(normalization=request.param), paths)
    return train.load_tokenizer(paths.tokenizer)[0]


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_decode_of_encode_is_the_normalised_text(processor: spm.SentencePieceProcessor, text: str) -> None:
    assert processor.decode(processor.encode(text)) == train.normalized_text(processor, text)


def test_identity_normalisation_keeps_text_except_visible_space(processor: spm.SentencePieceProcessor) -> None:
    if processor.normalize("ﬁ") == "ﬁ":  # the identity model
        text = "Tabs\tand  spaces\n\nstay ﬁ ½"
        assert processor.decode(processor.encode(text)) == text
        assert processor.decode(processor.encode("a\u2581b")) == "a b"


@settings(max_examples=200, deadline=None)
@given(line=st.text(st.characters(blacklist_categories=("Cs",)), max_size=300), limit=st.integers(64, 128))
def test_split_long_line_keeps_pieces_short_and_whole(line: str, limit: int) -> None:
    pieces = list(train.split_long_line(line, limit))
    assert all(0 < len(p.encode("utf-8")) <= limit for p in pieces)
    def visible(text: str) -> str:
        return "".join(c for c in text if not c.isspace())

    assert visible("".join(pieces)) == visible(line)


def test_special_pieces_must_be_distinct() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        TokenizerConfig.model_validate({"special_tokens": ["<|user|>", "<|user|>"]})
    with pytest.raises(ValidationError, match="whitespace"):
        TokenizerConfig.model_validate({"pad_piece": "<pad piece>"})


def test_line_sample_is_seeded_and_bounded() -> None:
    lines = [f"line {i}" for i in range(1000)]
    sample = train.sample_lines(iter(lines), 100, shuffle=True, seed=3)
    assert len(sample) == 100 and len(set(sample)) == 100 and set(sample) <= set(lines)
    assert sample == train.sample_lines(iter(lines), 100, shuffle=True, seed=3)
    assert sample != train.sample_lines(iter(lines), 100, shuffle=True, seed=4)
    assert max(int(s.split()[1]) for s in sample) > 500  # drawn from the whole stream, not its head
    assert train.sample_lines(iter(lines), 100, shuffle=False, seed=3) == lines[:100]
    assert train.sample_lines(iter(lines), 5000, shuffle=True, seed=3) == lines
