"""The per-document cleaning rules of the ``clean`` stage.

Each rule has a stable name (the key in ``clean_report.json`` and in the stage's metrics), is
switched on and tuned by its section of ``clean`` in params.yaml, and decides keep or drop for every
document of a batch at once, from statistics computed in one compiled pass
(:mod:`lmpipe.data.textstats`). Rules run in a fixed order and a document is charged to the first
rule that drops it, so the removals of all rules add up to the documents removed.

Order: ``normalize`` (rewrites, never drops), ``encoding``, ``length.*``, ``language``,
``quality.*`` (Gopher, Rae et al. 2021, appendix A.1.1), ``repetition.*`` (Gopher table A1),
``lines.*`` (C4's line filters, :func:`filter_lines`: they rewrite the documents they keep); then
``pii`` (:mod:`lmpipe.data.pii`) rewrites the survivors. The quality, repetition and line checks are
the rows of :data:`lmpipe.data.checks.CHECKS`. Decontamination and dedup follow in :mod:`lmpipe.data.clean`.

Languages: ``clean.languages`` holds a profile per language (:class:`LanguageProfile`): how its
words are counted, its stop words, and its own quality and repetition thresholds. Chinese (the
default profile, FineWeb-2's ``cmn_Hani`` settings) is segmented into words with jieba, and its
word counts, word lengths, stop words and repetition n-grams are measured on those words. CJK text
without a profile falls back to characters: the tokenizer makes each ideograph/kana a word, so
counts and n-grams stay meaningful, and the mean-word-length and English stop-word checks are
skipped for documents that are mostly CJK. Line and paragraph statistics never depend on words.

Markdown (``clean.markdown``): the word and repetition rules read a prose view of the document
(:func:`lmpipe.data.segment.markdown_prose`): code, formulas and markup set aside, so structure is not judged as noise.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import numba
import numpy as np
import polars as pl
import pyarrow as pa
import pycld2

from lmpipe.data.checks import LINE_CHECKS, LINE_RULES, MIN_SENTENCES, Check, checks_of
from lmpipe.data.config import CleanConfig, LanguageProfile, RepetitionRule
from lmpipe.data.segment import segment_words
from lmpipe.data.textstats import (
    DOC_STATS,
    EMPTY_NORM,
    HAS_CONTROL,
    HAS_CR,
    HAS_NON_ASCII,
    NGRAM_BASE,
    TokenizedBatch,
    count_get,
    count_insert,
    join_lines,
    line_stats,
    mix64,
    table_mask,
    token_hashes,
    tokenize,
)

# Characters removed by `normalize`: C0/C1 controls except tab and newline, zero-width space,
# word joiner and byte-order mark. CR and CRLF become LF first.
CONTROL_PATTERN = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\x{200B}\x{2060}\x{FEFF}]"
# Broken encodings: the replacement character, and UTF-8 read as cp1252/latin-1 ("Ã©" for "é",
# "â€™" for "’", "Â " for a no-break space); counted on the raw text, before controls are removed.
MOJIBAKE_PATTERN = r"\x{FFFD}|Ã[\x{80}-\x{BF}]|â€|â\x{80}[\x{80}-\x{BF}]|Â[\x{A0}-\x{BF}]"

# Gopher's stop words (Rae et al. 2021, A.1.1)
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# A document counts as CJK (no word-length or stop-word checks) when most of its words are CJK.
CJK_DOC_FRACTION = 0.5
# cld2 reads at most this many leading characters: detection is ~4x faster on long documents and
# a thousand characters is far more than cld2 needs for a confident answer.
LANG_SAMPLE_CHARS = 1000
UNKNOWN_LANGUAGE = "und"  # ISO 639-2 "undetermined"
# English fast path. cld2 costs 40-150 us per document, more than every other rule together, and
# most documents of an English corpus are unmistakable: in running English text these function
# words make up 15-25% of all words, in other languages (even ones sharing the Latin alphabet)
# well under 2%. Words that are also frequent elsewhere (a, to, of, in, is, on, an, so, was, for,
# her, he, had, will, at, by, me, my, we, has, also: Romance, Dutch, German, Scandinavian, Slavic) are
# left out on purpose.
# A document with at least ENGLISH_FAST_MIN_WORDS words and an ENGLISH_FAST_SHARE share of these
# is labelled English without cld2; everything else goes to cld2. Tests check the two agree.
ENGLISH_FUNCTION_WORDS = (
    "the", "and", "that", "with", "which", "this", "from", "were", "been", "their", "they", "would",
    "there", "what", "she", "his", "not", "are", "but", "have", "you", "said", "could", "about", "into",
    "than", "them", "these", "who", "its", "our", "your", "because", "should", "when", "where", "while",
    "it", "be", "or",
)
WORD_SETS = (token_hashes(list(STOP_WORDS)), token_hashes(list(ENGLISH_FUNCTION_WORDS)))
ENGLISH_FAST_SHARE = 0.10
ENGLISH_FAST_MIN_WORDS = 20
ENGLISH_FAST_CONFIDENCE = 0.99



def _repetition_rules(cfg: CleanConfig) -> list[RepetitionRule]:
    return [cfg.repetition, *(p.repetition for p in cfg.languages.values() if p.repetition is not None)]


def document_rule_names(cfg: CleanConfig) -> list[str]:
    """Names of the rules that judge single documents, in the order they are applied: the rows of
    :data:`lmpipe.data.checks.CHECKS` that drop documents, with the n-gram sizes of every
    language's repetition rules after the repetition rows."""
    names = ["encoding", "length.min_chars", "length.max_chars", "language"]
    names += [c.name for c in checks_of("quality")]
    names += [c.name for c in checks_of("repetition")]
    rules = _repetition_rules(cfg)
    top = sorted({n for r in rules for n in r.top_ngram_char_fraction})
    dup = sorted({n for r in rules for n in r.dup_ngram_char_fraction})
    names += [f"repetition.top_ngram_char_fraction.{n}" for n in top]
    names += [f"repetition.dup_ngram_char_fraction.{n}" for n in dup]
    names += [c.name for c in checks_of("lines") if c.target == "doc"]
    return names


