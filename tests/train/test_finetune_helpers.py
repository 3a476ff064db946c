"""Builders shared by the finetune tests: a tiny project with split data (instruction pairs and
labelled reviews, as the embedded default has them), a real sentencepiece tokenizer trained by the
tokenizer stage (vocabulary 300) and a random-init GPT saved as ``models/pretrain``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from lmpipe.config import Paths
from lmpipe.data.shards import ShardWriter, doc_id
from lmpipe.io import write_manifest
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import save_model
from lmpipe.tokenizer import train as tokenizer_stage
from lmpipe.tokenizer.config import TokenizerConfig
from lmpipe.train.finetune.config import FinetuneConfig

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
             ("light", "dark"), ("open", "closed"), ("loud", "quiet"), ("rich", "poor"), ("wet", "dry")]
GOOD = ["good", "great", "fun", "lovely", "bright", "charming", "superb"]
BAD = ["bad", "awful", "dull", "boring", "ugly", "poor", "terrible"]
FILLER = ["the", "movie", "was", "and", "a", "plot", "with", "some", "scenes", "really", "acting", "story"]


def instruction_doc(rng: random.Random) -> tuple[str, dict[str, Any]]:
    word, answer = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, answer = answer, word
    instruction = "Opposite?"
    text = f"Instruction: {instruction}\nInput: {word}\nAnswer: {answer}."
    return text, {"kind": "instruction", "instruction": instruction, "input": word, "output": f"{answer}."}


def review_doc(rng: random.Random) -> tuple[str, dict[str, Any]]:
    label = rng.choice(["positive", "negative"])
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label == "positive" else BAD))
    return " ".join(words), {"kind": "review", "label": label}


def write_split(paths: Paths, split: str, n_docs: int, seed: int) -> None:
    rng = random.Random(seed)
    docs = [instruction_doc(rng) if i % 2 else review_doc(rng) for i in range(n_docs)]
    writer = ShardWriter(paths.split / split, shard_docs=1000)
    texts = [t for t, _ in docs]
    writer.write(pa.table({"id": [doc_id(f"{i}:{t}") for i, t in enumerate(texts)], "text": texts,
                           "source": ["synthetic"] * len(docs), "meta": [json.dumps(m) for _, m in docs]}))
    writer.close()


def make_project(root: Path, *, n_train: int = 240, n_val: int = 60, n_test: int = 10) -> Paths:
    """Split data, a tokenizer (word pieces: the corpus supports ~370) and a random GPT (block 64,
    2 layers, width 32) in ``root``."""
    paths = Paths(root)
    write_split(paths, "train", n_train, 1)
    write_split(paths, "val", n_val, 2)
    write_split(paths, "test", n_test, 3)
    tokenizer_stage.run(TokenizerConfig.model_validate({"vocab_size": 512, "num_threads": 1}), paths)
    info = tokenizer_stage.read_tokenizer_info(paths.tokenizer)
    save_random_model(paths.models / "pretrain", info.vocab_size, info.fingerprint)
    return paths


def save_random_model(directory: Path, vocab_size: int, fingerprint: str, seed: int = 0, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": vocab_size, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                       **overrides})
    model = GPT(cfg)
    save_model(model, directory, extra={"tokenizer_fingerprint": fingerprint, "eos_id": 2, "objective": "clm"})
    write_manifest(directory, stage="pretrain", config={"test": True})
    return model


FAST = {"micro_batch_size": 8, "max_steps": 12, "eval_every": 4, "eval_batch_size": 32, "warmup_steps": 2,
        "log_every": 4, "checkpoint_every": 0, "progress": False, "accelerator": "cpu", "patience": 0}


def config(**tasks: dict[str, Any]) -> FinetuneConfig:
    """A finetune section with the given tasks, each merged over fast CPU settings."""
    return FinetuneConfig.model_validate({"tasks": {name: {**FAST, **spec} for name, spec in tasks.items()}})
