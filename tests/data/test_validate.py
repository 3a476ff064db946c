"""The validate stage: real Great Expectations suites on tiny shards written in fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmpipe import engine
from lmpipe.config import Paths
from lmpipe.data import validate
from lmpipe.data.config import ValidateConfig
from lmpipe.data.shards import ShardWriter, doc_id, make_table, read_documents
from lmpipe.data.validate import derived_frame, load_suite, run
from lmpipe.errors import ConfigError, DataError, ValidationFailed

N_DOCS = 30


def english_docs(n: int = N_DOCS) -> list[str]:
    return [f"Document {i} tells a short story about a cat, a dog and the garden they share." for i in range(n)]


def write_docs(directory: Path, texts: list[str | None], metas: list[str] | None = None,
               ids: list[str] | None = None) -> None:
    """Write documents as shards (two of them, to exercise multi-shard reads)."""
    ids = ids or [doc_id(t or "") for t in texts]
    metas = metas or [json.dumps({"lang": "en"})] * len(texts)
    writer = ShardWriter(directory, shard_docs=max(1, len(texts) // 2 + 1))
    writer.write(make_table(ids, texts, ["synthetic"] * len(texts), metas))  # type: ignore[arg-type]
    writer.close()


@pytest.fixture
def project(tmp_path: Path) -> Paths:
    """A project whose raw data holds exact duplicates (allowed) and whose clean data is good."""
    texts = english_docs()
    raw_texts = texts + texts[:3]
    write_docs(tmp_path / "data" / "raw", raw_texts, metas=["{}"] * len(raw_texts))
    write_docs(tmp_path / "data" / "clean", texts)
    return Paths(tmp_path)


@pytest.fixture
def cfg() -> ValidateConfig:
    return ValidateConfig(min_docs=10)


def replace_clean(paths: Paths, texts: list[str | None], **kwargs: list[str]) -> None:
    for shard in paths.clean.glob("part-*.parquet"):
        shard.unlink()
    write_docs(paths.clean, texts, **kwargs)


def read_metrics(paths: Paths) -> dict:
    return json.loads((paths.metrics / "validate.json").read_text())


def test_good_data_passes_and_writes_data_docs(project: Paths, cfg: ValidateConfig) -> None:
    summary = run(cfg, project)
    assert summary["success"] == 1 and summary["raw_success"] == 1 and summary["clean_success"] == 1
    assert summary["raw_documents"] == N_DOCS + 3 and summary["clean_documents"] == N_DOCS
    assert summary["clean_evaluated_expectations"] == summary["clean_successful_expectations"] > 0
    docs = project.reports / "validation"
    assert (docs / "index.html").is_file()
    assert {p.parent.parent.parent.name for p in (docs / "validations").rglob("*.html")} == {"raw", "clean"}
    assert summary["artifacts"] == [str(project.metrics / "validate.json"), str(docs)]
    metrics = read_metrics(project)
    assert metrics["success"] is True
    assert metrics["suites"]["clean"]["failures"] == []
    assert not list(project.reports.glob(".validation*")), "temporary build directory left behind"


def test_duplicate_ids_in_clean_fail_and_keep_the_report(project: Paths, cfg: ValidateConfig) -> None:
    texts = english_docs()
    replace_clean(project, texts + texts[:2])
    with pytest.raises(ValidationFailed) as err:
        run(cfg, project)
    message = str(err.value)
    assert message.startswith("clean suite failed 1 of ")
    assert "expect_column_values_to_be_unique(id): 4 of 32 rows duplicated" in message
    assert doc_id(texts[0]) in message and "\n" not in message
    metrics = read_metrics(project)  # written although the stage failed
    assert metrics["success"] is False
    assert metrics["suites"]["raw"]["success"] is True
    clean = metrics["suites"]["clean"]
    assert clean["success"] is False
    assert clean["evaluated_expectations"] - clean["successful_expectations"] == 1
    assert clean["failures"][0].startswith("expect_column_values_to_be_unique(id)")
    assert (project.reports / "validation" / "index.html").is_file()


@pytest.mark.parametrize(
    ("bad_text", "expected"),
    [(None, "expect_column_values_to_not_be_null(text): 1 of 30 rows null"),
     ("", "expect_column_values_to_be_between(n_chars): 1 of 30 rows unexpected")],
)
def test_null_or_empty_text_fails(project: Paths, cfg: ValidateConfig, bad_text: str | None, expected: str) -> None:
    texts: list[str | None] = list(english_docs())
    texts[5] = bad_text
    replace_clean(project, texts)
    with pytest.raises(ValidationFailed, match=r"clean suite failed") as err:
        run(cfg, project)
    assert expected in str(err.value)


@pytest.mark.parametrize(("min_fraction", "passes"), [(0.9, True), (0.99, False)])
def test_language_outside_the_set_beyond_mostly_fails(project: Paths, min_fraction: float, passes: bool) -> None:
    metas = [json.dumps({"lang": "en"})] * (N_DOCS - 1) + [json.dumps({"lang": "fr"})]
    replace_clean(project, english_docs(), metas=metas)
    cfg = ValidateConfig(min_docs=10, languages=["en"], min_language_fraction=min_fraction)
    if passes:
        assert run(cfg, project)["clean_success"] == 1
        return
    with pytest.raises(ValidationFailed) as err:
        run(cfg, project)
    assert "expect_column_values_to_be_in_set(lang): 1 of 30 rows unexpected" in str(err.value)
    assert "'fr'" in str(err.value)


def test_too_few_documents_fail_both_suites(project: Paths) -> None:
    with pytest.raises(ValidationFailed) as err:
        run(ValidateConfig(min_docs=1000), project)
    message = str(err.value)
    assert "raw suite failed" in message and "clean suite failed" in message
    assert "expect_table_row_count_to_be_between: observed 30" in message


def test_suite_without_expectations_is_an_error(project: Paths, tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text(json.dumps({"name": "clean", "expectations": []}))
    with pytest.raises(ConfigError, match="no expectations"):
        run(ValidateConfig(min_docs=10, clean_suite="empty.json"), project)
    assert not (project.metrics / "validate.json").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [('{"expectations": [\n  {"type": }\n]}', r"bad\.json:2: not valid JSON"),
     ('[{"type": "expect_column_values_to_be_uniqe", "kwargs": {"column": "id"}}]',
      "unknown expectation type 'expect_column_values_to_be_uniqe'; did you mean 'expect_column_values_to_be_unique'"),
     ('[{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": "$min_rows"}}]',
      r"unknown template '\$min_rows'"),
     ('[{"type": "expect_column_values_to_be_unique", "kwargs": {"colum": "id"}}]', "invalid kwargs"),
     ('[{"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["id", "text"]}}]',
      "expect_compound_columns_to_be_unique cannot be judged from per-batch aggregates")],
)
def test_bad_suite_file_is_a_config_error(project: Paths, tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "bad.json").write_text(text)
    cfg = ValidateConfig(min_docs=10, raw_suite=str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match=match):
        load_suite("raw", cfg, project)


def test_missing_suite_file_names_the_key(project: Paths) -> None:
    with pytest.raises(ConfigError, match="validate.clean_suite: file not found"):
        load_suite("clean", ValidateConfig(clean_suite="nope.json"), project)


def test_shipped_suites_take_thresholds_from_params(project: Paths) -> None:
    cfg = ValidateConfig(min_docs=7, min_chars=3, languages=["en", "de"], min_language_fraction=0.5)
    clean = {(type(e).__name__, getattr(e, "column", None)): e for e in load_suite("clean", cfg, project).expectations}
    assert clean["ExpectTableRowCountToBeBetween", None].min_value == 7
    assert clean["ExpectColumnValuesToBeBetween", "n_chars"].min_value == 3
    assert clean["ExpectColumnValuesToBeInSet", "lang"].value_set == ["en", "de"]
    assert clean["ExpectColumnValuesToBeInSet", "lang"].mostly == 0.5
    raw_types = {type(e).__name__ for e in load_suite("raw", cfg, project).expectations}
    assert "ExpectColumnValuesToBeUnique" not in raw_types  # raw may hold exact duplicates


def test_derived_columns(tmp_path: Path) -> None:
    texts = ["héllo wörld", "abc", None]
    metas = [json.dumps({"lang": "de"}), "not json", json.dumps(["a"])]
    write_docs(tmp_path / "docs", texts, metas=metas)
    frame = derived_frame(read_documents(tmp_path / "docs"))
    assert frame["n_chars"].tolist() == [11, 3, 0]
    assert frame["meta_kind"].tolist() == ["object", "invalid", "array"]
    assert frame["lang"].tolist() == ["de", "und", "und"]


def test_missing_clean_data_is_a_data_error(tmp_path: Path, cfg: ValidateConfig) -> None:
    write_docs(tmp_path / "data" / "raw", english_docs())
    with pytest.raises(DataError, match="run the stage that produces it"):
        run(cfg, Paths(tmp_path))


def _big_clean(paths: Paths) -> list[str]:
    """301 clean documents in 3 shards: a repeated id 290 rows apart, 2 French documents side by side."""
    texts = [f"Document {i} tells a longer story about a cat, a dog and the garden they share." for i in range(300)]
    texts.append(texts[3])
    metas = [json.dumps({"lang": "fr" if i in (100, 101) else "en"}) for i in range(301)]
    for shard in paths.clean.glob("part-*.parquet"):
        shard.unlink()
    writer = ShardWriter(paths.clean, shard_docs=120)
    writer.write(make_table([doc_id(t) for t in texts], texts, ["synthetic"] * 301, metas))
    writer.close()
    return texts


def test_ge_sees_bounded_frames_and_judges_the_whole_corpus(project: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of at most sample_docs rows; the verdicts are those of one GE run on the whole corpus:
    a duplicate 290 rows apart is found, 2 of 301 French documents pass `mostly` (though 2 of one
    batch of 64 would not)."""
    texts = _big_clean(project)
    sizes: list[int] = []
    real = validate.SuiteRun.run

    def recording(self: validate.SuiteRun, frame: pd.DataFrame) -> list:
        sizes.append(len(frame))
        return real(self, frame)

    monkeypatch.setattr(validate.SuiteRun, "run", recording)
    cfg = ValidateConfig(min_docs=10, languages=["en"], min_language_fraction=0.99, sample_docs=64)
    with pytest.raises(ValidationFailed) as err:
        run(cfg, project)
    assert max(sizes) <= 64 and len(sizes) > 6, sizes  # 301 documents, never more than 64 rows at once
    assert "clean suite failed 1 of " in str(err.value)
    assert "expect_column_values_to_be_unique(id): 2 of 301 rows duplicated (0.66%)" in str(err.value)
    assert doc_id(texts[3]) in str(err.value)
    batched = read_metrics(project)["suites"]
    assert batched["clean"]["documents"] == 301
    pages = (project.reports / "validation" / "validations" / "clean").rglob("*.html")
    assert [p.parent.parent.name for p in pages] == ["sample-64-of-301-documents"]  # the Data Docs show the sample

    monkeypatch.setattr(validate.SuiteRun, "run", real)
    with pytest.raises(ValidationFailed):
        run(cfg.model_copy(update={"sample_docs": 10_000}), project)  # the whole corpus in one GE run
    assert read_metrics(project)["suites"] == batched