# --------------------------------------------------------------------------------- text rewrites


def _rewrite(texts: pl.Series, rows: np.ndarray, pattern: str, replacement: str) -> pl.Series:
    if len(rows) == 0:
        return texts
    return texts.scatter(rows, texts.gather(rows).str.replace_all(pattern, replacement))


def normalize(texts: pl.Series, form: Literal["NFC", "NFKC"], flags: np.ndarray) -> pl.Series:
    """Unicode normal form ``form``, LF line ends, no control or zero-width characters.

    ``flags`` (:func:`scan_flags` of ``texts``) limit each rewrite to the documents it can change;
    ASCII text, for one, is in every normal form already. Returns a new series (``texts`` is left
    as it was: polars' scatter works in place).
    """
    texts = texts.clone()
    texts = _rewrite(texts, np.flatnonzero(flags & HAS_CR), "\r\n?", "\n")
    texts = _rewrite(texts, np.flatnonzero(flags & HAS_CONTROL), CONTROL_PATTERN, "")
    rows = np.flatnonzero(flags & HAS_NON_ASCII)
    if len(rows):
        fixed = [unicodedata.normalize(form, t) for t in texts.gather(rows).to_list()]
        texts = texts.scatter(rows, pl.Series(fixed, dtype=pl.String))
    return texts


