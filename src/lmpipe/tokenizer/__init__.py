"""Tokenizer area: the ``tokenizer`` stage (train sentencepiece) and the ``tokenize`` stage (token shards).

Public API for other stages::

    from lmpipe.tokenizer import load_tokenizer, open_tokens, TokenShardReader

- :func:`load_tokenizer` (``lmpipe.tokenizer.train``): the sentencepiece processor of
  ``artifacts/tokenizer/`` and its :class:`TokenizerInfo` (fingerprint, vocab size, special ids).
- :class:`TokenShardReader` / :func:`open_tokens` (``lmpipe.tokenizer.shards``): memory-mapped
  token ids of a split, refused with ``FingerprintMismatch`` if they were made with another tokenizer.

Names are imported on first use, so importing the config of this area stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TokenizerInfo": "lmpipe.tokenizer.train",
    "load_tokenizer": "lmpipe.tokenizer.train",
    "read_tokenizer_info": "lmpipe.tokenizer.train",
    "normalized_text": "lmpipe.tokenizer.train",
    "TokenShardReader": "lmpipe.tokenizer.shards",
    "open_tokens": "lmpipe.tokenizer.shards",
    "token_dtype": "lmpipe.tokenizer.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmpipe.tokenizer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