def test_sample_is_bounded_and_independent_of_the_batch_size(project: Paths) -> None:
    _big_clean(project)
    spec = load_suite("clean", ValidateConfig(), project)
    files = sorted(project.clean.glob("part-*.parquet"))
    samples = []
    for rows in (7, 50, 400):
        sample = validate.Sample(50)
        for table, keys in validate.iter_batches(files, rows):
            assert table.num_rows <= rows
            sample.add(table, keys)
        samples.append(sample.frame()["id"].tolist())
    assert len(samples[0]) == 50 and samples[0] == samples[1] == samples[2]
    assert len(set(samples[0])) == 50 and samples[0] != read_documents(project.clean)["id"].to_pylist()[:50]
    assert spec.kinds.count("unique") == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_engine_gives_the_local_verdicts(project: Paths) -> None:
    """Each shard judged by a Ray task: the same metrics/validate.json as the local stream."""
    _big_clean(project)
    cfg = ValidateConfig(min_docs=10, languages=["en"], min_language_fraction=0.99, sample_docs=64)
    results = []
    for kind in ("local", "ray"):
        with engine.use(engine.EngineConfig(kind=kind)), pytest.raises(ValidationFailed) as err:  # type: ignore[arg-type]
            run(cfg, project)
        results.append((str(err.value), read_metrics(project)["suites"]))
    assert results[0] == results[1]


def test_uniqueness_hashes_spill_to_partitions(tmp_path: Path) -> None:
    """Duplicates counted one on-disk partition at a time, across batches: as over all values at once."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 400, 300).astype(np.uint64) for _ in range(4)]
    spill = validate.HashSpill(tmp_path, partitions=3)
    for hashes in batches:
        spill.add(validate.Partial(hashes={2: [hashes[:100], hashes[100:]]}))
    assert len(list(tmp_path.glob("unique-2-*.u64"))) == 3
    values, counts = np.unique(np.concatenate(batches), return_counts=True)
    rows, examples = spill.duplicated(2)
    assert rows == counts[counts > 1].sum() and 0 < rows < 1200
    assert len(examples) == 20 and set(examples.tolist()) <= set(values[counts > 1].tolist())
