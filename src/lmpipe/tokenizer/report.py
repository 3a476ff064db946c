"""What a trained tokenizer does to held-out text: compression, fallbacks, coverage, top tokens.

Measured on the val split (the train split if val is empty), capped at a byte budget:
- ``bytes_per_token``: UTF-8 bytes of text per token; higher is better compression and is what
  turns a loss per token into bits per byte.
- ``tokens_per_word``: tokens per whitespace-separated word ("fertility", Rust et al., 2021).
- ``unk_rate``: share of tokens that are the unknown piece (0 with byte fallback).
- ``byte_fallback_rate``: share of tokens that are byte pieces for characters outside the
  vocabulary. Tab, newline and carriage return are left out: a line break is always a byte piece
  (training lines contain none), so counting it would hide the rate of truly unseen characters.
- ``vocab_coverage``: share of the vocabulary used at least once on the sample; a low value on a
  large sample says the vocabulary is too big for the corpus.
- ``by_language``: per document language (``meta.lang``, set by clean): documents, bytes, characters,
  tokens, ``bytes_per_token``, ``tokens_per_char`` (comparable across scripts: a Chinese character
  is a word-sized unit, three UTF-8 bytes) and ``tokens_per_word`` for languages written with
  spaces (none for Chinese, Japanese and other text without spaces between words).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from lmpipe.data.shards import iter_shards, shard_files

log = logging.getLogger(__name__)

_LAYOUT_BYTES = {"<0x09>", "<0x0A>", "<0x0D>"}
PARITY_SAMPLE_DOCS = 200
PARITY_SAMPLE_CHARS = 4000
UNKNOWN = "und"
# scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Khmer, Myanmar
_UNSPACED = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f"
                       "\u1780-\u17ff\U00020000-\U0002fa1f]")


def _lang(meta: str | None) -> str:
    try:
        value = json.loads(meta or "{}")
    except json.JSONDecodeError:
        return UNKNOWN
    return str(value.get("lang", UNKNOWN)) if isinstance(value, dict) else UNKNOWN


def report_documents(split_root: Path, max_bytes: int) -> tuple[list[str], str, list[str]]:
    """Documents for the report: val (else train) documents in order, up to ``max_bytes`` of text.

    Returns (documents, name of the split they come from, language of each document).
    """
    for split in ("val", "train"):
        directory = split_root / split
        if not directory.is_dir() or not shard_files(directory):
            continue
        docs: list[str] = []
        langs: list[str] = []
        size = 0
        for _, table in iter_shards(directory):
            metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * table.num_rows
            for text, meta in zip(table.column("text").to_pylist(), metas, strict=True):
                if not text:
                    continue
                docs.append(text)
                langs.append(_lang(meta))
                size += len(text.encode("utf-8"))
                if size >= max_bytes:
                    return docs, split, langs
        if docs:
            if split == "train":
                log.warning("the val split is empty: the tokenizer report is measured on train text")
            return docs, split, langs
    return [], "none", []


def spaced_words(text: str) -> int | None:
    """Whitespace-separated words, or None for text mostly without spaces between words (CJK)."""
    chars = len(text) - sum(c.isspace() for c in text)
    if chars and len(_UNSPACED.findall(text)) > 0.3 * chars:
        return None
    return len(text.split())


def language_report(docs: list[str], langs: list[str], encoded: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Compression per document language (see the module docstring)."""
    out: dict[str, dict[str, Any]] = {}
    for lang in sorted(set(langs)):
        rows = [i for i, value in enumerate(langs) if value == lang]
        n_bytes = sum(len(docs[i].encode("utf-8")) for i in rows)
        chars = sum(len(docs[i]) for i in rows)
        tokens = sum(len(encoded[i]) for i in rows)
        words = [spaced_words(docs[i]) for i in rows]
        spaced_docs = sum(w is not None for w in words)
        n_words = sum(w for w in words if w is not None)
        spaced_tokens = sum(len(encoded[i]) for i, w in zip(rows, words, strict=True) if w is not None)
        out[lang] = {
            "documents": len(rows), "bytes": n_bytes, "chars": chars, "tokens": tokens,
            "bytes_per_token": n_bytes / tokens if tokens else 0.0,
            "tokens_per_char": tokens / chars if chars else 0.0,
            # only where most documents are written with spaces between words
            "tokens_per_word": spaced_tokens / n_words if spaced_docs > len(rows) / 2 and n_words else None,
        }
    return out


def tokenizer_report(sp: spm.SentencePieceProcessor, docs: list[str], top_k: int, num_threads: int = 1,
                     languages: list[str] | None = None) -> dict[str, Any]:
    """Compression and coverage numbers of ``sp`` on ``docs`` (see the module docstring); with
    ``languages`` (one per document) also per language."""
    vocab = sp.vocab_size()
    encoded = sp.encode(docs, num_threads=num_threads) if docs else []
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=sum(map(len, encoded)))
    counts = np.bincount(flat, minlength=vocab)
    tokens = int(counts.sum())
    text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    words = sum(len(doc.split()) for doc in docs)
    fallback = sum(int(counts[i]) for i in range(vocab) if sp.is_byte(i) and sp.id_to_piece(i) not in _LAYOUT_BYTES)
    order = np.argsort(-counts, kind="stable")[:top_k]
    top = [{"id": int(i), "piece": sp.id_to_piece(int(i)), "count": int(counts[i]),
            "share": round(float(counts[i]) / tokens, 6)} for i in order if counts[i] > 0]
    return {
        "sample_documents": len(docs),
        "sample_bytes": text_bytes,
        "sample_tokens": tokens,
        "bytes_per_token": text_bytes / tokens if tokens else 0.0,
        "tokens_per_word": tokens / words if words else 0.0,
        "unk_rate": float(counts[sp.unk_id()]) / tokens if tokens else 0.0,
        "byte_fallback_rate": fallback / tokens if tokens else 0.0,
        "vocab_coverage": float((counts > 0).sum()) / vocab,
        "top_tokens": top,
        "by_language": language_report(docs, languages, encoded) if languages else {},
    }


def check_transformers_parity(sp: spm.SentencePieceProcessor, hf_dir: Path, docs: list[str]) -> float:
    """Share of sample documents the exported ``transformers`` tokenizer encodes to the same ids.

    Loads ``hf_dir`` with ``AutoTokenizer`` (offline) and compares on up to 200 documents (first
    4000 characters each); logs a warning when any differ. Returns 1.0 when there is no sample.
    """
    from transformers import AutoTokenizer

    sample = [doc[:PARITY_SAMPLE_CHARS] for doc in docs[:PARITY_SAMPLE_DOCS]]
    if not sample:
        return 1.0
    hf = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    expected = sp.encode(sample)
    got = hf(sample, add_special_tokens=False)["input_ids"]
    same = sum(a == b for a, b in zip(expected, got, strict=True))
    if same < len(sample):
        log.warning("the transformers export differs from sentencepiece on %d of %d sample documents",
                    len(sample) - same, len(sample))
    return same / len(sample)
