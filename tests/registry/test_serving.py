"""Registered models load and serve without this repository: pyfunc "models from code" with
safetensors weights, loaded by alias in a process where ``import lmpipe`` fails, served by
``mlflow models serve``, and answering exactly what the lmpipe model computes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml

from lmpipe.config import Paths
from lmpipe.model.classifier import load_classifier
from lmpipe.model.io import load_model
from lmpipe.registry import register
from lmpipe.registry.config import RegisterConfig
from lmpipe.tokenizer.train import load_tokenizer
from lmpipe.train.finetune.classify import TextEncoder
from lmpipe.train.finetune.sft import ChatTemplate, Message, generate_reply

PROMPT = "the river"
REVIEW = "a great funny film"
# Installed first on sys.path of the child processes: any import of lmpipe fails there.
NO_LMPIPE = '''
import importlib.abc, sys

class _NoLmpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lmpipe" or name.startswith("lmpipe."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: a served model must not need it)")
        return None

sys.meta_path.insert(0, _NoLmpipe())
'''
LOAD_AND_PREDICT = '''
import json, sys
try:
    import lmpipe
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("lmpipe is importable here: this check would prove nothing")
import mlflow, pandas as pd
out = {}
for key, (uri, records, params) in json.loads(sys.argv[1]).items():
    model = mlflow.pyfunc.load_model(uri)
    out[key] = model.predict(pd.DataFrame(records), params=params).to_dict(orient="records")
assert not [m for m in sys.modules if m.split(".")[0] == "lmpipe"]
print("RESULT" + json.dumps(out))
'''


@dataclass
class Served:
    paths: Paths
    uri: str
    env: dict[str, str]
    models: Any


@pytest.fixture(scope="module")
def served(tokenizer_project: Path, _store_uri: str, tmp_path_factory: pytest.TempPathFactory,
           models: Any, one_thread_module: None) -> Iterator[Served]:
    """Pretrain, chat and classifier models registered (and promoted) under the prefix ``srv``; the
    classifier is BERT-style, a masked-LM encoder pooled at its first token (serving it needs no
    generation)."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(tokenizer_project / "artifacts", root / "artifacts")
    shutil.copytree(tokenizer_project / "data" / "tokens", root / "data" / "tokens")  # the gate's unigram floor
    paths = Paths(root)
    models.pretrain(paths, seed=0, val_bpb=1.2)
    models.chat(paths)
    models.classifier(paths, pooling="first", bidirectional=True)
    hidden = root / "no-lmpipe"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(NO_LMPIPE)
    # The venv's bin first on PATH (as when it is activated): `mlflow models serve` starts uvicorn from there.
    env = {**os.environ, "MLFLOW_TRACKING_URI": _store_uri, "PYTHONPATH": str(hidden), "OMP_NUM_THREADS": "1",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", _store_uri)
        patch.delenv("LMPIPE_PARENT_RUN_ID", raising=False)
        mlflow.set_tracking_uri(_store_uri)
        # the defaults minus the distilled student, which is served exactly like the pretrained GPT
        cfg = RegisterConfig(name_prefix="srv", models=[m for m in RegisterConfig().models if m.stage != "distill"])
        summary = register.run(cfg, paths)
        assert summary["promoted"] == 3
        yield Served(paths, _store_uri, env, models)


def expected_reply(paths: Paths, prompt: str, max_new_tokens: int) -> str:
    model, _ = load_model(paths.models / "finetune" / "sft")
    sp, info = load_tokenizer(paths.tokenizer)
    return generate_reply(model, ChatTemplate.from_tokenizer(sp, info), [Message("user", prompt)], max_new_tokens)


def expected_label(paths: Paths, text: str) -> tuple[str, float]:
    model, labels, _ = load_classifier(paths.models / "finetune" / "cls")
    sp, info = load_tokenizer(paths.tokenizer)
    ids = torch.from_numpy(TextEncoder(sp, info.eos_id, 32)(text))[None]
    with torch.no_grad():
        probs = model(ids, torch.tensor([ids.shape[1]]))[0].softmax(-1)
    return labels[int(probs.argmax())], float(probs.max())


@pytest.mark.slow
def test_models_load_by_alias_and_predict_without_lmpipe(served: Served) -> None:
    requests = {
        "greedy": ["models:/srv-pretrain@champion", [{"prompt": PROMPT}], {"max_new_tokens": 6}],
        "sampled": ["models:/srv-pretrain@champion", [{"prompt": PROMPT}],
                    {"max_new_tokens": 6, "temperature": 1.0, "top_k": 20, "seed": 7}],
        "chat": ["models:/srv-finetune-sft@champion", [{"prompt": PROMPT}], {"max_new_tokens": 6}],
        "classify": ["models:/srv-finetune-cls@champion", [{"text": REVIEW}, {"text": PROMPT}], None],
    }
    done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, json.dumps(requests)], env=served.env,
                          cwd=served.paths.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    paths = served.paths
    assert result["greedy"][0]["text"] == served.models.generation(paths, PROMPT, 6, temperature=0.0)
    assert result["sampled"][0]["text"] == served.models.generation(
        paths, PROMPT, 6, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7))
    assert result["sampled"][0]["num_tokens"] <= 6
    assert result["chat"][0]["text"] == expected_reply(paths, PROMPT, 6)
    for row, text in zip(result["classify"], [REVIEW, PROMPT], strict=True):
        label, score = expected_label(paths, text)
        assert row["label"] == label and row["score"] == pytest.approx(score, abs=1e-6)


def test_logged_model_is_code_and_safetensors_with_signature_and_example(served: Served, tmp_path: Path) -> None:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/srv-pretrain@champion", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc.py") and "python_model" not in flavor
    assert (local / "code" / "lmpipe_gpt.py").is_file()
    names = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.model", "input_example.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))], names
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [c["name"] for c in inputs] == ["prompt"]
    assert {p["name"] for p in json.loads(mlmodel["signature"]["params"])} >= {"max_new_tokens", "temperature", "seed"}
    code = (local / "pyfunc.py").read_text() if (local / "pyfunc.py").is_file() else ""
    assert code and "import lmpipe" not in code and "from lmpipe" not in code


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_generation_request(served: Served, free_port: int, tmp_path: Path,
                                                            servers: Any) -> None:
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/srv-pretrain@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(free_port), "-w", "1"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, env=served.env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        servers.wait_ok(proc, f"http://127.0.0.1:{free_port}/ping", log, "mlflow models serve")
        body = json.dumps({"dataframe_records": [{"prompt": PROMPT}, {"prompt": ""}],
                           "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{free_port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        servers.stop(proc)
    assert [p["text"] for p in predictions] == [served.models.generation(served.paths, PROMPT, 5, temperature=0.0),
                                                served.models.generation(served.paths, "", 5, temperature=0.0)]
    assert "hidden: a served model must not need it" not in log.read_text()
