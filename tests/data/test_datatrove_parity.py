"""lmpipe's cleaning checks decide as datatrove's reference filters do, at the same thresholds.

A few hundred generated documents, good and bad (the embedded default's stories, reviews and
instructions with its noise, half of them dressed as web pages: menus, cookie notices, "enable
JavaScript" lines, share buttons, lorem ipsum, code with braces, Wikipedia citations, hashtag and
bullet lists, repeated lines), are judged by ``C4QualityFilter``, ``GopherQualityFilter`` and
``GopherRepetitionFilter`` and by lmpipe's ``clean.lines``, ``clean.quality`` and
``clean.repetition`` alone. The test prints the agreement per filter and asserts a high floor; for
C4 the kept documents must also have the same text.

datatrove's English word tokenizer is NLTK's, whose sentence model (punkt) is a data download: the
filters get a tokenizer with the same behaviour that needs no data, NLTK's Treebank word tokenizer
and an untrained punkt sentence splitter, which is also what lmpipe's sentence count follows.

Where the two disagree, it is by design, near a threshold:
* Words. datatrove counts Treebank tokens ("dawn," is "dawn" and ",", "don't" is "do" and "n't");
  lmpipe counts whitespace-separated words with their punctuation, as Gopher describes. Mean word
  lengths differ by a few tenths of a character, symbol and alphabetic ratios by the punctuation tokens.
* Stop words. datatrove counts distinct stop words (two different ones), lmpipe occurrences.
* Repetition. lmpipe compares lines and paragraphs by their words (whitespace inside a line does not
  make a line unique) and measures n-gram fractions on word characters; datatrove compares raw
  strings and divides by all characters.
* Sentences. lmpipe splits sentences after '.', '?', '!' ending a word, as untrained punkt does in
  running text; punkt also weighs its heuristics about initials and numbers, which lmpipe does not.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate
from datatrove.utils.word_tokenizers import WordTokenizer
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer

from lmpipe.data.clean import process_chunk
from lmpipe.data.config import CleanConfig
from lmpipe.data.rules import detect_languages
from lmpipe.data.shards import doc_id, make_table
from lmpipe.data.synthetic import generate

# raw agreement floors; each disagreement must also be one of the documented kinds (at most 2% are not)
FLOOR = {"c4": 0.98, "gopher_quality": 0.9, "gopher_repetition": 0.93}


class OfflineEnglish(WordTokenizer):
    """datatrove's English tokenizer without punkt's downloaded model."""

    def __init__(self) -> None:
        super().__init__("en")
        self.words = NLTKWordTokenizer()
        self.sentences = PunktSentenceTokenizer()

    def word_tokenize(self, text: str) -> list[str]:
        return [w for w in (t.strip() for t in self.words.tokenize(text)) if w]

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (s.strip() for s in self.sentences.tokenize(text)) if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(self.sentences.span_tokenize(text))


WEB = [
    "Home | About | Contact", "Share", "Skip to main content", "Read more", "Log in",
    "This site uses cookies to improve your experience.", "By using this site you agree to our Terms of Use.",
    "Please enable JavaScript to view the comments powered by Disqus.", "Posted by admin on March 3, 2021",
    "It was described in an early report.[1]", "The town was founded by farmers.[citation needed]",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "The config looks like {\"debug\": true} in the file.", "#sale #deal #free #shipping #today",
    "- one\n- two\n- three\n- four", "Click here to subscribe...", "Copyright 2021. All rights reserved.",
]


def documents(n: int = 300, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    docs = [text for text, _ in generate(int(n / 1.5), noise_fraction=0.5, seed=seed)][:n]
    for i, text in enumerate(docs):
        if i % 2:
            lines = text.split("\n")
            for _ in range(rng.randint(1, 4)):
                lines.insert(rng.randint(0, len(lines)), rng.choice(WEB))
            docs[i] = "\n".join(lines)
    # the filters are English ones, run after language identification (as in FineWeb's pipeline)
    langs, _ = detect_languages(docs)
    return [d for d, lang in zip(docs, langs, strict=True) if lang == "en"]


def lmpipe_keeps(texts: list[str], group: str, section: dict[str, Any] | None = None) -> tuple[np.ndarray, list[str]]:
    rules = ("encoding", "length", "language", "quality", "repetition", "pii", "exact_dedup", "near_dedup",
             "decontaminate", "normalize")
    data: dict[str, Any] = {name: {"enabled": False} for name in rules}
    data[group] = {"enabled": True, **(section or {})}
    cfg = CleanConfig.model_validate(data)
    table = make_table([doc_id(t) for t in texts], texts, [str(i) for i in range(len(texts))], ["{}"] * len(texts))
    result = process_chunk(table, cfg, None)  # the source column carries each document's position
    keep = np.zeros(len(texts), np.bool_)
    keep[[int(s) for s in result.table.column("source").to_pylist()]] = True
    return keep, result.table.column("text").to_pylist()


def datatrove_keeps(texts: list[str], f: Any) -> tuple[np.ndarray, list[str]]:
    keep, out = [], []
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        verdict = f.filter(doc)
        ok = verdict if isinstance(verdict, bool) else verdict[0]
        keep.append(ok)
        if ok:
            out.append(doc.text)
    return np.array(keep), out


def agreement(name: str, ours: np.ndarray, theirs: np.ndarray, explained: int) -> float:
    share = float(np.mean(ours == theirs))
    print(f"{name}: {share:.3f} agree on {len(ours)} documents; kept by lmpipe {ours.sum()}, datatrove {theirs.sum()}; "
          f"only lmpipe keeps {(ours & ~theirs).sum()}, only datatrove {(~ours & theirs).sum()}; "
          f"{explained} of {(ours != theirs).sum()} disagreements explained")
    return share


def _quality_reason(text: str, english: OfflineEnglish, f: GopherQualityFilter) -> bool:
    """A documented difference: punctuation tokens in the alphabetic share, or distinct stop words."""
    verdict = f.filter(Document(text=text, id=""))
    reason = verdict[1] if isinstance(verdict, tuple) else ""
    words = text.split()
    if reason == "gopher_below_alpha_threshold":
        return sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1) >= 0.8
    if reason == "gopher_enough_stop_words":
        return sum(w in STOP_WORDS for w in english.word_tokenize(text)) >= 2
    return False


def _repetition_reason(text: str, english: OfflineEnglish, f: GopherRepetitionFilter) -> bool:
    """A documented difference: a top n-gram that occurs once, or an n-gram fraction over the
    threshold when divided by word characters rather than all characters."""
    verdict = f.filter(Document(text=text, id=""))
    words = english.word_tokenize(text)
    if isinstance(verdict, tuple) and verdict[1].startswith("top_"):
        n = int(verdict[1].split("_")[1])
        return Counter(tuple(words[k:k + n]) for k in range(len(words) - n + 1)).most_common(1)[0][1] == 1
    word_chars = len("".join(text.split()))
    return any(find_all_duplicate(words, n) / word_chars > frac for n, frac in f.dup_n_grams)


def test_c4_gopher_quality_and_repetition_agree_with_datatrove() -> None:
    texts = documents()
    english = OfflineEnglish()
    c4 = C4QualityFilter(language=english)  # type: ignore[arg-type]
    quality = GopherQualityFilter(language=english)  # type: ignore[arg-type]
    repetition = GopherRepetitionFilter(language=english)  # type: ignore[arg-type]
    unexplained = {}
    for name, f, group, reason in (("c4", c4, "lines", None), ("gopher_quality", quality, "quality", _quality_reason),
                                   ("gopher_repetition", repetition, "repetition", _repetition_reason)):
        theirs, their_text = datatrove_keeps(texts, f)
        ours, our_text = lmpipe_keeps(texts, group)
        assert 0.05 < theirs.mean() < 0.95, name  # the corpus is mixed: each filter has work to do
        differ = np.flatnonzero(ours != theirs)
        explained = sum(bool(reason and reason(texts[i], english, f)) for i in differ)
        share = agreement(name, ours, theirs, explained)
        assert share >= FLOOR[name], name
        unexplained[name] = len(differ) - explained
        if name == "c4":  # and the documents both keep read the same
            mine, other, both = _aligned(ours, our_text, theirs, their_text)
            assert [m for m, k in zip(mine, both, strict=True) if k] == [o for o, k in zip(other, both, strict=True) if k]
    assert all(n <= 0.02 * len(texts) for n in unexplained.values()), unexplained


def _aligned(ours: np.ndarray, our_text: list[str], theirs: np.ndarray,
             their_text: list[str]) -> tuple[list[str], list[str], list[bool]]:
    """Both outputs per input document ('' where dropped), and whether both kept it."""
    a, b = iter(our_text), iter(their_text)
    mine = [next(a) if k else "" for k in ours]
    other = [next(b) if k else "" for k in theirs]
    return mine, other, list(ours & theirs)
