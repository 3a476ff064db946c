"""Chinese through clean: the zh preset keeps well-formed prose and Markdown and removes copies,
spam and boilerplate; jieba words and FineWeb-2's thresholds for Chinese, the English path
untouched; Chinese PII; Markdown judged as structure; removals per language in the report."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rules import BAD, GOOD, removed, run
from zh_corpus import PROSE, corpus

from lmpipe.config import Paths, load_params
from lmpipe.data import clean
from lmpipe.data.config import CleanConfig, PiiRule, chinese_profile
from lmpipe.data.pii import ID_NUMBER_PATTERN, redact_pii, valid_id_number
from lmpipe.data.rules import judge, tokenize_for_rules
from lmpipe.data.segment import markdown_prose, segment_words, word_counts
from lmpipe.data.shards import ShardWriter, make_table, read_documents
from lmpipe.data.synthetic import generate
from lmpipe.data.synthetic_zh import resident_id
from lmpipe.data.textstats import tokenize

REPO = Path(__file__).parents[2]
# sentences of one paragraph each, as a files source with txt_split: paragraph gives them
SHORT = ["今天下午我去图书馆借了两本关于城市历史的书，准备这个周末在家里慢慢地读完它们。",
         "这家小店的面条做得很地道，汤头浓郁，价格也不贵，所以每到中午门口总是排着长队。"]


def zh_preset() -> CleanConfig:
    return load_params(REPO / "configs" / "zh.yaml").clean.model_copy(update={"workers": 1})


def clean_fixture(tmp_path: Path, cfg: CleanConfig) -> tuple[dict[str, Counter[str]], dict]:
    docs = [*corpus(), *((t, "prose") for t in SHORT)]
    paths = Paths(tmp_path)
    writer = ShardWriter(paths.raw, 1000)
    writer.write(make_table([f"{i:03d}" for i in range(len(docs))], [t for t, _ in docs], ["zh"] * len(docs),
                            [json.dumps({"what": what}) for _, what in docs]))
    writer.close()
    clean.run(cfg, paths)
    kept = Counter(json.loads(d["meta"])["what"] for d in read_documents(paths.clean).to_pylist())
    return {"given": Counter(what for _, what in docs), "kept": kept}, json.loads(
        (paths.clean / "clean_report.json").read_text())


def test_zh_preset_keeps_prose_and_markdown_and_removes_copies_spam_boilerplate(tmp_path: Path) -> None:
    counts, report = clean_fixture(tmp_path, zh_preset())
    given, kept = counts["given"], counts["kept"]
    good = given["prose"] + given["markdown"]
    assert kept["prose"] + kept["markdown"] >= 0.95 * good
    assert kept["prose"] == given["prose"] and kept["markdown"] == given["markdown"]
    assert kept["exact_copy"] == kept["near_copy"] == kept["spam"] == 0
    # One boilerplate text passes: a cookie notice written as a complete, well-formed sentence is prose
    # to every rule here (catching it needs a policy-line filter such as C4's).
    assert kept["boilerplate"] <= 1
    removed_by_rule = {name: entry["docs"] for name, entry in report["removed"].items() if entry["docs"]}
    assert removed_by_rule == {"quality.min_words": 3, "quality.min_alpha_word_fraction": 1,
                               "quality.min_stop_words": 2, "exact_dedup": 4, "near_dedup": 4}
    zh = report["by_language"]["zh"]
    assert zh["input"] == sum(given.values()) and zh["output"] == sum(kept.values())
    assert zh["removed"] == removed_by_rule


def test_without_the_chinese_profile_and_markdown_paragraphs_are_lost(tmp_path: Path) -> None:
    # characters as words (the CJK fallback) and English thresholds, as before Chinese had a profile
    fallback = CleanConfig.model_validate({"language": {"keep": ["zh"]}, "languages": {}, "workers": 1})
    counts, report = clean_fixture(tmp_path, fallback)
    lost = counts["given"]["prose"] - counts["kept"]["prose"]
    assert lost >= 3  # the short paragraphs (under 50 characters-as-words) and the bullet list
    assert report["removed"]["quality.max_bullet_line_fraction"]["docs"] >= 1


def test_jieba_words_and_the_character_fallback() -> None:
    text = "自然语言处理是人工智能的一个重要分支。"
    assert segment_words([text])[0].split() == ["自然语言", "处理", "是", "人工智能", "的", "一个", "重要", "分支", "。"]
    # words as clean counts them: jieba's (punctuation aside), or each character in the fallback
    assert word_counts([text], "jieba")[0] == 9 and word_counts([text], "characters")[0] == 18
    assert word_counts(["two words"], "jieba")[0] == 2


def test_chinese_thresholds_apply_to_chinese_documents_only() -> None:
    cfg = CleanConfig.model_validate({"language": {"keep": ["en", "zh"]}})
    assert cfg.languages["zh"] == chinese_profile()  # FineWeb-2's cmn_Hani settings by default
    paragraph = PROSE[0] + PROSE[1]
    assert removed(run([GOOD[0], paragraph], cfg), cfg) == {}
    # a threshold of the Chinese profile judges Chinese documents, and only them
    strict = CleanConfig.model_validate({"language": {"keep": ["en", "zh"]}, "languages": {
        "zh": {"segmenter": "jieba", "quality": {"min_words": 200}}}})
    assert removed(run([GOOD[0], paragraph], strict), strict) == {"quality.min_words": 1}
    assert removed(run([GOOD[0]], strict), strict) == {}
    # English documents get exactly the verdicts they got before Chinese had a profile
    english = [*GOOD, *(bad for _, _, bad in BAD.values())]
    plain = cfg.model_copy(update={"languages": {}})
    assert run(english, cfg).removed_docs.tolist() == run(english, plain).removed_docs.tolist()


def test_chinese_repetition_is_measured_on_words() -> None:
    cfg = CleanConfig.model_validate({"language": {"keep": ["zh"]}})
    spam = "\n".join(["限时特价，全场商品一律五折，点击链接马上抢购！"] * 12)
    assert removed(run([spam], cfg), cfg)
    repeated = "我们今天学习了很多新知识，" * 12 + "老师非常满意。"
    names = removed(run([repeated], cfg), cfg)
    assert len(names) == 1 and next(iter(names)).startswith("repetition.")


def test_chinese_pii_mobile_landline_id_email_ip() -> None:
    good_id = resident_id(random.Random(3))
    assert valid_id_number(good_id)
    wrong_id = good_id[:-1] + ("0" if good_id[-1] != "0" else "1")
    assert not valid_id_number(wrong_id)
    text = (f"请联系张老师，手机13812345678或者138-1234-5678，座机010-62751234，身份证号{good_id}，邮箱"
            f"zhang.wei@example.cn，服务器地址192.168.1.20。订单号{wrong_id}不变，2023年的数字12345也不变。")
    out, counts, modified = redact_pii(pl.Series([text, "没有个人信息的一句话。"]), PiiRule())
    assert out[0] == ("请联系张老师，手机<PHONE>或者<PHONE>，座机<PHONE>，身份证号<ID_NUMBER>，邮箱<EMAIL>，服务器地址"
                      f"<IP_ADDRESS>。订单号{wrong_id}不变，2023年的数字12345也不变。")
    assert counts == {"email": 1, "ip": 1, "id_number": 1, "phone": 3} and modified.tolist() == [True, False]
    off, counts, _ = redact_pii(pl.Series([text]), PiiRule(id_number=False))
    assert good_id in off[0] and counts["id_number"] == 0
    # 17 digits and a check character; a longer digit run is no ID number
    assert not re.search(ID_NUMBER_PATTERN.replace("(?-u:\\b)", r"\b"), "9" + good_id)


def test_markdown_is_structure_not_noise() -> None:
    article = ("## 安装\n\n1. 安装 `python` 和依赖。\n2. 运行测试。\n\n```python\nprint('#' * 80)\n```\n\n"
               "损失是 $\\mathcal{L} = -\\log p$，见[文档](https://example.org)。\n\n$$x^2$$\n\n| 模型 | 参数 |\n"
               "| --- | --- |\n| 小 | 1 |\n\n> 提示：先备份。\n\n---\n\n价格是 $5 和 $10。")
    prose = markdown_prose(pl.Series([article])).to_list()[0]
    assert prose.split() == ["安装", "安装", "python", "和依赖。", "运行测试。", "损失是", "，见文档。", "提示：先备份。",
                             "价格是", "$5", "和", "$10。"]
    heading_list = ("# 出门前的准备\n\n- 看一看天气预报，决定要不要带伞。\n- 检查钥匙、钱包和手机有没有带齐。\n"
                    "- 关好家里的门窗，把电器的插头拔掉。\n- 算好路上需要的时间，提前十分钟出发。\n"
                    "- 如果要坐地铁，先查一下最近的站在哪里。")
    zh = chinese_profile()
    zh.quality = zh.quality.model_copy(update={"min_words": 20})  # a paragraph-sized document
    cfg = CleanConfig.model_validate({"language": {"keep": ["zh"]}, "markdown": {"enabled": True},
                                      "languages": {"zh": zh.model_dump()}})
    bare_list = heading_list.split("\n\n", 1)[1]
    assert removed(run([heading_list, bare_list], cfg), cfg) == {}
    # without it, a list of sentences looks like a menu (Gopher: over 90% of lines start with a bullet)
    plain = cfg.model_copy(update={"markdown": cfg.markdown.model_copy(update={"enabled": False})})
    assert removed(run([heading_list, bare_list], plain), plain) == {"quality.max_bullet_line_fraction": 1}


def test_report_counts_removals_per_language(tmp_path: Path) -> None:
    records = list(generate(300, noise_fraction=0.15, seed=5, zh_fraction=0.2))
    paths = Paths(tmp_path)
    writer = ShardWriter(paths.raw, 1000)
    writer.write(make_table([f"{i}" for i in range(len(records))], [t for t, _ in records], ["s"] * len(records),
                            [json.dumps(m, ensure_ascii=False) for _, m in records]))
    writer.close()
    summary = clean.run(CleanConfig.model_validate({"language": {"keep": ["en", "zh"]}, "workers": 1}), paths)
    report = json.loads((paths.clean / "clean_report.json").read_text())
    by_language = report["by_language"]
    assert sum(e["input"] for e in by_language.values()) == summary["docs_in"]
    assert sum(e["output"] for e in by_language.values()) == summary["docs_out"]
    for name, entry in report["removed"].items():  # the per-language removals add up to each rule's
        assert sum(e["removed"].get(name, 0) for e in by_language.values()) == entry["docs"], name
    zh_given = Counter(m.get("noise", "good") for _, m in records if m.get("language") == "zh")
    assert by_language["zh"]["output"] == zh_given["good"] + zh_given["pii"]  # PII is redacted, not dropped
    assert by_language["zh"]["removed"]["exact_dedup"] == zh_given["exact_duplicate"]
    assert by_language["zh"]["removed"]["near_dedup"] == zh_given["near_duplicate"]
    out = [d for d in read_documents(paths.clean).to_pylist() if json.loads(d["meta"])["lang"] == "zh"]
    assert not any("@example.cn" in d["text"] for d in out)
    assert np.mean(["<ID_NUMBER>" in d["text"] or "<PHONE>" in d["text"] for d in out]) > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_english_documents_do_not_change_with_a_chinese_share(seed: int) -> None:
    english = list(generate(200, noise_fraction=0.15, seed=seed))
    mixed = list(generate(200, noise_fraction=0.15, seed=seed, zh_fraction=0.1))
    assert [r for r in mixed if r[1].get("language") != "zh" or r[1].get("noise") == "non_english"] == english
    assert sum(r[1].get("language") == "zh" for r in mixed) == 20 + round(0.15 * 20)


cjk_text = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("的是了，。、“”《》中文字词\n ")),
                   max_size=300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cjk_text, min_size=1, max_size=5), st.booleans())
def test_chinese_path_never_crashes(texts: list[str], markdown: bool) -> None:
    cfg = CleanConfig.model_validate({"length": {"min_chars": 0}, "language": {"keep": ["zh"]},
                                      "markdown": {"enabled": markdown}})
    series = pl.Series(texts, dtype=pl.String)
    judged = markdown_prose(series) if markdown else series
    batch = tokenize_for_rules(judged.to_arrow())
    n = len(texts)
    verdict = judge(cfg, chars=series.str.len_chars().to_numpy().astype(float), bad_fraction=np.zeros(n),
                    langs=np.array(["zh"] * n, dtype=object), confidence=np.ones(n), batch=batch, texts=judged)
    assert verdict.codes.shape == (n,) and verdict.codes.min() >= 0
    assert verdict.codes.max() <= len(verdict.names)
    assert not np.isin(verdict.codes, [verdict.code_of["language"]]).any()  # every document took the Chinese path
    segmented = tokenize(segment_words(texts), split_cjk=False)
    assert segmented.tok_offsets[-1] == len(segmented.tok_hash)
