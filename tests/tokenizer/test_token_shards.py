"""The ``tokenize`` stage and the token reader: order, EOS, dtype, fingerprints, atomicity, both
layouts on both engines giving the same training batches."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmpipe import engine
from lmpipe.config import Paths
from lmpipe.data.shards import SCHEMA, ShardWriter, doc_id
from lmpipe.errors import ConfigError, DataError, FingerprintMismatch
from lmpipe.tokenizer import shards, train
from lmpipe.tokenizer.config import TokenizeConfig, TokenizerConfig
from lmpipe.train.data import TokenDataModule, open_token_split

SENTENCES = [
    "The baker opened the shop before dawn.", "Rain fell on the quiet village all night.",
    "She wrote 3 letters in 2024, then 17 more.", "Children ran to the market square!",
    "北京的秋天很美。", "An old map showed the river bending east.", "Why did the lamp flicker?",
]


def documents(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = ["\n".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 5))) for _ in range(n_docs)]
    docs[3] = "<|user|>What is 2+2?<|end|>\n<|assistant|>4<|end|>"
    docs[5] = "  indented\n\tand tabbed  \n\n"
    return docs


def write_split(root: Path, split: str, docs: list[str], shard_docs: int = 25) -> None:
    writer = ShardWriter(root / "data" / "split" / split, shard_docs=shard_docs)
    writer.write(pa.table({"id": [doc_id(d) for d in docs], "text": docs,
                           "source": ["test"] * len(docs), "meta": ["{}"] * len(docs)}))
    writer.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, dict[str, list[str]]]:
    """A split with a trained tiny tokenizer; val has an empty document, which is skipped, and an empty shard."""
    root = tmp_path_factory.mktemp("shards")
    docs = {"train": documents(120, 0), "val": documents(30, 1), "test": documents(10, 2)}
    docs["val"][7] = ""
    for split, texts in docs.items():
        write_split(root, split, texts)
    pq.write_table(SCHEMA.empty_table(), root / "data" / "split" / "val" / "part-00002.parquet")  # as clean may write
    paths = Paths(root)
    train.run(TokenizerConfig.model_validate({"vocab_size": 320, "num_threads": 1}), paths)
    return paths, {split: [d for d in texts if d] for split, texts in docs.items()}


def tokenize(paths: Paths, **options: object) -> dict[str, object]:
    return shards.run(TokenizeConfig.model_validate({"workers": 1, **options}), paths)


def test_shards_decode_back_to_the_documents_with_eos_between(project: tuple[Paths, dict[str, list[str]]]) -> None:
    paths, docs = project
    # Small batches and two worker processes: results must still land in document order.
    summary = tokenize(paths, workers=2, batch_bytes=300)
    sp, info = train.load_tokenizer(paths.tokenizer)
    reader = shards.TokenShardReader(paths.tokens, info.fingerprint)
    for split, texts in docs.items():
        ids = reader.tokens(split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.dtype("<u2")
        assert ids[-1] == info.eos_id and int((ids == info.eos_id).sum()) == len(texts)
        ends = np.flatnonzero(ids == info.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [sp.decode(ids[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
        assert decoded == texts
        assert summary[f"{split}_documents"] == len(texts)
        assert summary[f"{split}_tokens"] == len(ids)
    meta = reader.meta
    assert meta["splits"]["val"]["empty_documents"] == 1
    assert meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in docs["train"])
    assert meta["tokenizer_fingerprint"] == info.fingerprint and meta["eos_id"] == 2 and meta["pad_id"] == 3
    assert meta["special_tokens"]["<|assistant|>"] == 6
    # One process or two, any batch size: the same bytes.
    two_workers = (paths.tokens / "train.bin").read_bytes()
    tokenize(paths, workers=1, batch_bytes=10_000)
    assert (paths.tokens / "train.bin").read_bytes() == two_workers
    assert (paths.tokens / "manifest.json").is_file()


def test_dtype_is_uint16_when_the_vocab_fits() -> None:
    assert shards.token_dtype(320) == np.dtype("<u2")
    assert shards.token_dtype(65_536) == np.dtype("<u2")  # ids 0..65535
    assert shards.token_dtype(65_537) == np.dtype("<u4")
    assert shards.token_dtype(320, "uint32") == np.dtype("<u4")
    with pytest.raises(ConfigError, match="uint16 cannot hold"):
        shards.token_dtype(100_000, "uint16")


def test_uint32_shards_hold_the_same_ids(project: tuple[Paths, dict[str, list[str]]]) -> None:
    paths, _ = project
    tokenize(paths, splits=["val"])
    small = np.array(shards.open_tokens(paths.tokens, "val", paths.tokenizer)[0])
    tokenize(paths, splits=["val"], dtype="uint32")
    wide, meta = shards.open_tokens(paths.tokens, "val", paths.tokenizer)
    assert meta["dtype"] == "uint32" and wide.dtype == np.dtype("<u4")
    assert (paths.tokens / "val.bin").stat().st_size == 4 * len(small)
    assert np.array_equal(wide, small)


def test_shards_of_another_tokenizer_are_refused(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    paths, _ = project
    tokenize(paths)
    made_with = train.read_tokenizer_info(paths.tokenizer).fingerprint
    other = Paths(tmp_path)
    shutil.copytree(paths.split, other.split)
    train.run(TokenizerConfig.model_validate({"vocab_size": 340, "num_threads": 1}), other)
    in_use = train.read_tokenizer_info(other.tokenizer).fingerprint
    with pytest.raises(FingerprintMismatch) as err:
        shards.open_tokens(paths.tokens, "train", other.tokenizer)
    message = str(err.value)
    assert made_with in message and in_use in message and "dvc repro tokenize" in message


def test_truncated_or_missing_split_is_refused(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    paths, _ = project
    tokenize(paths, splits=["train", "val"])
    fingerprint = train.read_tokenizer_info(paths.tokenizer).fingerprint
    copy = tmp_path / "tokens"
    shutil.copytree(paths.tokens, copy)
    reader = shards.TokenShardReader(copy, fingerprint)
    with pytest.raises(DataError, match="'test' was not tokenized"):
        reader.tokens("test")
    with open(copy / "val.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(DataError, match="incomplete"):
        reader.tokens("val")
    with pytest.raises(DataError, match="no meta.json"):
        shards.TokenShardReader(tmp_path / "nowhere", fingerprint)


def test_failed_tokenize_leaves_previous_output_or_none(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    paths, _ = project
    broken = Paths(tmp_path)
    shutil.copytree(paths.split, broken.split)
    shutil.copytree(paths.tokenizer, broken.tokenizer)
    (broken.split / "test" / "part-00000.parquet").write_bytes(b"not parquet")  # fails after train and val
    with pytest.raises(DataError, match="not a readable parquet file"):
        tokenize(broken, workers=2, batch_bytes=200)
    assert not broken.tokens.exists()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".tokens")]
    # With a previous complete output, a failed run leaves it untouched.
    tokenize(broken, splits=["train", "val"])
    before = {p.name: p.read_bytes() for p in broken.tokens.iterdir()}
    with pytest.raises(DataError):
        tokenize(broken)
    assert {p.name: p.read_bytes() for p in broken.tokens.iterdir()} == before


def test_missing_split_or_tokenizer_is_a_clear_error(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    paths, _ = project
    with pytest.raises(DataError, match="no tokenizer.json: train the tokenizer first"):
        tokenize(Paths(tmp_path))
    partial = Paths(tmp_path)
    shutil.copytree(paths.tokenizer, partial.tokenizer)
    write_split(tmp_path, "train", ["one document"])
    with pytest.raises(DataError, match="split 'val' not found"):
        tokenize(partial)
    (partial.tokenizer / "tokenizer.model").write_bytes(b"edited")
    with pytest.raises(DataError, match="has sha256 .* but tokenizer.json records"):
        tokenize(partial, splits=["train"])


def test_tokenize_config_rejects_repeated_splits() -> None:
    with pytest.raises(ValueError, match="twice"):
        TokenizeConfig.model_validate({"splits": ["train", "train"]})


@pytest.mark.slow
def test_cli_runs_both_stages_and_logs_to_mlflow(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    """`lmpipe tokenizer` then `lmpipe tokenize` from params.yaml, each an MLflow run with metrics."""
    import mlflow

    from lmpipe.cli import main

    paths, docs = project
    shutil.copytree(paths.split, tmp_path / "data" / "split")
    (tmp_path / "params.yaml").write_text(
        "tracking:\n  experiment: tokenizer-cli-test\n"
        "tokenizer:\n  vocab_size: 330\n  num_threads: 1\n"
        "tokenize:\n  workers: 1\n"
    )
    assert main(["tokenizer", "--root", str(tmp_path)]) == 0
    assert main(["tokenize", "--root", str(tmp_path), "-S", "tokenize.splits=[train, val]"]) == 0
    fingerprint = train.read_tokenizer_info(tmp_path / "artifacts" / "tokenizer").fingerprint
    reader = shards.TokenShardReader(tmp_path / "data" / "tokens", fingerprint)
    assert reader.splits == ["train", "val"] and reader.vocab_size == 330
    runs = mlflow.search_runs(experiment_names=["tokenizer-cli-test"], output_format="list")
    by_name = {run.info.run_name: run for run in runs}
    assert by_name["tokenizer"].data.metrics["bytes_per_token"] > 1
    assert by_name["tokenizer"].data.tags["tokenizer.fingerprint"] == reader.meta["tokenizer_fingerprint"]
    assert by_name["tokenize"].data.metrics["val_documents"] == len(docs["val"])


# ------------------------------------------------------------------------------ sharded layout


def batches(tokens_dir: Path, tokenizer_dir: Path) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Training micro-batches of 12 steps and the val batches the training reader gives."""
    train_split = open_token_split(tokens_dir, "train", tokenizer_dir)
    val_split = open_token_split(tokens_dir, "val", tokenizer_dir)
    data = TokenDataModule(train_split, val_split, block_size=24, micro_batch_size=4, accumulation=2,
                           max_steps=12, seed=5, shuffle=True)
    return list(data.train_stream(0)), list(data.val_batches(8, rank=0, world_size=1))


