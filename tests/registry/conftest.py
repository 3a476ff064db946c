"""A tiny project for registry tests: a sentencepiece tokenizer trained on generated text, the
splits tokenized by the tokenize stage (the gate's unigram floor), tiny random-init GPTs saved as
pretrain / chat / classifier model directories with manifests, and metrics files.

Helpers reach tests as fixtures (``models``, ``free_port``), never by importing this module."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save as save_safetensors

from lmpipe.config import Paths
from lmpipe.data.shards import ShardWriter, doc_id
from lmpipe.io import write_bytes, write_json, write_manifest
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import save_model
from lmpipe.tokenizer import shards as tokenize_stage
from lmpipe.tokenizer import train as tokenizer_train
from lmpipe.tokenizer.config import TokenizeConfig, TokenizerConfig
from lmpipe.tokenizer.train import load_tokenizer
from lmpipe.train.finetune.sft import ChatTemplate

WORDS = ["the", "river", "stone", "quiet", "morning", "village", "baker", "bread", "warm", "window", "rain",
         "garden", "children", "laughed", "market", "story", "film", "great", "boring", "funny", "cast"]
LABELS = ["negative", "positive"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                      for _ in range(rng.randint(1, 3))) for _ in range(n)]


def make_tokenizer(root: Path) -> Paths:
    """Train a 300-piece tokenizer on generated text into ``root/artifacts/tokenizer`` and
    tokenize the splits into ``root/data/tokens``."""
    for split, n, seed in (("train", 200, 0), ("val", 20, 1), ("test", 10, 2)):
        docs = _docs(n, seed)
        writer = ShardWriter(root / "data" / "split" / split, shard_docs=100)
        writer.write(pa.table({"id": [doc_id(d) for d in docs], "text": docs,
                               "source": ["t"] * n, "meta": ["{}"] * n}))
        writer.close()
    paths = Paths(root)
    tokenizer_train.run(TokenizerConfig.model_validate({"vocab_size": 300, "num_threads": 1}), paths)
    tokenize_stage.run(TokenizeConfig.model_validate({"workers": 1}), paths)
    return paths


def seal(directory: Path, stage: str) -> None:
    """The manifest a training stage writes last into its model directory."""
    write_manifest(directory, stage=stage, config={"test": True})


def tiny_gpt(vocab_size: int, seed: int = 0, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    values = {"vocab_size": vocab_size, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides}
    return GPT(GPTConfig(**values)).eval()


def save_pretrain(paths: Paths, seed: int, val_bpb: float | None, **overrides: Any) -> GPT:
    """A random-init GPT in models/pretrain with ``val_bpb`` in metrics/pretrain.json (None: key absent)."""
    sp, info = load_tokenizer(paths.tokenizer)
    model = tiny_gpt(sp.vocab_size(), seed, **overrides)
    save_model(model, paths.models / "pretrain", extra={"tokenizer_fingerprint": info.fingerprint,
                                                        "eos_id": info.eos_id, "objective": "clm"})
    seal(paths.models / "pretrain", "pretrain")
    write_json(paths.metrics / "pretrain.json", {} if val_bpb is None else {"val_bpb": val_bpb})
    return model


def save_chat(paths: Paths, seed: int = 1) -> GPT:
    sp, info = load_tokenizer(paths.tokenizer)
    model = tiny_gpt(sp.vocab_size(), seed)
    template = ChatTemplate.from_tokenizer(sp, info)
    save_model(model, paths.models / "finetune" / "sft", extra={
        "tokenizer_fingerprint": info.fingerprint, "eos_id": info.eos_id, "pad_id": info.pad_id,
        "objective": "clm", "chat_template": template.describe()})
    seal(paths.models / "finetune" / "sft", "finetune")
    write_json(paths.metrics / "finetune_sft.json", {"dev_loss": 2.5})  # below the unigram floor (~3.0)
    return model


def save_classifier(paths: Paths, seed: int = 2, accuracy: float = 0.8, majority: float = 0.5,
                    head_outputs: int | None = None, pooling: str = "last",
                    bidirectional: bool = False) -> tuple[GPT, torch.nn.Linear]:
    """A classifier in models/finetune/cls, on a causal or (``bidirectional``) masked-LM backbone;
    ``head_outputs`` other than the label count makes a head that does not fit its labels (the
    model loads in lmpipe but not as a served model)."""
    sp, info = load_tokenizer(paths.tokenizer)
    model = tiny_gpt(sp.vocab_size(), seed, bidirectional=bidirectional)
    torch.manual_seed(seed + 100)
    head = torch.nn.Linear(model.config.n_embd, head_outputs or len(LABELS))
    directory = paths.models / "finetune" / "cls"
    write_bytes(directory / "head.safetensors", save_safetensors(
        {k: v.contiguous() for k, v in head.state_dict().items()}, metadata={"pooling": "last"}))
    save_model(model, directory, extra={
        "tokenizer_fingerprint": info.fingerprint, "eos_id": info.eos_id, "pad_id": info.pad_id,
        "objective": "mlm" if bidirectional else "clm",
        "classifier": {"labels": LABELS, "pooling": pooling, "head_file": "head.safetensors"},
        "finetune": {"task": "cls", "max_length": 32}})
    seal(directory, "finetune")
    write_json(paths.metrics / "finetune_cls.json", {"test_accuracy": accuracy, "test_majority_accuracy": majority})
    return model, head


def lmpipe_generation(paths: Paths, prompt: str, max_new_tokens: int, **sampling: Any) -> str:
    """What models/pretrain continues ``prompt`` with, computed by lmpipe itself: the reference a
    served model must reproduce (EOS first, as in pretraining; stop at EOS)."""
    from lmpipe.model.io import load_model

    model, config = load_model(paths.models / "pretrain")
    sp, _ = load_tokenizer(paths.tokenizer)
    eos = config["eos_id"]
    ids = [eos, *sp.encode(prompt)]
    out = model.generate(torch.tensor([ids]), max_new_tokens, stop_tokens=[eos], **sampling)[0, len(ids):].tolist()
    return str(sp.decode(out[:out.index(eos)] if eos in out else out))


class ModelFactory:
    """Writes tiny random-init model directories and their metrics files into a project."""

    tiny_gpt = staticmethod(tiny_gpt)
    generation = staticmethod(lmpipe_generation)
    pretrain = staticmethod(save_pretrain)
    chat = staticmethod(save_chat)
    seal = staticmethod(seal)
    classifier = staticmethod(save_classifier)
    labels = LABELS


@pytest.fixture(scope="session")
def models() -> type[ModelFactory]:
    return ModelFactory


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return _free_port()


class Servers:
    """Start/wait/stop helpers for the server subprocesses (mlflow server, mlflow models serve)."""

    free_port = staticmethod(_free_port)

    @staticmethod
    def wait_ok(proc: subprocess.Popen[bytes], url: str, log: Path, what: str, timeout: float = 180.0) -> None:
        """Poll ``url`` until it answers 200; fail with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        """Stop the server and the workers it started (its own process group)."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def servers() -> type[Servers]:
    return Servers


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every registry test runs torch on one thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="session")
def tokenizer_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root holding only a trained tokenizer (copy it before writing models)."""
    root = tmp_path_factory.mktemp("registry-tokenizer")
    make_tokenizer(root)
    return root


@pytest.fixture
def project(tokenizer_project: Path, tmp_path: Path) -> Paths:
    """A fresh project root with the shared tokenizer (no models yet)."""
    import shutil

    shutil.copytree(tokenizer_project / "artifacts", tmp_path / "artifacts")
    shutil.copytree(tokenizer_project / "data" / "tokens", tmp_path / "data" / "tokens")
    return Paths(tmp_path)


@pytest.fixture(scope="session")
def _store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry-store') / 'mlflow.db'}"


@pytest.fixture
def sqlite_store(_store_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The registry tests' MLflow tracking + registry store (sqlite). Creating its tables takes
    seconds, so tests share one and keep apart by registered-model name prefixes."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store_uri)
    monkeypatch.delenv("LMPIPE_PARENT_RUN_ID", raising=False)
    mlflow.set_tracking_uri(_store_uri)
    yield _store_uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    if before:
        mlflow.set_tracking_uri(before)
