"""Language-modelling quality: loss, perplexity and bits per byte of a model on token streams.

- ``loss``: mean next-token cross-entropy in nats; ``perplexity`` = exp(loss).
- ``bpb`` (bits per byte): total nats / ln 2 / UTF-8 bytes of the text behind the scored tokens.
  Unlike loss per token it does not depend on the tokenizer, so models with different vocabularies
  (or numbers from other papers, e.g. on WikiText-2) compare (as The Pile, Gao et al. 2020, reports it).

Windows: with ``stride = block_size`` the stream is cut into non-overlapping windows, each token
predicted from the tokens before it in its window (what the training val loss does). A smaller
stride slides the window and scores only its last ``stride`` tokens, so every token gets at least
``block_size - stride`` tokens of context (the usual sliding-window perplexity).

Token splits come from ``data/tokens/`` (refused with FingerprintMismatch if made by another
tokenizer); eval files are tokenized here like the tokenize stage does (EOS after each document).
A model whose config.json records another tokenizer than ``artifacts/tokenizer/`` is refused
with FingerprintMismatch before anything is scored.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.errors import DataError, FingerprintMismatch
from lmpipe.io import jsonl_objects
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.model.io import load_model, read_model_config

log = logging.getLogger(__name__)


def check_model_tokenizer(model_dir: Path, fingerprint: str) -> dict[str, Any]:
    """config.json of ``model_dir`` after checking its tokenizer fingerprint equals ``fingerprint``.

    Raises FingerprintMismatch (another tokenizer, or none recorded), DataError (not a model).
    """
    config = read_model_config(model_dir)
    recorded = config.get("tokenizer_fingerprint")
    if recorded != fingerprint:
        what = f"tokenizer {str(recorded)[:12]}" if recorded else "no tokenizer fingerprint"
        raise FingerprintMismatch(
            f"{model_dir / 'config.json'}: the model records {what}, but artifacts/tokenizer is tokenizer "
            f"{fingerprint[:12]}: its scores would be meaningless; evaluate models trained with this tokenizer "
            "(re-run their stages) or remove it from evaluate.models")
    return config


def load_checked(model_dir: Path, fingerprint: str, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """Load a GPT for evaluation (eval mode, on ``device``) after the tokenizer check."""
    check_model_tokenizer(model_dir, fingerprint)
    return load_model(model_dir, device)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU that supports it when precision is auto or bf16-mixed, else nothing."""
    if device.type == "cuda" and precision != "32-true" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def windows(n_tokens: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(context start, first scored target index, end) of each window: the input is
    tokens[start:end], targets tokens[start+1:end+1], of which those with index > first count."""
    if n_tokens < 2:
        return []
    stride = min(stride, block)
    out = []
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + stride, n_tokens - 1)
        out.append((max(0, end - block), begin, end))
    return out


@torch.no_grad()
def score_tokens(model: GPT, tokens: np.ndarray, n_bytes: float | None, *, stride: int | None = None,
                 batch_size: int = 16, device: torch.device | str = "cpu", precision: str = "auto") -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on the token stream.

    ``n_bytes`` is the UTF-8 size of the text behind ``tokens`` (None: no bits per byte).
    """
    device = torch.device(device)
    block = model.config.block_size
    spans = windows(len(tokens), block, stride or block)
    if not spans:
        raise DataError(f"{len(tokens)} tokens: nothing to score (need at least 2)")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    model.eval()
    with autocast_for(device, precision):
        for first in range(0, len(spans), batch_size):
            group = spans[first:first + batch_size]
            width = max(end - start for start, _, end in group)
            idx = torch.zeros((len(group), width), dtype=torch.long)
            target = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
            for row, (start, begin, end) in enumerate(group):
                chunk = torch.from_numpy(tokens[start:end + 1].astype(np.int64))
                idx[row, :end - start] = chunk[:-1]
                scored = chunk[1:].clone()
                scored[: begin - start] = IGNORE_INDEX  # context only: scored by an earlier window
                target[row, :end - start] = scored
            logits, _ = model(idx.to(device))
            target = target.to(device)
            total += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").double()
            count += int((target != IGNORE_INDEX).sum())
    loss = float(total) / max(count, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}
    if n_bytes:
        # Every token after the first is scored, so the scored share of the bytes is count / (n - 1).
        scored_bytes = n_bytes * count / max(len(tokens) - 1, 1)
        out["bpb"] = float(total) / math.log(2) / scored_bytes
    return out


def split_stream(tokens_dir: Path, split: str, fingerprint: str, max_tokens: int) -> tuple[np.ndarray, float | None]:
    """The first ``max_tokens`` ids of a tokenized split and the bytes of text behind them.

    Bytes come from meta.json; for a prefix they are prorated by tokens (exact for the whole split).
    Raises FingerprintMismatch for shards of another tokenizer, DataError for missing ones.
    """
    from lmpipe.tokenizer.shards import TokenShardReader

    reader = TokenShardReader(tokens_dir, fingerprint)
    tokens = reader.tokens(split)
    n_bytes = reader.meta["splits"][split].get("bytes")
    if len(tokens) > max_tokens:
        n_bytes = n_bytes * max_tokens / len(tokens) if n_bytes else None
        tokens = tokens[:max_tokens]
    return np.asarray(tokens), float(n_bytes) if n_bytes else None


def read_documents(path: Path, fmt: str, text_field: str) -> list[str]:
    """Documents of an eval file: non-empty lines (text) or a field of each JSON line (jsonl).

    Raises DataError naming the file and line for a missing file, bad JSON or a missing field.
    """
    if not path.is_file():
        raise DataError("eval file not found (paths are relative to the project root)", path=str(path))
    docs = []
    if fmt == "text":
        with open(path, encoding="utf-8") as handle:
            docs = [line.rstrip("\n") for line in handle if line.strip()]
    else:
        for line_no, value in jsonl_objects(path):
            text = value.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"no text field {text_field!r} (set text_field)", path=str(path), line=line_no)
            if text:
                docs.append(text)
    if not docs:
        raise DataError("eval file has no documents", path=str(path))
    return docs


def file_stream(docs: list[str], sp: Any, eos_id: int, max_tokens: int) -> tuple[np.ndarray, float]:
    """EOS, then each document's ids and an EOS (as the tokenize stage lays documents out), for
    whole documents up to ``max_tokens``; returns the ids and the exact UTF-8 bytes behind them."""
    ids: list[int] = [eos_id]
    n_bytes = 0
    for doc, encoded in zip(docs, sp.encode(docs), strict=True):
        if len(ids) > 1 and len(ids) + len(encoded) + 1 > max_tokens:
            break
        ids.extend(encoded)
        ids.append(eos_id)
        n_bytes += len(doc.encode("utf-8"))
    return np.asarray(ids[:max_tokens], dtype=np.int64), float(n_bytes)
