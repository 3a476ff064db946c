"""Each cleaning rule drops its bad document with its name in the report, keeps good ones, and can
be switched off; PII becomes placeholders; Chinese survives the word rules; nothing crashes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmpipe.data.clean import ChunkResult, process_chunk, rule_names
from lmpipe.data.config import CleanConfig, PiiRule
from lmpipe.data.pii import redact_pii
from lmpipe.data.rules import clearly_english, detect_languages, normalize, tokenize_for_rules
from lmpipe.data.shards import doc_id, make_table
from lmpipe.data.textstats import scan_flags, tokenize

GOOD = [
    "The old baker opened his shop before dawn, as he had done for thirty years. He lit the ovens, "
    "swept the floor and set out the baskets for the bread. When the first customers arrived, the "
    "smell of warm loaves had already filled the street. A small girl asked him why he never slept "
    "late, and he laughed and said that the dough does not wait for anyone, not even for a baker.",
    "Our team spent the summer testing a new way to store rainwater in dry villages. The tanks were "
    "made of clay and lined with lime, which kept the water cool and clean for weeks. Families that "
    "used them walked far less to fetch water, and the children had more time for school. We are now "
    "writing a guide so that other villages can build the same tanks with local materials.",
    "I bought this lamp for my reading corner and I have been happy with it. The light is warm and "
    "even, the switch feels solid, and the base is heavy enough that the cat cannot knock it over. "
    "Assembly took five minutes with the tool in the box. My only complaint is that the cable is a "
    "little short, so I had to move a shelf to reach the socket behind the sofa.",
]
CHINESE = ("早上，孩子们一起走路去村里的学校。面包店的老板每天早上六点开门。夏天，很多家庭会去海边度假。"
           "下雨以后，森林里有青苔和泥土的味道。我的爷爷喜欢讲他年轻时在农村的故事。今天去上海的火车晚点了二十分钟。")

ALL_RULES = ("encoding", "length", "language", "quality", "repetition", "pii", "exact_dedup", "near_dedup",
             "decontaminate")


def only(rule: str, **section: Any) -> CleanConfig:
    """A config with every rule off except ``rule`` (tuned with ``section``)."""
    data: dict[str, Any] = {name: {"enabled": False} for name in ALL_RULES}
    data[rule] = {"enabled": True, **section}
    return CleanConfig.model_validate(data)


def run(texts: list[str], cfg: CleanConfig) -> ChunkResult:
    table = make_table([doc_id(t) + f"-{i}" for i, t in enumerate(texts)], texts, ["test"] * len(texts),
                       ["{}"] * len(texts))
    return process_chunk(table, cfg, None, "test.parquet", 0)


def removed(result: ChunkResult, cfg: CleanConfig) -> dict[str, int]:
    return {name: int(result.removed_docs[i + 1]) for i, name in enumerate(rule_names(cfg)) if result.removed_docs[i + 1]}


BAD = {
    "encoding": ("encoding", {}, GOOD[0] + " We had crÃ¨me brÃ»lÃ©e at the cafÃ© â€“ itâ€™s dÃ©jÃ  vu. \ufffd\ufffd"),
    "length.min_chars": ("length", {}, "Page 2 of 7"),
    "length.max_chars": ("length", {"max_chars": 1000}, " ".join(GOOD * 2)),
    "language": ("language", {}, "Am Morgen gehen die Kinder gemeinsam zur Schule, und die Straßen sind noch ruhig. "
                 "Der alte Bäcker öffnet seinen Laden jeden Tag um sechs Uhr. Im Sommer fahren viele Familien an "
                 "die Ostsee, um sich zu erholen. Nach dem Regen riecht der Wald nach Moos und feuchter Erde."),
    "quality.min_words": ("quality", {}, "The baker opened the shop and the street smelled of bread and "
                          "that was the best part of the morning for him."),
    "quality.max_words": ("quality", {"max_words": 100}, " ".join(GOOD[:2])),
    "quality.min_mean_word_length": ("quality", {}, " ".join(["I am to be at it so we go on by me and he is in"] * 5)),
    "quality.max_mean_word_length": ("quality", {}, " ".join(["internationalisation counterrevolutionaries "
                                                              "the incomprehensibilities with"] * 15)),
    "quality.max_symbol_word_ratio": ("quality", {}, GOOD[0] + " " + " ".join(["#sale #deal"] * 12)),
    "quality.max_ellipsis_line_fraction": ("quality", {}, "\n".join(
        f"Line {i} of the story goes on and on with the people that have nothing to say..." for i in range(8))),
    "quality.max_bullet_line_fraction": ("quality", {}, "\n".join(
        f"• item number {i} that we have to take with the other things on the trip" for i in range(8))),
    "quality.min_alpha_word_fraction": ("quality", {}, GOOD[0] + " " + " ".join(str(i * 37) for i in range(60))),
    "quality.min_stop_words": ("quality", {}, " ".join(
        ["Bright morning sunlight filled quiet valley orchards while farmers gathered ripe apples"] * 6)),
    "repetition.max_dup_line_fraction": ("repetition", {}, "\n".join([GOOD[0], "Buy cheap watches now!"] * 4)),
    "repetition.max_dup_para_fraction": ("repetition", {"max_dup_line_fraction": 1.0, "max_dup_line_char_fraction": 1.0},
                                         "\n\n".join([GOOD[0], GOOD[1], GOOD[1], GOOD[1]])),
    "repetition.max_dup_line_char_fraction": ("repetition", {}, "\n".join(
        [GOOD[0], *(f"Note {i}: the weather was fine." for i in range(8)), GOOD[0]])),
    "repetition.max_dup_para_char_fraction": ("repetition", {"max_dup_line_char_fraction": 1.0}, "\n\n".join(
        [GOOD[0], *(f"Note {i}: the weather was fine." for i in range(4)), GOOD[0]])),
    "repetition.top_ngram_char_fraction.2": ("repetition", {}, " ".join(
        f"big deal {w}" for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"])),
    "repetition.dup_ngram_char_fraction.5": ("repetition", {"top_ngram_char_fraction": {}}, GOOD[0] + " " + GOOD[0]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_rule_drops_its_bad_doc_and_keeps_good_ones(name: str) -> None:
    rule, section, bad = BAD[name]
    cfg = only(rule, **section)
    result = run([*GOOD, bad], cfg)
    assert removed(result, cfg) == {name: 1}
    assert result.table.column("text").to_pylist() == GOOD
    (example,) = result.examples[name]
    assert example["id"].endswith("-3") and bad.startswith(example["text"][:50])


@pytest.mark.parametrize("name", sorted(BAD))
def test_rule_can_be_switched_off(name: str) -> None:
    rule, section, bad = BAD[name]
    cfg = only(rule, **section)
    setattr(cfg, rule, type(getattr(cfg, rule))(**{**getattr(cfg, rule).model_dump(), "enabled": False}))
    result = run([*GOOD, bad], cfg)
    assert removed(result, cfg) == {}
    assert result.table.num_rows == 4


def test_defaults_keep_good_english_and_drop_every_bad_doc() -> None:
    cfg = CleanConfig.model_validate({"length": {"max_chars": 1000}, "quality": {"max_words": 100}})
    bads = [bad for _, _, bad in BAD.values()]
    result = run([*GOOD, *bads], cfg)
    assert result.table.column("text").to_pylist() == GOOD
    assert int(result.removed_docs.sum()) == len(GOOD) + len(bads)  # code 0 counts the kept ones


def test_chinese_is_kept_whole_with_keep_en_zh() -> None:
    cfg = CleanConfig.model_validate({"language": {"keep": ["en", "zh"]}})
    result = run([*GOOD, CHINESE], cfg)
    assert result.table.column("text").to_pylist() == [*GOOD, CHINESE]
    assert result.table.column("lang").to_pylist() == ["en", "en", "en", "zh"]
    assert removed(run([CHINESE], CleanConfig()), CleanConfig()) == {"language": 1}


def test_cjk_characters_are_words_for_counts_and_repetition() -> None:
    batch = tokenize([CHINESE, CHINESE[:20] * 6])
    assert batch.stat("words")[0] > 80 and batch.stat("cjk_words")[0] == batch.stat("words")[0]
    cfg = CleanConfig.model_validate({"language": {"keep": ["zh"]}})
    assert removed(run([CHINESE[:20] * 6], cfg), cfg)  # a repeated phrase is still repetition


def test_pii_placeholders_and_counts() -> None:
    text = ("Write to ana.lopez@example.com or call +1 (415) 555-0133 or 020 7946 0018; the server is "
            "at 192.168.10.20 and the year 1999 2000 2001 stays, as does version 1.2.3 and 3.14.")
    out, counts, modified = redact_pii(pl.Series([text, GOOD[0]]), PiiRule())
    assert out[0] == ("Write to <EMAIL> or call <PHONE> or <PHONE>; the server is at <IP_ADDRESS> and the "
                      "year 1999 2000 2001 stays, as does version 1.2.3 and 3.14.")
    assert counts == {"email": 1, "ip": 1, "phone": 2, "id_number": 0}
    assert modified.tolist() == [True, False]
    off, counts, _ = redact_pii(pl.Series([text]), PiiRule(phone=False, ip=False))
    assert "<EMAIL>" in off[0] and "555-0133" in off[0] and counts["phone"] == 0


def test_pii_in_the_stage_output_and_counts() -> None:
    cfg = CleanConfig()
    result = run([GOOD[0] + " Mail me at bob@mail.example.org, or ring 555-123-4567.", GOOD[1]], cfg)
    texts = result.table.column("text").to_pylist()
    assert texts[0].endswith("Mail me at <EMAIL>, or ring <PHONE>.") and texts[1] == GOOD[1]
    assert result.pii_docs == 1 and result.pii_matches == {"email": 1, "ip": 0, "phone": 1, "id_number": 0}


def test_normalize_unicode_and_controls() -> None:
    raw = ["cafe\u0301\r\nline\x00two\u200b\x85end", "plain"]
    series = pl.Series(raw)
    out = normalize(series, "NFC", scan_flags(raw)).to_list()
    assert out == ["caf\u00e9\nlinetwoend", "plain"]
    assert series.to_list() == raw  # the input is not rewritten in place
    assert normalize(pl.Series(["ﬁ ①"]), "NFKC", scan_flags(["ﬁ ①"])).to_list() == ["fi 1"]


def test_normalized_text_is_counted_redacted_and_gets_a_new_id() -> None:
    doc = GOOD[0] + " Write to bob\uff20example.com and ask for the caf\u0065\u0301 menu."
    cfg = CleanConfig.model_validate({"normalize": {"form": "NFKC"}})
    result = run([doc, GOOD[1]], cfg)
    text = result.table.column("text")[0].as_py()
    assert text == GOOD[0] + " Write to <EMAIL> and ask for the caf\u00e9 menu."
    assert (result.normalized, result.pii_docs, result.pii_matches["email"]) == (1, 1, 1)
    assert result.table.column("id").to_pylist() == [doc_id(text), doc_id(GOOD[1]) + "-1"]
    assert result.table.column("meta").to_pylist() == [f'{{"lang":"en","raw_id":"{doc_id(doc)}-0"}}', '{"lang":"en"}']


def test_language_fast_path_agrees_with_cld2() -> None:
    texts = [*GOOD, CHINESE, BAD["language"][2], "Le matin, les enfants marchent ensemble jusqu'à l'école du "
             "village. La boulangère ouvre sa boutique tous les jours à six heures, et les voisins achètent "
             "du pain chaud avant de partir au travail."]
    batch = tokenize_for_rules(texts)
    assert clearly_english(batch).tolist() == [True, True, True, False, False, False]
    fast, _ = detect_languages(texts, batch)
    slow, _ = detect_languages(texts)
    assert fast.tolist() == slow.tolist() == ["en", "en", "en", "zh", "de", "fr"]


def test_every_rule_name_is_in_the_report_keys() -> None:
    names = rule_names(CleanConfig())
    assert names[:4] == ["encoding", "length.min_chars", "length.max_chars", "language"]
    assert names[-3:] == ["decontaminate", "exact_dedup", "near_dedup"]
    assert "repetition.dup_ngram_char_fraction.10" in names and len(set(names)) == len(names)


unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=400)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unicode_text, min_size=1, max_size=6))
def test_never_crashes_on_arbitrary_unicode(texts: list[str]) -> None:
    cfg = CleanConfig.model_validate({"length": {"min_chars": 0}, "quality": {"min_words": 0},
                                      "lines": {"enabled": True, "languages": ["und", "en"], "min_sentences": 0}})
    result = run(texts, cfg)
    assert int(result.removed_docs.sum()) == len(texts)
    assert result.table.num_rows == int(result.removed_docs[0]) <= len(texts)
    kept = result.table.column("text").to_pylist()
    assert all(isinstance(t, str) for t in kept)
    batch = tokenize(texts)
    assert batch.tok_offsets[-1] == len(batch.tok_hash) and np.all(np.diff(batch.tok_offsets) >= 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unicode_text, min_size=1, max_size=6))
@example(["a [1] b[edit]\r\nc[citation needed] \n[[2]]\u2028 x{ y\x1c\n\n", "", "\n"])
def test_line_stats_split_and_count_as_python_does(texts: list[str]) -> None:
    from lmpipe.data.textstats import join_lines, line_stats

    lines = line_stats(texts)
    for d, text in enumerate(texts):
        expect = text.splitlines()
        rows = range(lines.line_offsets[d], lines.line_offsets[d + 1])
        assert len(rows) == len(expect)
        for r, line in zip(rows, expect, strict=True):
            words = line.strip().split()
            assert lines.stat("words")[r] == len(words)
            assert lines.stat("longest_word")[r] == max(map(len, words), default=0)
            assert bool(lines.stat("curly_brace")[r]) == ("{" in line)
    # every line kept: the rebuilt texts are the stripped lines without citations, as C4 writes them
    citation = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
    rebuilt = join_lines(lines, np.ones(len(lines.spans), np.bool_), np.arange(len(texts))).to_pylist()
    assert rebuilt == ["\n".join(citation.sub("", line.strip()) for line in t.splitlines()) for t in texts]


def test_embedded_default_keeps_the_same_documents():
    """The checks table changes nothing: a few hundred generated documents (English and Chinese,
    half of them noise) keep exactly the documents, and lose them to the rules, they did when each
    check was written out by hand (digest and counts recorded from that code)."""
    import hashlib

    from lmpipe.data.synthetic import generate

    texts = [t for t, _ in generate(300, seed=7, zh_fraction=0.2, noise_fraction=0.5)]
    cfg = CleanConfig.model_validate({"language": {"keep": ["en", "zh"]}})
    result = run(texts, cfg)
    kept = "\n".join(doc_id(t) for t in result.table.column("text").to_pylist())
    assert (len(texts), result.table.num_rows) == (540, 429)
    assert removed(result, cfg) == {
        "encoding": 17, "length.min_chars": 16, "language": 17, "quality.min_words": 23,
        "quality.max_symbol_word_ratio": 16, "quality.min_alpha_word_fraction": 3, "quality.min_stop_words": 6,
        "repetition.max_dup_line_fraction": 13}
    assert hashlib.sha256(kept.encode()).hexdigest()[:16] == "24112163eceb6ab0"


def test_config_fields_rule_names_and_checks_come_from_one_table() -> None:
    from lmpipe.data.checks import CHECKS, checks_of
    from lmpipe.data.config import LineRule, QualityRule, RepetitionRule
    from lmpipe.data.rules import document_rule_names

    extra = {"enabled", "languages", "top_ngram_char_fraction", "dup_ngram_char_fraction"}
    for group, model in (("quality", QualityRule), ("repetition", RepetitionRule), ("lines", LineRule)):
        fields = {k: f for k, f in model.model_fields.items() if k not in extra}
        assert list(fields) == [c.key for c in checks_of(group)]  # type: ignore[arg-type]
        for check in checks_of(group):  # type: ignore[arg-type]
            assert (fields[check.key].default, fields[check.key].description) == (check.default, check.description)
    names = document_rule_names(CleanConfig())
    doc_checks = [c.name for c in CHECKS if c.target == "doc"]
    assert [n for n in names if n in doc_checks] == doc_checks  # in table order
    assert {c.name for c in CHECKS if c.group != "lines"} <= set(BAD)  # each check has its bad document


C4_GOOD = ("The old baker opened his shop before dawn, as he had done for thirty years. He lit the ovens. "
           "He swept the floor and set out the baskets. The first customers arrived early. A girl asked him why.")


def c4(**lines: Any) -> CleanConfig:
    cfg = only("language", keep=["en", "zh"])
    cfg.lines = type(cfg.lines).model_validate({"enabled": True, **lines})
    return cfg


def test_c4_line_filters_remove_lines_and_keep_the_rest() -> None:
    page = ("Home | About | Contact\n  " + C4_GOOD + "[1]  \nIt was written up in the paper.[2][citation needed]\n"
            "This site uses cookies to improve your experience.\nPlease enable JavaScript to see the comments.\n"
            "Ok then.\nShare")
    result = run([page], c4())
    assert result.table.column("text").to_pylist() == [C4_GOOD + "\nIt was written up in the paper."]
    assert dict(zip(("max_word_length", "terminal_punctuation", "min_words_per_line", "javascript", "policy"),
                    result.lines_removed.tolist(), strict=True)) == {
        "max_word_length": 0, "terminal_punctuation": 2, "min_words_per_line": 1, "javascript": 1, "policy": 1}
    assert removed(result, c4()) == {}
    # each filter is its own switch; off, the lines stay
    kept = run([page], c4(javascript=False, policy=False, terminal_punctuation=False, min_words_per_line=0))
    assert kept.table.column("text").to_pylist() == [page.replace("[1]  ", "").replace("[2][citation needed]", "")
                                                    .replace("\n  ", "\n")]
    assert run([page], only("language", keep=["en"])).table.column("text").to_pylist() == [page]  # off by default


@pytest.mark.parametrize(("name", "bad"), [
    ("lines.lorem_ipsum", C4_GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."),
    ("lines.curly_braces", C4_GOOD + "\nThe code was function f() { return 1; } in the end."),
    ("lines.min_sentences", "Only two sentences are here. They end with a stop.\nmenu"),
])
def test_c4_document_filters_drop_the_document(name: str, bad: str) -> None:
    cfg = c4()
    result = run([C4_GOOD, bad], cfg)
    assert removed(result, cfg) == {name: 1}
    assert result.table.column("text").to_pylist() == [C4_GOOD]
    # a line removed before the document check does not drop it (C4's order: punctuation first)
    if name != "lines.min_sentences":
        assert removed(run([bad.rstrip(".")], cfg), cfg) == {}


def test_c4_line_filters_leave_chinese_alone() -> None:
    """Chinese ends sentences with '。' and puts no spaces between words: the English line rules
    would remove every line, so they apply only to clean.lines.languages (default en)."""
    cfg = c4()
    result = run([CHINESE, C4_GOOD], cfg)
    assert result.table.column("text").to_pylist() == [CHINESE, C4_GOOD]
    assert removed(run([CHINESE], c4(languages=["en", "zh"])), cfg) == {"lines.min_sentences": 1}
