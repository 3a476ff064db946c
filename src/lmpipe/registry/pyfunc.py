"""The MLflow pyfunc model of an lmpipe GPT: text generation, chat replies or classification.

This file is logged as MLflow "models from code" (``mlflow.pyfunc.log_model(python_model=<this
file>)``): MLflow copies it into the model and runs it on load, so nothing is pickled. It imports
torch, safetensors, sentencepiece, pandas and mlflow, never ``lmpipe``; the model definition comes
from ``lmpipe_gpt.py``, a copy of ``lmpipe/model/gpt.py`` (plain PyTorch, no project imports)
logged as the model's ``code_paths``. A logged model therefore loads and serves anywhere those
libraries are installed, without this repository's training code.

Artifacts (logged next to the code):
- ``weights``: ``model.safetensors`` (raw tensors, never unpickled);
- ``config``: the model's ``config.json`` (GPTConfig under ``model``, eos/pad ids, and the chat
  template or the classifier's labels and pooling);
- ``tokenizer``: the sentencepiece ``tokenizer.model``, checked against the fingerprint in config.json;
- ``head`` (classifiers and token classifiers only): ``head.safetensors``.

Kinds, chosen from config.json:
- ``generate``: column ``prompt`` -> ``text`` (the continuation) and ``num_tokens``. The prompt is
  encoded after an EOS, as every pretraining document started.
- ``chat``: column ``prompt`` (the user's turn, optional ``system``) -> the assistant's reply,
  rendered with the recorded template and stopped at ``<|end|>`` or EOS.
- ``classify``: column ``text`` -> ``label`` and ``score`` (its softmax probability); the input is
  ``<eos> text <eos>`` pooled as in training (last, mean or first token), on a causal decoder or a
  masked-LM encoder: classification needs no generation.
- ``tag`` (token classification): column ``text`` -> ``spans``, a list of {text, label, start, end}
  per entity (character offsets into the input, end exclusive). The text is split into words and
  punctuation marks (:data:`WORD_PATTERN`), each word tagged at the piece it was trained on.
Generation params: ``max_new_tokens``, ``temperature`` (0: greedy, the default, so a served
model answers deterministically), ``top_k`` (0: off), ``top_p`` (1: off), ``seed``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlflow
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema, TensorSpec

GPT_MODULE = "lmpipe_gpt"  # the name of gpt.py's copy in the model's code_paths
WEIGHTS, CONFIG, TOKENIZER, HEAD = "weights", "config", "tokenizer", "head"
KINDS = ("generate", "chat", "classify", "tag")
# The words of a text for a token classifier: runs of word characters, each punctuation mark
# alone (CoNLL-2003's tokens and the embedded default's entity documents are split this way).
WORD_PATTERN = r"\w+|[^\w\s]"


def model_kind(config: dict[str, Any]) -> str:
    """``tag``, ``classify``, ``chat`` or ``generate`` for a model's config.json contents."""
    if isinstance(config.get("classifier"), dict):
        return "tag" if config["classifier"].get("level") == "token" else "classify"
    if isinstance(config.get("chat_template"), dict):
        return "chat"
    return "generate"


def signature_for(kind: str, max_new_tokens: int = 64) -> ModelSignature:
    """Input/output schema (and generation params with their defaults) of a model kind."""
    if kind == "classify":
        return ModelSignature(
            inputs=Schema([ColSpec("string", "text")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
        )
    if kind == "tag":
        span = Object([Property("text", "string"), Property("label", "string"), Property("start", "long"),
                       Property("end", "long")])
        return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema([ColSpec(Array(span), "spans")]))
    inputs: list[ColSpec | TensorSpec] = [ColSpec("string", "prompt")]
    if kind == "chat":
        inputs.append(ColSpec("string", "system", required=False))
    params = ParamSchema([
        ParamSpec("max_new_tokens", "long", max_new_tokens),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("top_k", "long", 0),
        ParamSpec("top_p", "double", 1.0),
        ParamSpec("seed", "long", 0),
    ])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("string", "text"), ColSpec("long", "num_tokens")]),
                          params=params)


