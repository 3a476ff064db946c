"""Builders for the evaluate tests: a tiny project with split data (labelled reviews and
instruction pairs), a real sentencepiece tokenizer and token shards made by their stages, and
random-init models saved as the pipeline's stages save them (LM, classifier, instruction model)."""

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
from lmpipe.tokenizer import shards as tokenize_stage
from lmpipe.tokenizer import train as tokenizer_stage
from lmpipe.tokenizer.config import TokenizeConfig, TokenizerConfig

WORDS = ["the", "movie", "was", "a", "story", "with", "some", "scenes", "and", "acting", "plot", "really"]
GOOD, BAD = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "boring"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("open", "closed"), ("wet", "dry")]


def document(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    if i % 2:
        word, answer = rng.choice(OPPOSITES)
        text = f"Instruction: Opposite?\nInput: {word}\nAnswer: {answer}."
        return text, {"kind": "instruction", "instruction": "Opposite?", "input": word, "output": f"{answer}."}
    label = rng.choice(["positive", "negative"])
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
    words.insert(rng.randrange(len(words)), rng.choice(GOOD if label == "positive" else BAD))
    return " ".join(words) + ".", {"kind": "review", "label": label}


def write_split(paths: Paths, split: str, n_docs: int, seed: int) -> None:
    rng = random.Random(seed)
    docs = [document(rng, i) for i in range(n_docs)]
    writer = ShardWriter(paths.split / split, shard_docs=1000)
    texts = [t for t, _ in docs]
    writer.write(pa.table({"id": [doc_id(f"{split}{i}:{t}") for i, t in enumerate(texts)], "text": texts,
                           "source": ["synthetic"] * len(docs), "meta": [json.dumps(m) for _, m in docs]}))
    writer.close()


def save_gpt(directory: Path, fingerprint: str, seed: int = 0, extra: dict[str, Any] | None = None,
             **shape: Any) -> GPT:
    """A random GPT (vocabulary 300, block 32) saved like a pipeline stage saves it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"vocab_size": 300, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **shape}))
    save_model(model, directory, extra={"tokenizer_fingerprint": fingerprint, "eos_id": 2, "objective": "clm",
                                        **(extra or {})})
    write_manifest(directory, stage="test", config={"seed": seed})
    return model


def save_classifier(directory: Path, fingerprint: str) -> None:
    from lmpipe.model.classifier import HEAD_FILE, ClassificationModel, head_bytes

    backbone = save_gpt(directory, fingerprint, seed=3, extra={"classifier": {
        "labels": ["negative", "positive"], "pooling": "last", "head_file": HEAD_FILE}})
    head = ClassificationModel(backbone, 2, "last", 0.0)
    (directory / HEAD_FILE).write_bytes(head_bytes(head))


def make_eval_project(root: Path) -> tuple[Paths, str]:
    """Split data, tokenizer (vocabulary 300), token shards, and models: teacher (4 blocks), student
    and baseline (1 block), a classifier and an instruction model. Returns (paths, fingerprint)."""
    paths = Paths(root)
    for split, n_docs, seed in (("train", 300, 1), ("val", 80, 2), ("test", 40, 3)):
        write_split(paths, split, n_docs, seed)
    tokenizer_stage.run(TokenizerConfig.model_validate({"vocab_size": 300, "num_threads": 1}), paths)
    tokenize_stage.run(TokenizeConfig.model_validate({"workers": 1}), paths)
    fingerprint = tokenizer_stage.read_tokenizer_info(paths.tokenizer).fingerprint
    save_gpt(paths.models / "pretrain", fingerprint, n_layer=4)
    save_gpt(paths.models / "distill", fingerprint, seed=1, n_layer=1)
    save_gpt(paths.models / "distill_baseline", fingerprint, seed=2, n_layer=1)
    save_classifier(paths.models / "finetune" / "cls", fingerprint)
    save_gpt(paths.models / "finetune" / "sft", fingerprint, seed=4)
    return paths, fingerprint
