"""The embedded synthetic corpus: deterministic, structured, learnable, and noisy on purpose."""

from __future__ import annotations

import collections
import math
import re
import time
from typing import Any

import pytest
from datasketch import MinHash, MinHashLSH
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipe.data.config import QualityRule
from lmpipe.data.synthetic import NOISE_KINDS, NUMBER_WORDS, generate
from lmpipe.errors import ConfigError

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, dict[str, Any]]]:
    return list(generate(900, noise_fraction=0.2, seed=7))


def clean_docs(corpus: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(t, m) for t, m in corpus if "noise" not in m]


def shingles(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def gopher_failures(text: str, rule: QualityRule) -> list[str]:
    """Gopher quality rules (Rae et al. 2021, A.1.1) at the thresholds clean uses by default."""
    words = text.split()
    failures = []
    if len(words) < rule.min_words:
        failures.append("min_words")
    if not rule.min_mean_word_length <= sum(map(len, words)) / len(words) <= rule.max_mean_word_length:
        failures.append("mean_word_length")
    if (text.count("#") + text.count("...")) / len(words) > rule.max_symbol_word_ratio:
        failures.append("symbols")
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < rule.min_alpha_word_fraction:
        failures.append("alpha")
    if sum(w.lower() in STOP_WORDS for w in words) < rule.min_stop_words:
        failures.append("stop_words")
    tokens = re.findall(r"\w+", text.lower())
    grams = [tuple(tokens[i:i + 5]) for i in range(len(tokens) - 4)]
    counts = collections.Counter(grams)
    covered = {j for i, g in enumerate(grams) if counts[g] > 1 for j in range(i, i + 5)}
    if sum(len(tokens[j]) for j in covered) / len(text) > 0.15:  # Gopher table A1, 5-grams
        failures.append("duplicate_5grams")
    return failures


def test_same_seed_same_corpus_other_seed_differs() -> None:
    assert list(generate(60, seed=3)) == list(generate(60, seed=3))
    assert list(generate(60, seed=3)) != list(generate(60, seed=4))


def test_counts_kinds_and_noise_kinds(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    assert len(corpus) == 900 + 180
    kinds = collections.Counter(m["kind"] for t, m in clean_docs(corpus))
    assert kinds == {"story": 450, "review": 270, "instruction": 180}
    noise = collections.Counter(m["noise"] for _, m in corpus if "noise" in m)
    assert set(noise) == set(NOISE_KINDS) and sum(noise.values()) == 180


def test_custom_kind_mix_and_bad_kinds() -> None:
    docs = list(generate(10, noise_fraction=0, kinds={"review": 1.0}, seed=1))
    assert {m["kind"] for _, m in docs} == {"review"} and len(docs) == 10
    with pytest.raises(ConfigError, match="unknown kind\\(s\\) poem"):
        list(generate(10, kinds={"poem": 1.0}))
    with pytest.raises(ConfigError, match="positive sum"):
        list(generate(10, kinds={"story": 0.0}))


@settings(max_examples=15, deadline=None)
@given(num_docs=st.integers(1, 60), noise=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_size_holds_for_any_settings(num_docs: int, noise: float, seed: int) -> None:
    docs = list(generate(num_docs, noise_fraction=noise, seed=seed))
    assert len(docs) == num_docs + round(noise * num_docs)
    assert "noise" not in docs[0][1]  # noise always follows a clean document
    assert all(isinstance(t, str) and t for t, _ in docs)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    docs = list(generate(4000, seed=0))
    elapsed = time.perf_counter() - start
    assert len(docs) == 4600
    assert elapsed < 2.0, f"4000 documents took {elapsed:.2f}s"


def test_clean_documents_pass_gopher_quality(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    rule = QualityRule()
    failing = [(m, gopher_failures(t, rule)) for t, m in clean_docs(corpus) if gopher_failures(t, rule)]
    assert failing == []
    story_words = [len(t.split()) for t, m in clean_docs(corpus) if m["kind"] == "story"]
    assert min(story_words) >= 80 and max(story_words) <= 300


def test_clean_documents_are_not_near_duplicates(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    lsh = MinHashLSH(threshold=0.8, num_perm=64)
    flagged = 0
    for i, (text, _) in enumerate(clean_docs(corpus)):
        signature = MinHash(num_perm=64, seed=1)
        signature.update_batch([s.encode() for s in shingles(text)])
        flagged += bool(lsh.query(signature))
        lsh.insert(str(i), signature)
    assert flagged == 0


def test_duplicates_copy_earlier_documents(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    seen: dict[str, set[str]] = {}
    for text, meta in corpus:
        if meta.get("noise") == "exact_duplicate":
            assert text in seen
        elif meta.get("noise") == "near_duplicate":
            mine = shingles(text)
            best = max(len(mine & theirs) / len(mine | theirs) for theirs in seen.values())
            assert 0.85 <= best < 1.0
        if "noise" not in meta:
            seen[text] = shingles(text)


def test_reviews_carry_learnable_labels(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    reviews = [(set(re.findall(r"[a-z]+", t.lower())), m["label"]) for t, m in clean_docs(corpus) if m["kind"] == "review"]
    assert {label for _, label in reviews} == {"positive", "negative"}
    train, test = reviews[: len(reviews) // 2], reviews[len(reviews) // 2:]
    # naive Bayes over word presence, trained on half the reviews: the label is in the words
    counts = {label: collections.Counter(w for words, lab in train if lab == label for w in words)
              for label in ("positive", "negative")}
    docs = collections.Counter(lab for _, lab in train)

    def score(words: set[str], label: str) -> float:
        return sum(math.log((counts[label][w] + 1) / (docs[label] + 2)) for w in words)

    accuracy = sum(max(counts, key=lambda lab: score(words, lab)) == label for words, label in test) / len(test)
    assert accuracy > 0.9
    assert sum("not" in words for words, _ in reviews) > len(reviews) / 10  # negation appears now and then


def test_instructions_are_correct(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    numbers = {w: i for i, w in enumerate(NUMBER_WORDS)}
    families: collections.Counter[str] = collections.Counter()
    for text, meta in clean_docs(corpus):
        if meta["kind"] != "instruction":
            continue
        families[meta["family"]] += 1
        assert text == f"Instruction: {meta['instruction']}\nInput: {meta['input']}\nAnswer: {meta['output']}"
        given_words = meta["input"].split(", ")
        if meta["family"] == "word_list":
            listed = re.search(r": ([a-z, ]+)\.", meta["output"]).group(1).split(", ")
            assert listed in (sorted(given_words), given_words[::-1])
        elif meta["family"] == "arithmetic" and "buys" in meta["input"]:
            m = re.search(r"has (\d+) \w+\. Later \w+ buys (\w+) \w+ with (\w+) .* gives (\d+)", meta["input"])
            start, bags, each, give = int(m[1]), numbers[m[2]], numbers[m[3]], int(m[4])
            assert meta["output"].endswith(f"The answer is {start + bags * each - give} {meta['input'].split()[3].rstrip('.')}.")
        elif meta["family"] == "capitals":
            assert ("France" in given_words) == ("Paris" in meta["output"])
    assert set(families) == {"arithmetic", "word_list", "antonyms", "capitals"}


def test_noise_documents_have_their_defects(corpus: list[tuple[str, dict[str, Any]]]) -> None:
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
    for text, meta in corpus:
        if "noise" in meta:
            by_kind[meta["noise"]].append((text, meta))
    assert all(len(t) < 50 for t, _ in by_kind["too_short"])
    assert all(re.search(r"[\w.]+@[\w.]+|\d{1,3}(\.\d{1,3}){3}|555", t) for t, _ in by_kind["pii"])
    assert all("Ã" in t or "â€" in t for t, _ in by_kind["broken_encoding"])
    assert all(len(set(t.splitlines())) == 1 and len(t.splitlines()) >= 8 for t, _ in by_kind["repetitive_spam"])
    assert all(t.count("#") + t.count("...") > 0.1 * len(t.split()) for t, _ in by_kind["symbol_heavy"])
    assert all(re.search(r"cookies|Home \||Click here|All rights reserved|Share this|Skip to|JavaScript", t)
               for t, _ in by_kind["boilerplate"])
    languages = {m["language"] for _, m in by_kind["non_english"]}
    assert languages <= {"de", "fr", "es", "ja"}
    japanese = [t for t, m in by_kind["non_english"] if m["language"] == "ja"]
    assert all(re.search(r"[\u3040-\u30ff]", t) for t in japanese)