@pytest.mark.slow
def test_single_sharded_and_ray_give_identical_training_batches(
        project: tuple[Paths, dict[str, list[str]]], tmp_path: Path, ray_cluster: object,
        caplog: pytest.LogCaptureFixture) -> None:
    """Local single file, local shards (two processes) and Ray shards: the same ids, batches and
    val batches; Ray writes the local engine's files byte for byte in both layouts."""
    paths, _ = project
    outputs: dict[str, dict[str, bytes]] = {}
    for name, kind, layout in (("single", "local", "single"), ("sharded", "local", "sharded"),
                               ("ray-sharded", "ray", "sharded"), ("ray-single", "ray", "single")):
        caplog.clear()
        with engine.use(engine.EngineConfig(kind=kind)), caplog.at_level(logging.INFO, logger=shards.__name__):
            tokenize(paths, layout=layout, workers=2, batch_bytes=400)
        assert ("tokenize on Ray: 9 parquet shards" in caplog.text) == (kind == "ray")  # train 5, val 3, test 1
        shutil.copytree(paths.tokens, tmp_path / name)
        outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
    assert outputs["ray-sharded"] == outputs["sharded"] and outputs["ray-single"] == outputs["single"]
    meta = json.loads(outputs["sharded"]["meta.json"])
    index = meta["splits"]["train"]["shards"]
    assert [s["file"] for s in index] == [f"train-{i:05d}.bin" for i in range(5)]  # 120 documents, 25 a shard
    assert b"".join(outputs["sharded"][s["file"]] for s in index) == outputs["single"]["train.bin"]
    for shard in index:
        data = outputs["sharded"][shard["file"]]
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and len(data) == 2 * shard["tokens"]
    assert [s["tokens"] > 0 for s in meta["splits"]["val"]["shards"]] == [True, True, False]
    single_meta = json.loads(outputs["single"]["meta.json"])["splits"]["train"]
    assert {k: meta["splits"]["train"][k] for k in ("tokens", "documents", "bytes")} == \
        {k: single_meta[k] for k in ("tokens", "documents", "bytes")}
    assert isinstance(open_token_split(tmp_path / "sharded", "train", paths.tokenizer).tokens, shards.ShardedTokens)
    expected_train, expected_val = batches(tmp_path / "single", paths.tokenizer)
    assert len(expected_train) == 24 and len(expected_val) >= 2
    for name in ("sharded", "ray-sharded"):
        train_batches, val_batches = batches(tmp_path / name, paths.tokenizer)
        for got, want in zip(train_batches + val_batches, expected_train + expected_val, strict=True):
            assert all(torch.equal(got[key], want[key]) for key in want)


