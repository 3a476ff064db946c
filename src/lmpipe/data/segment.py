"""Views of a document for the word-based cleaning rules: Chinese words (jieba) and the prose of
Markdown. Neither changes the text clean writes; the rules read these views only."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import polars as pl

from lmpipe.data.textstats import tokenize

# Markdown set aside by markdown_prose, in this order: (pattern, replacement). Fenced code, display
# math and table rows go whole; inline formulas go; inline code, links and images keep their text;
# heading, list and quote markers and horizontal rules go. Currency ("$5 and $10") is no formula:
# a formula starts and ends with a non-space character next to its dollar signs.
MARKDOWN_PROSE = (
    (r"(?ms)^[ \t]*```.*?(?:^[ \t]*```[^\n]*$|\z)|^[ \t]*~~~.*?(?:^[ \t]*~~~[^\n]*$|\z)", ""),
    (r"(?s)\$\$.+?\$\$|\\\[.+?\\\]", ""),
    (r"\$[^\s$](?:[^$\n]*[^\s$])?\$|\\\(.+?\\\)", ""),
    (r"(?m)^[ \t]*(?:[-*_][ \t]*){3,}$|^[ \t]*\|?(?:[ \t]*:?-{2,}:?[ \t]*\|)+[ \t]*(?::?-{2,}:?[ \t]*)?$", ""),
    (r"!?\[([^\]\n]*)\]\([^)\n]*\)", "$1"),
    (r"`([^`\n]*)`", "$1"),
    (r"(?m)^[ \t]*(?:#{1,6}|>+|[-*+]|[0-9]{1,3}[.)])[ \t]+", ""),
    (r"(?m)^[ \t]*\|.*\|[ \t]*$", ""),
)


def markdown_prose(texts: pl.Series) -> pl.Series:
    """The prose of Markdown documents, for the word and repetition rules (see MARKDOWN_PROSE):
    code blocks and formulas removed, link and inline-code text kept, markup removed."""
    for pattern, replacement in MARKDOWN_PROSE:
        texts = texts.str.replace_all(pattern, replacement)
    return texts


# ------------------------------------------------------------------------------ word segmentation


@functools.cache
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary loading logs at INFO to stderr
    jieba.initialize()
    return jieba


def segment_words(texts: list[str]) -> list[str]:
    """Chinese texts with their words separated by spaces: jieba's accurate mode, with its HMM for
    words missing from the dictionary (Sun 2012; the segmenter datatrove and FineWeb-2 use for
    Chinese). Whitespace and line breaks stay where they were."""
    jieba = _jieba()
    return [" ".join(jieba.lcut(text)) for text in texts]


def word_counts(texts: list[str], segmenter: str) -> np.ndarray:
    """Words per text as the cleaning rules count them (``segmenter`` as in LanguageProfile)."""
    if segmenter == "jieba":
        return tokenize(segment_words(texts), split_cjk=False).stat("words")
    return tokenize(texts).stat("words")