def bad_char_fraction(raw: pl.Series, chars: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Share of characters that belong to a broken-encoding marker (see MOJIBAKE_PATTERN)."""
    bad = np.zeros(len(raw), np.float64)
    rows = np.flatnonzero(flags & HAS_NON_ASCII)  # every marker is non-ASCII
    if len(rows):
        bad[rows] = raw.gather(rows).str.count_matches(MOJIBAKE_PATTERN).fill_null(0).to_numpy()
    return np.divide(bad, chars, out=np.zeros_like(bad), where=chars > 0)


# ------------------------------------------------------------------------------------- language


def _detect(text: str) -> tuple[str, float]:
    try:
        _, _, details = pycld2.detect(text, bestEffort=True)
    except pycld2.error:
        # cld2 rejects a few code points (surrogates, some non-characters): drop them and retry
        text = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")
        try:
            _, _, details = pycld2.detect(text, bestEffort=True)
        except pycld2.error:
            return UNKNOWN_LANGUAGE, 0.0
    _, code, percent, _ = details[0]
    if code in ("un", "xxx") or percent == 0:
        return UNKNOWN_LANGUAGE, 0.0
    return code.split("-")[0], percent / 100.0


def tokenize_for_rules(texts: pa.Array | pa.ChunkedArray) -> TokenizedBatch:
    """Tokenize with the word counts the rules need (stop words, English function words)."""
    return tokenize(texts, WORD_SETS)


def clearly_english(batch: TokenizedBatch) -> np.ndarray:
    """Documents whose share of English function words leaves no doubt (see ENGLISH_FUNCTION_WORDS)."""
    words = batch.stat("words")
    share = _ratio(batch.set_counts[:, 1], words)
    return (words >= ENGLISH_FAST_MIN_WORDS) & (share >= ENGLISH_FAST_SHARE)


def detect_languages(texts: pl.Series | list[str], batch: TokenizedBatch | None = None,
                     rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ISO 639-1 code (``"und"`` when unknown) and confidence in [0, 1] of texts, with cld2.

    Confidence is the share of the sampled text cld2 assigns to the top language. With the
    tokenized ``batch`` of the texts, clearly English documents skip cld2 (ENGLISH_FAST_SHARE).
    Only ``rows`` (default all) are detected; the others get ``"und"`` and 0.
    """
    n = len(texts)
    langs = np.full(n, UNKNOWN_LANGUAGE, dtype=object)
    conf = np.zeros(n, np.float64)
    todo = np.ones(n, np.bool_) if rows is None else np.isin(np.arange(n), rows)
    if batch is not None:
        fast = todo & clearly_english(batch)
        langs[fast] = "en"
        conf[fast] = ENGLISH_FAST_CONFIDENCE
        todo &= ~fast
    todo_rows = np.flatnonzero(todo)
    sample = pl.Series(texts, dtype=pl.String).gather(todo_rows).str.slice(0, LANG_SAMPLE_CHARS).to_list()
    for idx, text in zip(todo_rows, sample, strict=True):
        langs[idx], conf[idx] = _detect(text or "")
    return langs, conf


# ---------------------------------------------------------------------------- repetition n-grams


@numba.njit(cache=True, nogil=True)
def _repetition_kernel(tok_hash, tok_chars, tok_offsets, select, first_n, top_ns, dup_ns, top_frac, dup_frac,
                       keys, stamps, counts, grams, multi_prev, multi, csum):  # pragma: no cover - compiled
    n_max = top_ns.shape[0] - 1
    stamp = 0
    for d in range(tok_offsets.shape[0] - 1):
        if not select[d]:
            continue
        t0 = tok_offsets[d]
        m = tok_offsets[d + 1] - t0
        csum[0] = 0
        for k in range(m):
            csum[k + 1] = csum[k] + tok_chars[t0 + k]
            grams[k] = tok_hash[t0 + k]
        total = csum[m]
        if total == 0:
            continue
        mask = table_mask(m)
        for n in range(1, n_max + 1):
            count = m - n + 1
            if count <= 0:
                break
            if n > 1:
                for p in range(count):
                    grams[p] = grams[p] * NGRAM_BASE + tok_hash[t0 + p + n - 1]
            if n < first_n:
                continue
            # an n-gram occurring twice implies both of its (n-1)-grams occur twice: test only those
            stamp += 1
            any_multi = False
            for p in range(count):
                cand = n == first_n or (multi_prev[p] and multi_prev[p + 1])
                if cand:
                    count_insert(keys, stamps, counts, mask, stamp, mix64(grams[p]))
            for p in range(count):
                cand = n == first_n or (multi_prev[p] and multi_prev[p + 1])
                multi[p] = cand and count_get(keys, stamps, counts, mask, stamp, mix64(grams[p])) > 1
                any_multi = any_multi or multi[p]
            if top_ns[n]:
                # characters covered by the most frequent n-gram (Gopher: only repeated ones count)
                best = 0
                best_chars = 0
                for p in range(count):
                    if multi[p]:
                        c = count_get(keys, stamps, counts, mask, stamp, mix64(grams[p]))
                        gc = csum[p + n] - csum[p]
                        if c > best or (c == best and gc > best_chars):
                            best = c
                            best_chars = gc
                top_frac[d, n] = best * best_chars / total
            if dup_ns[n] and any_multi:
                # characters inside repeated occurrences (every occurrence after the first)
                stamp += 1
                covered = 0
                cover_end = 0
                for p in range(count):
                    if multi[p] and count_insert(keys, stamps, counts, mask, stamp, mix64(grams[p])) > 1:
                        lo = max(p, cover_end)
                        hi = p + n
                        if hi > lo:
                            covered += csum[hi] - csum[lo]
                            cover_end = hi
                dup_frac[d, n] = covered / total
            if not any_multi:
                break
            for p in range(count):
                multi_prev[p] = multi[p]
            multi_prev[count] = False


def repetition_stats(batch: TokenizedBatch, top_ns: list[int], dup_ns: list[int],
                     select: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gopher repetition statistics (Rae et al. 2021, table A1) per document.

    Returns ``(top, dup)``, each ``[docs, max_n + 1]``: ``top[d, n]`` is the fraction of word
    characters covered by the most frequent repeated n-gram, ``dup[d, n]`` the fraction inside
    repeated occurrences of any n-gram. Documents with ``select[d]`` False are skipped (zeros).
    """
    n_docs = len(batch)
    wanted = sorted(set(top_ns) | set(dup_ns))
    n_max = wanted[-1] if wanted else 0
    top = np.zeros((n_docs, n_max + 1), np.float64)
    dup = np.zeros((n_docs, n_max + 1), np.float64)
    if not wanted or n_docs == 0:
        return top, dup
    top_mask = np.zeros(n_max + 1, np.bool_)
    dup_mask = np.zeros(n_max + 1, np.bool_)
    top_mask[list(top_ns)] = True
    dup_mask[list(dup_ns)] = True
    longest = int(np.max(np.diff(batch.tok_offsets)))
    size = table_mask(longest) + 1
    select = np.ones(n_docs, np.bool_) if select is None else np.ascontiguousarray(select, np.bool_)
    _repetition_kernel(
        batch.tok_hash, batch.tok_chars, batch.tok_offsets, select, wanted[0], top_mask, dup_mask, top, dup,
        np.empty(size, np.uint64), np.zeros(size, np.int64), np.empty(size, np.int32),
        np.empty(longest + 1, np.uint64), np.zeros(longest + 2, np.bool_), np.zeros(longest + 2, np.bool_),
        np.empty(longest + 2, np.int64),
    )
    return top, dup


# ----------------------------------------------------------------------------------------- rules


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), np.float64), where=den > 0)


def stop_word_counts(batch: TokenizedBatch) -> np.ndarray:
    """Occurrences of Gopher's English stop words per document."""
    return batch.set_counts[:, 0]


@dataclass
class Judgement:
    """``codes[d]``: 0 = kept, else 1 + index of the dropping rule in ``names``; ``values[d]``: what
    that rule measured (a count, length or fraction)."""

    names: list[str]
    codes: np.ndarray
    values: np.ndarray
    code_of: dict[str, int] = field(default_factory=dict)

    def drop(self, name: str, value: np.ndarray, fails: np.ndarray) -> None:
        new = fails & (self.codes == 0)
        self.codes[new] = self.code_of[name]
        self.values[new] = value[new]


def judge(cfg: CleanConfig, *, chars: np.ndarray, bad_fraction: np.ndarray, langs: np.ndarray,
          confidence: np.ndarray, batch: TokenizedBatch, texts: pl.Series | None = None) -> Judgement:
    """Apply every enabled document rule in order; return which rule (if any) drops each doc.

    ``batch`` comes from :func:`tokenize_for_rules` of the same (normalised) ``texts``; the texts
    are needed when documents of a language with a profile (``clean.languages``) remain after the
    language rule: their words are counted by the profile's segmenter.
    """
    if batch.set_counts.shape[1] != len(WORD_SETS):
        raise ValueError("judge() needs a batch from tokenize_for_rules()")
    names = document_rule_names(cfg)
    n = len(chars)
    out = Judgement(names, np.zeros(n, np.int16), np.zeros(n, np.float64), {k: i + 1 for i, k in enumerate(names)})
    if cfg.encoding.enabled:
        out.drop("encoding", bad_fraction, bad_fraction > cfg.encoding.max_bad_fraction)
    if cfg.length.enabled:
        out.drop("length.min_chars", chars, chars < cfg.length.min_chars)
        out.drop("length.max_chars", chars, chars > cfg.length.max_chars)
    if cfg.language.enabled:
        wrong = ~np.isin(langs.astype(str), cfg.language.keep) | (confidence < cfg.language.min_confidence)
        out.drop("language", confidence, wrong)
    if not (cfg.quality.enabled or cfg.repetition.enabled):
        return out
    groups = language_groups(cfg, langs, out.codes == 0, batch, texts)
    stats = document_stats(batch, chars, groups)
    scopes = _scopes(batch, groups, langs)
    if cfg.quality.enabled:
        _quality(cfg, out, stats, groups, scopes)
    if cfg.repetition.enabled:
        _repetition(cfg, out, batch, groups, stats, scopes)
    return out


@dataclass
class LanguageGroup:
    """The documents (``rows``) of one language with a profile, tokenized by its segmenter."""

    profile: LanguageProfile
    rows: np.ndarray
    batch: TokenizedBatch


def language_groups(cfg: CleanConfig, langs: np.ndarray, alive: np.ndarray, batch: TokenizedBatch,
                    texts: pl.Series | None) -> list[LanguageGroup]:
    """The still-undecided documents of each profiled language, tokenized as the profile says
    (jieba words joined by spaces, or the general tokenizer's characters), with the profile's stop
    words counted (``set_counts[:, 0]``)."""
    groups = []
    for lang, profile in cfg.languages.items():
        rows = np.flatnonzero(alive & (langs == lang))
        if len(rows) == 0:
            continue
        if texts is None:
            raise ValueError(f"judge() needs the texts: {len(rows)} documents have a '{lang}' profile")
        docs = texts.gather(rows).to_list()
        split_cjk = profile.segmenter != "jieba"
        if not split_cjk:
            docs = segment_words(docs)
        stops = token_hashes(profile.stop_words, split_cjk=split_cjk) if profile.stop_words else np.zeros(0, np.uint64)
        groups.append(LanguageGroup(profile, rows, tokenize(docs, (stops,), split_cjk=split_cjk)))
    return groups


def _per_doc(general: float, groups: list[LanguageGroup], rules: list[Any], key: str, n: int) -> np.ndarray:
    """Threshold ``key`` per document: the general rule's, or its language profile's."""
    limit = np.full(n, general, np.float64)
    for group, rule in zip(groups, rules, strict=True):
        if rule is not None:
            limit[group.rows] = getattr(rule, key)
    return limit


def _stat(stats: dict[str, np.ndarray], expr: str) -> np.ndarray:
    """A check's statistic: a column of ``stats``, or ``"a/b"`` (0 where b is 0)."""
    num, _, den = expr.partition("/")
    return _ratio(stats[num], stats[den]) if den else stats[num]


def _fails(check: Check, value: np.ndarray, limit: np.ndarray | float) -> np.ndarray:
    if check.op == "flag":
        return np.asarray(value != 0) & bool(limit)
    return value < limit if check.op == "min" else value > limit


def _apply(out: Judgement, checks: tuple[Check, ...], section: Any, groups: list[LanguageGroup], rules: list[Any],
           stats: dict[str, np.ndarray], on: np.ndarray, scopes: dict[str, np.ndarray]) -> None:
    """Drop, in table order, the documents failing each check at their language's limit."""
    n = len(out.codes)
    for check in checks:
        value = _stat(stats, check.stat)
        limit = _per_doc(getattr(section, check.key), groups, rules, check.key, n)
        out.drop(check.name, value, on & scopes[check.scope] & _fails(check, value, limit))


def document_stats(batch: TokenizedBatch, chars: np.ndarray, groups: list[LanguageGroup]) -> dict[str, np.ndarray]:
    """The per-document columns the checks read: the textstats pass's, ``chars`` of the text, and
    derived ones; for documents of a profiled language, words counted as datatrove counts them
    (FineWeb-2's thresholds assume it): without punctuation tokens, and ``tokens`` for the share
    of words with a letter among all tokens."""
    stats = {name: batch.stat(name).copy() for name in DOC_STATS}
    stats["chars"] = chars
    stats["tokens"] = stats["words"].copy()
    stats["stop_words"] = stop_word_counts(batch).copy()
    for group in groups:
        rows, gb = group.rows, group.batch
        doc = np.repeat(np.arange(len(gb)), np.diff(gb.tok_offsets))
        real = (gb.tok_flags & EMPTY_NORM) == 0
        stats["words"][rows] = np.bincount(doc, weights=real, minlength=len(gb))
        stats["word_chars"][rows] = np.bincount(doc, weights=np.where(real, gb.tok_chars, 0), minlength=len(gb))
        stats["tokens"][rows] = gb.stat("words")
        stats["alpha_words"][rows] = gb.stat("alpha_words")
        stats["stop_words"][rows] = gb.set_counts[:, 0]
    stats["symbols"] = np.maximum(stats["hashes"], stats["ellipses"])
    return stats


def _scopes(batch: TokenizedBatch, groups: list[LanguageGroup], langs: np.ndarray) -> dict[str, np.ndarray]:
    n = len(batch)
    # without a profile, CJK counted per character has no word lengths or stop words to check
    cjk_doc = _ratio(batch.stat("cjk_words"), batch.stat("words")) > CJK_DOC_FRACTION
    words = ~cjk_doc
    stops = (langs == "en") & ~cjk_doc
    for group in groups:
        words[group.rows] = True
        stops[group.rows] = bool(group.profile.stop_words)
    return {"all": np.ones(n, np.bool_), "words": words, "stop_words": stops}


def _enabled(groups: list[LanguageGroup], rules: list[Any], n: int) -> np.ndarray:
    on = np.ones(n, np.bool_)
    for group, rule in zip(groups, rules, strict=True):
        on[group.rows] = rule is None or rule.enabled
    return on


def _quality(cfg: CleanConfig, out: Judgement, stats: dict[str, np.ndarray], groups: list[LanguageGroup],
             scopes: dict[str, np.ndarray]) -> None:
    rules = [g.profile.quality for g in groups]
    on = _enabled(groups, rules, len(out.codes))
    _apply(out, checks_of("quality"), cfg.quality, groups, rules, stats, on, scopes)


def _repetition(cfg: CleanConfig, out: Judgement, batch: TokenizedBatch, groups: list[LanguageGroup],
                stats: dict[str, np.ndarray], scopes: dict[str, np.ndarray]) -> None:
    r = cfg.repetition
    rules = [g.profile.repetition for g in groups]
    on = _enabled(groups, rules, len(out.codes))
    _apply(out, checks_of("repetition"), r, groups, rules, stats, on, scopes)
    # n-gram statistics are the costliest: compute them only for documents still in, each on the
    # words of its language (a profile's segmenter) with its language's limits
    all_rules = [r, *(rule for rule in rules if rule is not None)]
    top_ns = sorted({k for rule in all_rules for k in rule.top_ngram_char_fraction})
    dup_ns = sorted({k for rule in all_rules for k in rule.dup_ngram_char_fraction})
    alive = (out.codes == 0) & on
    general = alive.copy()
    for group in groups:
        general[group.rows] = False
    top, dup = repetition_stats(batch, list(r.top_ngram_char_fraction), list(r.dup_ngram_char_fraction), select=general)
    width = max([*top_ns, *dup_ns, 0]) + 1
    top, dup = _widen(top, width), _widen(dup, width)
    top_limit = {k: np.where(general, r.top_ngram_char_fraction.get(k, np.inf), np.inf) for k in top_ns}
    dup_limit = {k: np.where(general, r.dup_ngram_char_fraction.get(k, np.inf), np.inf) for k in dup_ns}
    for group, rule in zip(groups, rules, strict=True):
        rule = rule or r
        g_top, g_dup = repetition_stats(group.batch, list(rule.top_ngram_char_fraction),
                                        list(rule.dup_ngram_char_fraction), select=alive[group.rows])
        top[group.rows], dup[group.rows] = _widen(g_top, width), _widen(g_dup, width)
        for k in top_ns:
            top_limit[k][group.rows] = np.where(alive[group.rows], rule.top_ngram_char_fraction.get(k, np.inf), np.inf)
        for k in dup_ns:
            dup_limit[k][group.rows] = np.where(alive[group.rows], rule.dup_ngram_char_fraction.get(k, np.inf), np.inf)
    for k in top_ns:
        value = np.minimum(top[:, k], 1.0)
        out.drop(f"repetition.top_ngram_char_fraction.{k}", value, value > top_limit[k])
    for k in dup_ns:
        out.drop(f"repetition.dup_ngram_char_fraction.{k}", dup[:, k], dup[:, k] > dup_limit[k])


def filter_lines(cfg: CleanConfig, out: Judgement, texts: pl.Series,
                 langs: np.ndarray) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """C4's line filters (the ``lines`` rows of the checks table) on the documents still kept whose
    language is in ``clean.lines.languages``: each line is removed by the first row it fails, a
    document is dropped when a kept-so-far line fails a ``doc`` row (in line order, as C4 stops at
    it), or when fewer than ``min_sentences`` sentences remain. Returns the texts with the
    survivors rebuilt from their kept lines, the lines each ``line`` row removed (table order), and
    the rows of the rebuilt documents.
    """
    c = cfg.lines
    removed = np.zeros(len(LINE_RULES), np.int64)
    rows = np.flatnonzero((out.codes == 0) & np.isin(langs.astype(str), c.languages))
    if not c.enabled or len(rows) == 0:
        return texts, removed, rows[:0]
    select = np.zeros(len(texts), np.bool_)
    select[rows] = True
    lines = line_stats(texts.to_arrow(), select)
    fate = np.zeros(len(lines.stats), np.int64)  # 0: kept, else 1 + index in LINE_CHECKS
    for idx, check in enumerate(LINE_CHECKS):
        hit = _fails(check, lines.stat(check.stat), getattr(c, check.key))
        fate[(fate == 0) & hit] = idx + 1
    doc = lines.doc_of_line()
    n = len(texts)
    for idx, check in enumerate(LINE_CHECKS):
        if check.target == "line":
            removed[LINE_RULES.index(check)] = int(np.count_nonzero(fate == idx + 1))
    # a document-dropping line decides the document at the first such line
    doc_lines = np.flatnonzero(np.isin(fate, [i + 1 for i, ch in enumerate(LINE_CHECKS) if ch.target == "doc"]))
    first_docs, first = np.unique(doc[doc_lines], return_index=True)
    code = np.zeros(n, np.int64)
    code[first_docs] = fate[doc_lines[first]]
    for idx, check in enumerate(LINE_CHECKS):
        if check.target == "doc":
            out.drop(check.name, np.ones(n), code == idx + 1)
    keep = fate == 0
    sentences = np.bincount(doc, weights=np.where(keep, lines.stat("sentences"), 0), minlength=n)
    out.drop(MIN_SENTENCES.name, sentences, select & _fails(MIN_SENTENCES, sentences, getattr(c, MIN_SENTENCES.key)))
    survivors = np.flatnonzero(select & (out.codes == 0))
    if len(survivors):
        rebuilt = pl.Series(join_lines(lines, keep, survivors), dtype=pl.String).str.strip_chars()
        texts = texts.clone().scatter(survivors, rebuilt)
    return texts, removed, survivors


def _widen(stats: np.ndarray, width: int) -> np.ndarray:
    """``stats`` ([docs, n + 1]) padded with zero columns to ``width``."""
    if stats.shape[1] >= width:
        return stats[:, :width]
    return np.pad(stats, ((0, 0), (0, width - stats.shape[1])))
