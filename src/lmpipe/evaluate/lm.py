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
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.data.sources import file_rows
from lmpipe.errors import DataError
from lmpipe.model.gpt import GPT, IGNORE_INDEX
from lmpipe.model.io import ExpectedTokenizer, load_model, read_model_config

log = logging.getLogger(__name__)


def expected_tokenizer(fingerprint: str) -> ExpectedTokenizer:
    """The tokenizer evaluated models must have been trained with (artifacts/tokenizer)."""
    return ExpectedTokenizer(fingerprint, "artifacts/tokenizer", "its scores would be meaningless; evaluate models "
                             "trained with this tokenizer (re-run their stages) or remove it from evaluate.models")


def check_model_tokenizer(model_dir: Path, fingerprint: str) -> dict[str, Any]:
    """config.json of ``model_dir`` after model loading's tokenizer check.

    Raises FingerprintMismatch (another tokenizer, or none recorded), DataError (not a model).
    """
    return read_model_config(model_dir, expected_tokenizer(fingerprint))


def load_checked(model_dir: Path, fingerprint: str, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """Load a GPT for evaluation (eval mode, on ``device``) after the tokenizer check."""
    return load_model(model_dir, device, tokenizer=expected_tokenizer(fingerprint))


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


@dataclass
class TokenGroups:
    """Which group (language) each position of a token stream belongs to, for per-group scores.

    ``ids[i]`` indexes ``names``; ``n_bytes[g]`` is the UTF-8 size of group g's text behind the
    stream and ``positions[g]`` how many positions of the stream it has (its tokens and EOS).
    """

    ids: np.ndarray
    names: list[str]
    n_bytes: np.ndarray
    positions: np.ndarray

    def prefix(self, n: int) -> TokenGroups:
        """The groups of the first ``n`` positions, bytes prorated by positions kept."""
        ids = self.ids[:n]
        positions = np.bincount(ids, minlength=len(self.names)).astype(np.float64)
        n_bytes = self.n_bytes * np.divide(positions, self.positions, out=np.zeros_like(positions),
                                           where=self.positions > 0)
        return TokenGroups(ids, self.names, n_bytes, positions)


@torch.no_grad()
def score_tokens(model: GPT, tokens: np.ndarray, n_bytes: float | None, *, stride: int | None = None,
                 batch_size: int = 16, device: torch.device | str = "cpu", precision: str = "auto",
                 groups: TokenGroups | None = None) -> dict[str, Any]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on the token stream.

    ``n_bytes`` is the UTF-8 size of the text behind ``tokens`` (None: no bits per byte). With
    ``groups`` (one per position of ``tokens``), ``by_language`` holds the same numbers per group,
    each target token counted in the group of its own position.
    """
    device = torch.device(device)
    block = model.config.block_size
    spans = windows(len(tokens), block, stride or block)
    if not spans:
        raise DataError(f"{len(tokens)} tokens: nothing to score (need at least 2)")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    n_groups = len(groups.names) if groups is not None else 0
    group_nats = torch.zeros(n_groups, dtype=torch.float64, device=device)
    group_count = torch.zeros(n_groups, dtype=torch.float64, device=device)
    group_ids = torch.from_numpy(groups.ids.astype(np.int64)) if groups is not None else None
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
            if group_ids is not None:
                each = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none").double()
                which = torch.zeros((len(group), width), dtype=torch.long)
                for row, (start, _, end) in enumerate(group):
                    which[row, :end - start] = group_ids[start + 1:end + 1]
                which = which.flatten().to(device)
                scored = (target.flatten() != IGNORE_INDEX).double()
                group_nats.index_add_(0, which, each * scored)
                group_count.index_add_(0, which, scored)
    loss = float(total) / max(count, 1)
    out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}
    if n_bytes:
        # Every token after the first is scored, so the scored share of the bytes is count / (n - 1).
        scored_bytes = n_bytes * count / max(len(tokens) - 1, 1)
        out["bpb"] = float(total) / math.log(2) / scored_bytes
    if groups is not None:
        targets = np.bincount(groups.ids[1:], minlength=n_groups)  # positions that can be targets
        out["by_language"] = {}
        for g, name in enumerate(groups.names):
            nats, scored_g = float(group_nats[g]), float(group_count[g])
            if scored_g == 0:
                continue
            part = {"loss": nats / scored_g, "tokens": scored_g}
            if groups.n_bytes[g] > 0:
                part["bpb"] = nats / math.log(2) / (groups.n_bytes[g] * scored_g / targets[g])
            out["by_language"][name] = part
    return out


def split_stream(tokens_dir: Path, split: str, fingerprint: str, max_tokens: int,
                 split_dir: Path | None = None) -> tuple[np.ndarray, float | None, TokenGroups | None]:
    """The first ``max_tokens`` ids of a tokenized split, the bytes of text behind them, and with
    ``split_dir`` (the split's documents) the language of each position (:func:`split_groups`).

    Bytes come from meta.json; for a prefix they are prorated by tokens (exact for the whole split).
    Raises FingerprintMismatch for shards of another tokenizer, DataError for missing ones.
    """
    from lmpipe.tokenizer.shards import TokenShardReader

    reader = TokenShardReader(tokens_dir, fingerprint)
    tokens = reader.tokens(split)
    n_bytes = reader.meta["splits"][split].get("bytes")
    groups = split_groups(split_dir, tokens, reader.eos_id) if split_dir is not None and split_dir.is_dir() else None
    if len(tokens) > max_tokens:
        n_bytes = n_bytes * max_tokens / len(tokens) if n_bytes else None
        tokens = tokens[:max_tokens]
        groups = groups.prefix(max_tokens) if groups is not None else None
    return np.asarray(tokens), float(n_bytes) if n_bytes else None, groups


def split_groups(split_dir: Path, tokens: np.ndarray, eos_id: int) -> TokenGroups | None:
    """The language of each position of a split's token stream, from the split's documents
    (``meta.lang``, which clean sets; ``und`` where missing), in the order the tokenize stage wrote
    them: each non-empty document's tokens, then EOS. None when the split has a single language,
    or when its documents do not line up with the stream (a warning)."""
    from lmpipe.data.shards import iter_shards

    langs: list[str] = []
    sizes: list[int] = []
    for _, table in iter_shards(split_dir):
        for text, meta in zip(table.column("text").to_pylist(), table.column("meta").to_pylist(), strict=True):
            if not text:
                continue
            try:
                lang = json.loads(meta or "{}").get("lang", "und")
            except (json.JSONDecodeError, AttributeError):
                lang = "und"
            langs.append(str(lang))
            sizes.append(len(text.encode("utf-8")))
    names = sorted(set(langs))
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    if len(names) < 2:
        return None
    if len(ends) != len(langs):
        log.warning("%s: %d documents but %d in the token stream: no bits per byte per language", split_dir,
                    len(langs), len(ends))
        return None
    code = {name: g for g, name in enumerate(names)}
    doc_group = np.array([code[lang] for lang in langs], np.int64)
    ids = doc_group[np.minimum(np.searchsorted(ends, np.arange(len(tokens))), len(langs) - 1)]
    n_bytes = np.bincount(doc_group, weights=np.asarray(sizes, np.float64), minlength=len(names))
    return TokenGroups(ids, names, n_bytes, np.bincount(ids, minlength=len(names)).astype(np.float64))


def read_documents(path: Path, fmt: str, text_field: str) -> list[str]:
    """Documents of an eval file (:func:`lmpipe.data.sources.file_rows`): each non-blank line
    without its line ending (text), or a field of each JSON line (jsonl); empty texts are skipped.

    Raises DataError naming the file and line for a missing file, bad JSON or a missing field.
    """
    if not path.is_file():
        raise DataError("eval file not found (paths are relative to the project root)", path=str(path))
    docs = []
    if fmt == "text":
        docs = [row.values["text"] for row in file_rows(path, "txt", txt_split="line")]
    else:
        for row in file_rows(path, fmt):
            text = row.values.get(text_field)
            if not isinstance(text, str):
                raise row.error(f"no text field {text_field!r} (set text_field)")
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