def _load_gpt_module() -> Any:
    """The model definition logged in this model's ``code_paths``.

    MLflow puts the code directory first on ``sys.path`` just before ``load_context``; the module
    is loaded from there under a name of its own, so two models loaded in one process never share
    a cached module (their code may differ).
    """
    import importlib.machinery
    import importlib.util
    import sys
    import uuid

    spec = importlib.machinery.PathFinder.find_spec(GPT_MODULE, sys.path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{GPT_MODULE}.py is missing from the model's code_paths")
    name = f"{GPT_MODULE}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, spec.origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LmpipeModel(PythonModel):
    """Loads the artifacts in :meth:`load_context`; :meth:`predict` answers one row at a time
    (rows differ in length, and one row needs neither padding nor an attention mask)."""

    def load_context(self, context: Any) -> None:
        import sentencepiece as spm
        import torch
        from safetensors.torch import load_file

        gpt = _load_gpt_module()
        artifacts = context.artifacts
        with open(artifacts[CONFIG], encoding="utf-8") as handle:
            self.config: dict[str, Any] = json.load(handle)
        expected = self.config.get("tokenizer_fingerprint")
        if expected and _sha256(artifacts[TOKENIZER]) != expected:
            raise ValueError(f"tokenizer artifact does not match the model's tokenizer fingerprint {expected[:12]}")
        self.sp = spm.SentencePieceProcessor(model_file=artifacts[TOKENIZER])
        device = (context.model_config or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        cfg = gpt.GPTConfig.from_dict(self.config["model"])
        model = gpt.GPT(cfg)
        state = load_file(artifacts[WEIGHTS])
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if cfg.tie_weights else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(f"weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.model = model.to(self.device).eval()
        self.kind = model_kind(self.config)
        self.eos_id = int(self.config.get("eos_id", self.sp.eos_id()))
        if self.kind in ("classify", "tag"):
            spec = self.config["classifier"]
            self.labels = [str(label) for label in spec["labels"]]
            self.pooling = spec.get("pooling", "last")
            head = load_file(artifacts[HEAD])
            self.head = torch.nn.Linear(cfg.n_embd, len(self.labels))
            self.head.load_state_dict(head)
            self.head.to(self.device).eval()
            self.max_length = int((self.config.get("finetune") or {}).get("max_length") or cfg.block_size)
        elif cfg.bidirectional:
            raise ValueError("a bidirectional (masked-LM) model cannot generate text; serve a classifier on it")

    # ------------------------------------------------------------------------------ predict

    # A DataFrame hint: MLflow infers no schema from it, so the signature logged with the model
    # (named columns, generation params) is the one enforced.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if self.kind == "classify":
            return pd.DataFrame([self._classify(str(text)) for text in _column(frame, "text")],
                                columns=["label", "score"])
        if self.kind == "tag":
            return pd.DataFrame({"spans": [self._tag(str(text)) for text in _column(frame, "text")]})
        params = params or {}
        systems = frame["system"].tolist() if "system" in frame.columns else [None] * len(frame)
        rows = [self._generate(str(prompt), system if isinstance(system, str) and system else None, params)
                for prompt, system in zip(_column(frame, "prompt"), systems, strict=True)]
        return pd.DataFrame(rows, columns=["text", "num_tokens"])

    def _prompt_ids(self, prompt: str, system: str | None) -> tuple[list[int], list[int]]:
        """(prompt ids, stop ids) for this model's kind."""
        if self.kind == "chat":
            template = self.config["chat_template"]
            roles = {k: int(v) for k, v in template["role_ids"].items()}
            end_id, eos_id = int(template["end_id"]), int(template["eos_id"])
            ids = [eos_id]
            if system:
                ids += [roles["system"], *self.sp.encode(system), end_id]
            ids += [roles["user"], *self.sp.encode(prompt), end_id, roles["assistant"]]
            return ids, [end_id, eos_id]
        return [self.eos_id, *self.sp.encode(prompt)], [self.eos_id]

    def _generate(self, prompt: str, system: str | None, params: dict[str, Any]) -> tuple[str, int]:
        import torch

        ids, stops = self._prompt_ids(prompt, system)
        max_new_tokens, temperature = int(params.get("max_new_tokens", 64)), float(params.get("temperature", 0.0))
        top_k, top_p = int(params.get("top_k", 0)), float(params.get("top_p", 1.0))
        if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("params: max_new_tokens, temperature and top_k must be >= 0 and top_p in (0, 1]")
        generator = torch.Generator(device=self.device).manual_seed(int(params.get("seed", 0)))
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model.generate(
            idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
            top_p=top_p if top_p < 1.0 else None, stop_tokens=stops, generator=generator,
        )
        new = out[0, len(ids):].tolist()
        for stop in stops:
            if stop in new:
                new = new[:new.index(stop)]
        return str(self.sp.decode(new)), len(new)

    def _final_states(self, ids: list[int]) -> Any:
        """(T, n_embd) output of the model's final norm for one row of ids, under no_grad: what
        the heads of classifiers and token classifiers read."""
        import torch

        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.model.hidden_states(idx)[0]  # one row, so no padding to mask

    def _classify(self, text: str) -> tuple[str, float]:
        import torch

        ids = [self.eos_id, *list(self.sp.encode(text))[: self.max_length - 2], self.eos_id]
        hidden = self._final_states(ids)
        with torch.no_grad():
            pooled = {"last": hidden[-1], "first": hidden[0]}.get(self.pooling, hidden.mean(0))
            probs = self.head(pooled).float().softmax(-1)
        best = int(probs.argmax())
        return self.labels[best], float(probs[best])

    def _tag(self, text: str) -> list[dict[str, Any]]:
        """The entities of ``text`` as {text, label, start, end} (character offsets, end exclusive).

        Words are encoded one by one after an EOS and each is tagged at its first or last piece
        (config.json's ``label_piece``), in windows of the model's length split between words, as
        in training."""
        import re

        words = [(m.start(), m.end()) for m in re.finditer(WORD_PATTERN, text)]
        last = self.config["classifier"].get("label_piece", "first") == "last"
        tags: list[str] = []
        ids, positions = [self.eos_id], []
        for start, end in words:
            pieces = (list(self.sp.encode(text[start:end])) or [self.sp.unk_id()])[: self.max_length - 1]
            if positions and len(ids) + len(pieces) > self.max_length:
                tags += self._window_tags(ids, positions)
                ids, positions = [self.eos_id], []
            first = len(ids)
            ids.extend(pieces)
            positions.append(len(ids) - 1 if last else first)
        if positions:
            tags += self._window_tags(ids, positions)
        return [{"text": text[words[first][0]:words[final][1]], "label": label, "start": words[first][0],
                 "end": words[final][1]} for label, first, final in _entity_spans(tags)]

    def _window_tags(self, ids: list[int], positions: list[int]) -> list[str]:
        import torch

        with torch.no_grad():
            predicted = self.head(self._final_states(ids)[positions]).argmax(-1).tolist()
        return [self.labels[p] for p in predicted]


def _entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in IOB2 tags, read as conlleval and seqeval's
    default mode read them (what the model was scored with): B-X opens an entity, I-X continues
    one of type X and otherwise opens one."""
    spans: list[tuple[str, int, int]] = []
    current: list[Any] | None = None  # [type, first, last]
    for i, tag in enumerate(tags):
        prefix, kind = tag[:2], tag[2:]
        if prefix == "I-" and current is not None and current[0] == kind:
            current[2] = i
            continue
        if current is not None:
            spans.append((current[0], current[1], current[2]))
        current = [kind, i, i] if prefix in ("B-", "I-") else None
    if current is not None:
        spans.append((current[0], current[1], current[2]))
    return spans


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    if name in frame.columns:
        return frame[name].tolist()
    if len(frame.columns) == 1:  # a bare list of strings arrives as one unnamed column
        return frame.iloc[:, 0].tolist()
    raise ValueError(f"input needs a '{name}' column (got {', '.join(map(str, frame.columns))})")


# MLflow runs this file as a module of its own (models from code) and takes the model set here;
# imported as part of the lmpipe package (for the constants above), it sets nothing.
if not __name__.startswith("lmpipe."):
    mlflow.models.set_model(LmpipeModel())