def test_sharded_tokens_index_like_their_concatenation(tmp_path: Path) -> None:
    """Ints, slices and window arrays across shard boundaries, pickling by path, unigram entropy."""
    rng = np.random.default_rng(0)
    parts = []
    for i, n in enumerate((7, 1, 30, 12)):
        rng.integers(0, 50, n).astype("<u2").tofile(tmp_path / f"p{i}.bin")
        parts.append(np.memmap(tmp_path / f"p{i}.bin", dtype="<u2", mode="r"))
    sharded, whole = shards.ShardedTokens(parts), np.concatenate(parts)
    assert len(sharded) == sharded.shape[0] == 50 and sharded.dtype == np.dtype("<u2")
    assert [sharded[i] for i in (0, 6, 7, 8, 49, -1)] == [whole[i] for i in (0, 6, 7, 8, 49, -1)]
    for key in (slice(0, 50), slice(5, 9), slice(8, 8), slice(3, 45, 4), slice(-10, None)):
        assert np.array_equal(sharded[key], whole[key])
    starts = np.array([0, 5, 6, 30, 37])
    windows = starts[:, None] + np.arange(13)
    assert np.array_equal(sharded[windows], whole[windows])
    assert np.array_equal(np.asarray(sharded), whole)
    assert np.array_equal(pickle.loads(pickle.dumps(sharded))[windows], whole[windows])
    assert shards.unigram_entropy(sharded, 50, chunk=9) == pytest.approx(shards.unigram_entropy(whole, 50))
    with pytest.raises(IndexError):
        sharded[np.array([50])]


def test_missing_or_resized_shard_is_named(project: tuple[Paths, dict[str, list[str]]], tmp_path: Path) -> None:
    paths, _ = project
    tokenize(paths, layout="sharded", splits=["train"])
    copy = tmp_path / "tokens"
    shutil.copytree(paths.tokens, copy)
    with open(copy / "train-00003.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(DataError, match=r"train-00003.bin is missing or not \d+ bytes long \(10 bytes"):
        open_token_split(copy, "train", paths.tokenizer)
    (copy / "train-00001.bin").unlink()
    with pytest.raises(DataError, match=r"train-00001.bin is missing .*\(missing"):
        open_token_split(copy, "train", paths.tokenizer)
    made_with = train.read_tokenizer_info(paths.tokenizer).fingerprint
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "another"}))
    with pytest.raises(FingerprintMismatch, match=f"made with tokenizer another, but the tokenizer in use is {made_with}"):
        open_token_split(copy, "train", paths.tokenizer)


@pytest.mark.slow
def test_unreadable_shard_on_ray_is_the_local_engines_error(
        project: tuple[Paths, dict[str, list[str]]], tmp_path: Path, ray_cluster: object,
        caplog: pytest.LogCaptureFixture) -> None:
    paths, _ = project
    broken = Paths(tmp_path)
    shutil.copytree(paths.split, broken.split)
    shutil.copytree(paths.tokenizer, broken.tokenizer)
    bad = broken.split / "train" / "part-00002.parquet"
    bad.write_bytes(b"not parquet")
    with engine.use(engine.EngineConfig(kind="ray")), pytest.raises(DataError) as err, \
            caplog.at_level(logging.INFO, logger=shards.__name__):
        tokenize(broken, layout="sharded")
    assert "tokenize on Ray" in caplog.text
    assert str(err.value).startswith(f"{bad}: not a readable parquet file") and "\n" not in str(err.value)
    assert not broken.tokens.exists()
