"""The ``validate`` stage: Great Expectations suites on data/raw and data/clean.

Reads the parquet shards of ``data/raw`` and ``data/clean`` and the two suites (shipped in
``lmpipe/data/suites/`` or named by ``validate.raw_suite`` / ``validate.clean_suite``). Writes the
Data Docs HTML site to ``reports/validation/`` and ``metrics/validate.json``. A failed suite fails
the stage with :class:`~lmpipe.errors.ValidationFailed` after both outputs are written, so the
report of what failed is always there to read.

Suites are JSON in Great Expectations' own suite layout (``{"expectations": [{"type", "kwargs",
"notes"}]}``, or a bare list of expectations). A kwarg written as ``"$name"`` is filled from the
field ``name`` of :class:`~lmpipe.data.config.ValidateConfig`, so thresholds live in params.yaml.
Expectations see the four shard columns plus three derived ones (:func:`derived_frame`):
``n_chars``, ``meta_kind`` and ``lang``.

Memory does not grow with the corpus. The shards are streamed (pyarrow, ``validate.sample_docs``
rows at a time) and GE runs on each batch; the verdict of each expectation is then computed from
the batches' aggregates (:func:`merge`): unexpected and element counts for row-wise expectations,
row counts, weighted means, minima and maxima, and for uniqueness one 64-bit hash per value,
written to disk partitions and counted one partition at a time (:class:`HashSpill`). So
the corpus-wide verdict is the one GE gives on the whole table, while no frame handed to GE holds
more than ``sample_docs`` rows. The Data Docs site shows GE's own run on a deterministic sample of
``sample_docs`` documents (the rows with the smallest hash of their place in the corpus); the
verdicts in ``metrics/validate.json`` and the stage's exit are the corpus-wide ones. On
``engine.kind: ray`` each shard's aggregates and sample are computed by one Ray task.

An expectation whose corpus-wide verdict cannot be assembled from per-batch aggregates (one
comparing rows across batches, say ``expect_compound_columns_to_be_unique``) is a ConfigError when
the suite is read: validation never quietly judges a sample where the suite asked for the corpus.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmpipe.config import Paths
from lmpipe.data.config import ValidateConfig
from lmpipe.data.gate import record_validation
from lmpipe.data.shards import COLUMNS, SCHEMA, conform, count_documents, shard_files
from lmpipe.errors import ConfigError, DataError, ValidationFailed
from lmpipe.io import atomic_dir

log = logging.getLogger(__name__)

SUITES = ("raw", "clean")
DOCS_SITE = "lmpipe"
UNDETERMINED_LANG = "und"  # ISO 639-2 code for "undetermined"
_TEMPLATE = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_SUITE_KEYS = {"name", "expectations", "meta", "notes", "id", "suite_parameters"}
_EXPECTATION_KEYS = {"type", "kwargs", "meta", "notes", "severity", "id", "rendered_content"}
_PASSED_THROUGH = ("meta", "notes", "severity")


@dataclass
class SuiteSpec:
    """A suite file read and checked: its expectations (GE objects) and where it came from."""

    name: str
    source: str
    expectations: list[Any]
    notes: str | list[str] | None = None
    kinds: list[str] = field(default_factory=list)  # how each expectation's batches merge (MERGES)
    text: str = ""  # the suite file and its template values: what a Ray task parses it from
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    """One expectation judged on the whole corpus, assembled from its per-batch results."""

    type: str
    kwargs: dict[str, Any]
    success: bool
    result: dict[str, Any]
    error: str | None = None


@dataclass
class SuiteOutcome:
    """The result of one suite on one dataset, in the form metrics/validate.json stores it."""

    name: str
    success: bool
    documents: int
    evaluated: int
    successful: int
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"success": self.success, "documents": self.documents,
                "evaluated_expectations": self.evaluated, "successful_expectations": self.successful,
                "failures": self.failures}

    def summary_line(self) -> str:
        return (f"{self.name} suite failed {self.evaluated - self.successful} of {self.evaluated} "
                f"expectations: " + "; ".join(self.failures))


# ------------------------------------------------------------------------------------------ suites


def suite_file(name: str, cfg: ValidateConfig, paths: Paths) -> tuple[str, str]:
    """Return (text, where) of the suite ``name``: ``cfg.<name>_suite`` (relative to the project
    root) when set, else the suite shipped in the package. Raises ConfigError if it cannot be read."""
    configured: str | None = getattr(cfg, f"{name}_suite")
    if configured is None:
        resource = resources.files("lmpipe.data").joinpath("suites", f"{name}.json")
        return resource.read_text(encoding="utf-8"), str(resource)
    path = Path(configured)
    path = path if path.is_absolute() else paths.root / path
    if not path.is_file():
        raise ConfigError(f"validate.{name}_suite: file not found: {path}")
    return path.read_text(encoding="utf-8"), str(path)


def fill_templates(value: Any, values: dict[str, Any], where: str) -> Any:
    """Replace every string ``"$name"`` inside ``value`` by ``values[name]`` (recursively)."""
    if isinstance(value, str) and (match := _TEMPLATE.match(value)):
        if match[1] not in values:
            known = ", ".join(f"${k}" for k in sorted(values))
            raise ConfigError(f"{where}: unknown template {value!r}; known: {known}")
        return values[match[1]]
    if isinstance(value, dict):
        return {k: fill_templates(v, values, where) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_templates(v, values, where) for v in value]
    return value


# How the per-batch results of an expectation make its corpus-wide verdict (see :func:`merge`).
MERGES = {
    "rows": "row-wise: unexpected and element counts add up, judged with `mostly`",
    "unique": "uniqueness: a 64-bit hash per value, duplicates counted across all batches",
    "all": "the same on every batch (schema, column types): passes when every batch passes",
    "row_count": "table row count: the batches' counts add up, judged with min_value/max_value/value",
    "mean": "column mean: the batches' means weighted by their non-null counts",
    "min": "column minimum: the smallest of the batches'",
    "max": "column maximum: the largest of the batches'",
    "sum": "column sum: the batches' sums add up",
}
_SCHEMA_TYPES = {"expect_table_columns_to_match_set", "expect_table_columns_to_match_ordered_list",
                 "expect_column_to_exist", "expect_table_column_count_to_equal",
                 "expect_table_column_count_to_be_between"}
_AGGREGATE_TYPES = {"expect_table_row_count_to_be_between": "row_count", "expect_table_row_count_to_equal": "row_count",
                    "expect_column_mean_to_be_between": "mean", "expect_column_min_to_be_between": "min",
                    "expect_column_max_to_be_between": "max", "expect_column_sum_to_be_between": "sum"}
_CROSS_ROW = {"expect_compound_columns_to_be_unique", "expect_multicolumn_values_to_be_unique"}


def merge_kind(type_: str, impl: type, where: str) -> str:
    """The key of :data:`MERGES` for an expectation type; ConfigError when there is none."""
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )

    if type_ == "expect_column_values_to_be_unique":
        return "unique"
    if type_ in _SCHEMA_TYPES:
        return "all"
    if type_ in _AGGREGATE_TYPES:
        return _AGGREGATE_TYPES[type_]
    if type_ not in _CROSS_ROW and issubclass(impl, ColumnMapExpectation | ColumnPairMapExpectation
                                             | MulticolumnMapExpectation):
        return "rows"
    raise ConfigError(f"{where}: {type_} cannot be judged from per-batch aggregates, so it cannot be judged on a "
                      "corpus that is never loaded whole; use row-wise expectations, uniqueness of one column, "
                      f"schema checks or {', '.join(sorted(_AGGREGATE_TYPES))}")


def parse_suite(name: str, text: str, source: str, values: dict[str, Any]) -> SuiteSpec:
    """Parse suite JSON into GE expectation objects, templates filled from ``values``.

    Raises ConfigError for invalid JSON, an unexpected layout, zero expectations (a suite that
    checks nothing must not pass), an unknown expectation type or kwargs GE rejects.
    """
    from great_expectations.exceptions import ExpectationNotFoundError
    from great_expectations.expectations.registry import (
        get_expectation_impl,
        list_registered_expectation_implementations,
    )

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    notes = None
    if isinstance(data, dict):
        unknown = sorted(set(data) - _SUITE_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_SUITE_KEYS))}")
        notes = data.get("notes")
        data = data.get("expectations", [])
    if not isinstance(data, list):
        raise ConfigError(f"{source}: 'expectations' must be a list of {{\"type\": ..., \"kwargs\": {{...}}}}")
    if not data:
        raise ConfigError(f"{source}: the {name} suite has no expectations; a suite that checks nothing cannot pass")
    expectations, kinds = [], []
    for idx, item in enumerate(data):
        where = f"{source}: expectations[{idx}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ConfigError(f"{where}: expected an object with a string 'type' and a 'kwargs' object")
        unknown = sorted(set(item) - _EXPECTATION_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected type, kwargs, notes, meta")
        kwargs = item.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: 'kwargs' must be an object")
        kwargs = fill_templates(kwargs, values, f"{where} ({item['type']})")
        try:
            impl = get_expectation_impl(item["type"])
        except ExpectationNotFoundError:
            close = difflib.get_close_matches(item["type"], list_registered_expectation_implementations(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see https://greatexpectations.io/expectations"
            raise ConfigError(f"{where}: unknown expectation type {item['type']!r}; {hint}") from None
        extra = {k: item[k] for k in _PASSED_THROUGH if k in item}
        try:
            expectations.append(impl(**kwargs, **extra))
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            detail = " ".join(str(err).split())
            raise ConfigError(f"{where}: invalid kwargs for {item['type']}: {detail}") from None
        kinds.append(merge_kind(item["type"], impl, where))
    return SuiteSpec(name=name, source=source, expectations=expectations, notes=notes, kinds=kinds, text=text,
                     values=values)


def load_suite(name: str, cfg: ValidateConfig, paths: Paths) -> SuiteSpec:
    """Read and parse the ``raw`` or ``clean`` suite with templates filled from ``cfg``."""
    text, source = suite_file(name, cfg, paths)
    values = cfg.model_dump(mode="json", exclude={"raw_suite", "clean_suite"})
    return parse_suite(name, text, source, values)


# -------------------------------------------------------------------------------------------- data


def _meta_kind_and_lang(meta: str | None) -> tuple[str, str]:
    if meta is None:
        return "null", UNDETERMINED_LANG
    try:
        value = json.loads(meta)
    except ValueError:
        return "invalid", UNDETERMINED_LANG
    if isinstance(value, dict):
        lang = value.get("lang")
        return "object", lang if isinstance(lang, str) and lang else UNDETERMINED_LANG
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null"), UNDETERMINED_LANG


def derived_frame(table: pa.Table) -> pd.DataFrame:
    """A table of documents as the pandas frame the suites see, with the derived columns:

    - ``n_chars``: characters (code points) of ``text``; 0 where text is missing.
    - ``meta_kind``: JSON type of ``meta`` ("object", "array", ...), "invalid" if it does not parse.
    - ``lang``: ``meta["lang"]`` where meta is an object carrying one, else "und".
    """
    n_chars = pc.fill_null(pc.utf8_length(table["text"]), 0)
    frame = table.to_pandas()
    frame["n_chars"] = n_chars.to_numpy().astype("int64")
    kinds_langs = [_meta_kind_and_lang(m) for m in table["meta"].to_pylist()]
    frame["meta_kind"] = pd.Series([k for k, _ in kinds_langs], index=frame.index, dtype="str")
    frame["lang"] = pd.Series([lang for _, lang in kinds_langs], index=frame.index, dtype="str")
    return frame


def iter_batches(files: list[Path], rows: int, first_shard: int = 0) -> Any:
    """Yield (table of at most ``rows`` documents, sample keys) over ``files`` in order, read a
    record batch at a time. A sample key is a 64-bit hash of the row's place (shard number, row),
    so the sample is the same whichever engine or batch size reads the corpus."""
    pending: list[pa.Table] = []
    keys: list[np.ndarray] = []
    held = 0
    for number, path in enumerate(files, start=first_shard):
        try:
            reader = pq.ParquetFile(path)
            start = 0
            for record in reader.iter_batches(batch_size=rows):
                table = conform(pa.Table.from_batches([record]), where=str(path))
                pending.append(table)
                keys.append(_sample_keys(number, start, table.num_rows))
                start += table.num_rows
                held += table.num_rows
                while held >= rows:
                    whole, all_keys = pa.concat_tables(pending), np.concatenate(keys)
                    yield whole.slice(0, rows), all_keys[:rows]
                    pending, keys, held = [whole.slice(rows)], [all_keys[rows:]], held - rows
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a readable parquet file: {err}", path=str(path)) from None
    if held or not files:
        yield (pa.concat_tables(pending) if pending else SCHEMA.empty_table(),
               np.concatenate(keys) if keys else np.zeros(0, np.uint64))


def _sample_keys(shard: int, start: int, rows: int) -> np.ndarray:
    """splitmix64 of ``shard << 32 | row``: a well-mixed, reproducible key per row."""
    x = (np.uint64(shard) << np.uint64(32)) + np.arange(start, start + rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class Sample:
    """The ``size`` rows with the smallest sample keys seen so far (a bottom-k sample: mergeable)."""

    size: int
    table: pa.Table = field(default_factory=lambda: SCHEMA.empty_table())
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def add(self, table: pa.Table, keys: np.ndarray) -> None:
        table, keys = pa.concat_tables([self.table, table]), np.concatenate([self.keys, keys])
        if len(keys) > self.size:
            keep = np.sort(np.argpartition(keys, self.size - 1)[: self.size])
            table, keys = table.take(pa.array(keep)), keys[keep]
        self.table, self.keys = table, keys

    def merge(self, other: Sample) -> None:
        self.add(other.table, other.keys)

    def frame(self) -> pd.DataFrame:
        order = np.argsort(self.keys, kind="stable")
        return derived_frame(self.table.take(pa.array(order)))


# --------------------------------------------------------------------------------------- reporting


def _example(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(info: Any) -> str | None:
    """GE puts either one exception record or a dict of them (keyed by metric) in exception_info."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


def describe_failure(verdict: Verdict) -> str:
    """One phrase for a failed expectation: ``type(column): what was observed``."""
    column = verdict.kwargs.get("column")
    head = f"{verdict.type}({column})" if column else verdict.type
    if verdict.error:
        return f"{head}: error: {verdict.error}"
    res = verdict.result
    if "unexpected_count" in res:
        what = {"expect_column_values_to_be_unique": "duplicated",
                "expect_column_values_to_not_be_null": "null"}.get(verdict.type, "unexpected")
        pct = res.get("unexpected_percent") or 0.0
        text = f"{res['unexpected_count']} of {res.get('element_count')} rows {what} ({pct:.2f}%"
        mostly = verdict.kwargs.get("mostly")
        text += f", at most {100 * (1 - mostly):.2f}% allowed)" if mostly not in (None, 1) else ")"
        samples = list(dict.fromkeys(_example(v) for v in res.get("partial_unexpected_list") or []))[:3]
        return f"{head}: {text}" + (f", e.g. {', '.join(samples)}" if samples else "")
    missing = (res.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        return f"{head}: missing columns {', '.join(map(str, missing))}"
    if "observed_value" in res:
        return f"{head}: observed {_example(res['observed_value'], 80)}"
    return f"{head}: failed"


# --------------------------------------------------------------------------------------------- run

_RESULT_KEYS = ("element_count", "missing_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list",
                "observed_value", "details")
_EXAMPLES = 20  # GE's partial_unexpected_list holds as many


def _context(docs_dir: Path | None = None) -> Any:
    """One ephemeral GE context (in-memory stores); with ``docs_dir``, a single Data Docs site there."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context: Any = gx.get_context(mode="ephemeral")  # Any: GE types its config as a union
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars in our logs
    for site in list(context.get_config().data_docs_sites or {}):
        context.delete_data_docs_site(site)  # the default site writes to a stray temp dir
    if docs_dir is not None:
        context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


class SuiteRun:
    """One suite registered in a GE context, run on one frame after another."""

    def __init__(self, context: Any, spec: SuiteSpec, run_name: str | None = None) -> None:
        import great_expectations as gx

        fresh = parse_suite(spec.name, spec.text, spec.source, spec.values)  # its own objects: GE gives them ids
        source = context.data_sources.add_or_update_pandas("lmpipe")
        batch = source.add_dataframe_asset(spec.name).add_batch_definition_whole_dataframe(spec.name)
        self.suite = context.suites.add(gx.ExpectationSuite(
            name=spec.name, expectations=fresh.expectations, notes=spec.notes,
            meta={"source": spec.source}))
        self.run_name = run_name
        self.position = {e.id: i for i, e in enumerate(self.suite.expectations)}
        self.definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=spec.name, data=batch, suite=self.suite))

    def run(self, frame: pd.DataFrame) -> list[Any]:
        """GE's result of each expectation on ``frame``, in the suite's order."""
        from great_expectations.core.run_identifier import RunIdentifier

        run_id = RunIdentifier(run_name=self.run_name) if self.run_name else None
        results = self.definition.run(batch_parameters={"dataframe": frame}, run_id=run_id).results
        ordered: list[Any] = [None] * len(self.position)
        for result in results:
            ordered[self.position[result.expectation_config.id]] = result
        return ordered


@dataclass
class Partial:
    """What some batches of a directory contribute to a suite's verdicts (plain data: it is what a
    Ray task returns). ``batches[b][i]`` is expectation i's result on batch b; ``hashes[i]`` the
    value hashes of uniqueness expectation i."""

    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    hashes: dict[int, list[np.ndarray]] = field(default_factory=dict)
    sample: Sample | None = None

    def extend(self, other: Partial) -> None:
        self.batches += other.batches
        for i, arrays in other.hashes.items():
            self.hashes.setdefault(i, []).extend(arrays)
        if other.sample is not None:
            if self.sample is None:
                self.sample = other.sample
            else:
                self.sample.merge(other.sample)


def _value_hashes(values: pd.Series) -> np.ndarray:
    return pd.util.hash_pandas_object(values.dropna(), index=False).to_numpy(np.uint64)


def judge_batch(suite: SuiteRun, spec: SuiteSpec, frame: pd.DataFrame, into: Partial) -> None:
    """Run the suite on one batch and keep, per expectation, what :func:`merge` needs."""
    entries = []
    for i, (result, kind, expectation) in enumerate(zip(suite.run(frame), spec.kinds, spec.expectations, strict=True)):
        column = getattr(expectation, "column", None)
        res = result.result or {}
        entry = {"success": bool(result.success), "error": _exception_message(result.exception_info),
                 "result": {k: res[k] for k in _RESULT_KEYS if k in res},
                 "nonnull": int(frame[column].count()) if column in frame else 0}
        if kind == "unique" and column in frame:
            into.hashes.setdefault(i, []).append(_value_hashes(frame[column]))
        entries.append(entry)
    into.batches.append(entries)


class HashSpill:
    """The value hashes of the uniqueness expectations, on disk in ``partitions`` files by hash, so
    that counting duplicates holds one partition (8 bytes a value) in memory, never the corpus."""

    def __init__(self, directory: Path, partitions: int) -> None:
        self.directory, self.partitions = directory, max(1, partitions)

    def _path(self, expectation: int, part: int) -> Path:
        return self.directory / f"unique-{expectation}-{part:04d}.u64"

    def add(self, partial: Partial) -> None:
        """Move ``partial``'s hashes to disk."""
        for i, arrays in partial.hashes.items():
            hashes = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)
            part = hashes % np.uint64(self.partitions)
            for p in np.unique(part).tolist():
                with self._path(i, p).open("ab") as handle:
                    handle.write(hashes[part == p].tobytes())
        partial.hashes = {}

    def duplicated(self, expectation: int) -> tuple[int, np.ndarray]:
        """(rows whose value occurs more than once, up to 20 of those values' hashes)."""
        rows, examples = 0, []
        for p in range(self.partitions):
            path = self._path(expectation, p)
            if not path.exists():
                continue
            values, counts = np.unique(np.fromfile(path, np.uint64), return_counts=True)
            rows += int(counts[counts > 1].sum())
            examples.append(values[counts > 1][:_EXAMPLES])
        return rows, np.concatenate(examples)[:_EXAMPLES] if examples else np.zeros(0, np.uint64)


def judge_files(spec: SuiteSpec, files: list[Path], size: int, first_shard: int = 0, context: Any = None,
                spill: HashSpill | None = None) -> Partial:
    """Stream ``files`` in batches of ``size`` rows through the suite: their Partial and sample
    (with ``spill``, the value hashes go there after each batch)."""
    suite = SuiteRun(context if context is not None else _context(), spec)
    partial = Partial(sample=Sample(size))
    assert partial.sample is not None
    for table, keys in iter_batches(files, size, first_shard):
        judge_batch(suite, spec, derived_frame(table), partial)
        partial.sample.add(table, keys)
        if spill is not None:
            spill.add(partial)
    return partial


def _within(value: float | None, kwargs: dict[str, Any]) -> bool:
    if value is None:
        return False
    if "value" in kwargs:
        return bool(value == kwargs["value"])
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and (value <= lo if kwargs.get("strict_min") else value < lo):
        return False
    return not (hi is not None and (value >= hi if kwargs.get("strict_max") else value > hi))


def merge(spec: SuiteSpec, partial: Partial, duplicates: Any, spill: HashSpill) -> list[Verdict]:
    """Each expectation's corpus-wide verdict from its per-batch results (see :data:`MERGES`);
    the value hashes of the uniqueness expectations are in ``spill``.

    ``duplicates(column, hashes)`` returns, in corpus order, up to 20 values of ``column`` whose
    hash is in ``hashes``: the examples of a failed uniqueness expectation.
    """
    verdicts = []
    for i, (kind, expectation) in enumerate(zip(spec.kinds, spec.expectations, strict=True)):
        config = expectation.configuration
        kwargs = dict(config.kwargs)
        rs = [batch[i] for batch in partial.batches]
        error = next((r["error"] for r in rs if r["error"]), None)
        results = [r["result"] for r in rs]
        if error:
            verdicts.append(Verdict(config.type, kwargs, False, {}, error))
            continue
        if kind == "rows" and not all("unexpected_count" in r for r in results):
            kind = "all"  # e.g. a column type GE reads off the dtype: an observed value per batch
        if kind in ("rows", "unique"):
            element = sum(r.get("element_count", 0) for r in results)
            missing = sum(r.get("missing_count", 0) for r in results)
            if kind == "unique":
                unexpected, repeated = spill.duplicated(i)
                examples = duplicates(kwargs["column"], repeated) if unexpected else []
            else:
                unexpected = sum(r["unexpected_count"] for r in results)
                examples = [v for r in results for v in r.get("partial_unexpected_list") or []][:_EXAMPLES]
            judged = element - missing
            mostly = kwargs.get("mostly")
            mostly = 1.0 if mostly is None else float(mostly)
            success = judged == 0 or (judged - unexpected) / judged >= mostly
            result = {"element_count": element, "missing_count": missing, "unexpected_count": unexpected,
                      "unexpected_percent": 100.0 * unexpected / judged if judged else 0.0,
                      "partial_unexpected_list": examples}
        elif kind == "all":
            success = all(r["success"] for r in rs)
            result = next((r["result"] for r in rs if not r["success"]), results[0] if results else {})
        elif kind == "row_count":
            observed = sum(int(r.get("observed_value") or 0) for r in results)
            success, result = _within(observed, kwargs), {"observed_value": observed}
        else:
            pairs = [(r["result"].get("observed_value"), r["nonnull"]) for r in rs]
            pairs = [(v, n) for v, n in pairs if v is not None and n > 0]
            value: float | None = None
            if pairs and kind == "mean":
                value = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
            elif pairs:
                value = {"min": min, "max": max, "sum": sum}[kind](v for v, _ in pairs)
            success, result = _within(value, kwargs), {"observed_value": value}
        verdicts.append(Verdict(config.type, kwargs, bool(success), result))
    return verdicts


def _duplicates_in(files: list[Path]) -> Any:
    """The ``duplicates`` callback of :func:`merge` for a directory: one pass over one column."""

    def find(column: str, hashes: np.ndarray) -> list[Any]:
        found: list[Any] = []
        for path in files:
            for record in pq.ParquetFile(path).iter_batches(columns=[column] if column in COLUMNS else None):
                values = derived_frame(conform(pa.Table.from_batches([record]), str(path)))[column] \
                    if column not in COLUMNS else record.column(0).to_pandas()
                values = values.dropna()
                found += values[np.isin(_value_hashes(values), hashes)].tolist()
                if len(found) >= _EXAMPLES:
                    return found[:_EXAMPLES]
        return found

    return find


def judge_shard(spec: SuiteSpec, path: str, number: int, size: int) -> Partial:
    """One shard's Partial (the body of a Ray task)."""
    return judge_files(spec, [Path(path)], size, number)


def judge_directory(spec: SuiteSpec, directory: Path, size: int, docs: Any) -> tuple[list[Verdict], int, Any]:
    """Judge one directory: the corpus-wide verdicts, the document count and, run in the Data Docs
    context ``docs``, GE's own result on the sample. On ``engine.kind: ray`` a Ray task per shard
    streams it; locally this process does."""
    from lmpipe.engine import current

    files = shard_files(directory)
    total = count_documents(directory)
    with tempfile.TemporaryDirectory(prefix=f".validate-{spec.name}-", dir=directory.parent) as scratch:
        # partitions of at most 64 batches' hashes (25 MB at the default 50,000 rows)
        spill = HashSpill(Path(scratch), -(-total // (64 * size)))
        if total <= size and current().kind == "local":  # one batch: it is its own sample, one GE run
            partial = judge_files(spec, files, size, context=docs, spill=spill)
        elif current().kind == "ray" and files:
            partial = _judge_on_ray(spec, files, size, spill)
        else:
            partial = judge_files(spec, files, size, spill=spill)
        verdicts = merge(spec, partial, _duplicates_in(files), spill)
    if total > size or current().kind == "ray":
        assert partial.sample is not None
        # the run's name (a folder of the site) says it: the verdicts in metrics/validate.json are the corpus's
        SuiteRun(docs, spec, f"sample-{len(partial.sample.keys)}-of-{total}-documents").run(partial.sample.frame())
    return verdicts, total, partial


def _judge_on_ray(spec: SuiteSpec, files: list[Path], size: int, spill: HashSpill) -> Partial:
    from lmpipe.engine import MAX_RETRIES, connect, current, user_errors

    ray = connect(current())
    task = ray.remote(max_retries=MAX_RETRIES)(judge_shard)
    refs = [task.remote(spec, str(path), number, size) for number, path in enumerate(files)]
    partial = Partial(sample=Sample(size))
    with user_errors("validate"):
        for ref in refs:  # one shard's result at a time, in shard order (examples in corpus order)
            part = ray.get(ref)
            spill.add(part)
            partial.extend(part)
    return partial


def run(cfg: ValidateConfig, paths: Paths) -> dict[str, Any]:
    """Validate data/raw and data/clean with their suites.

    Writes ``reports/validation/`` (Data Docs HTML, index.html at its top) and
    ``metrics/validate.json`` (per suite: success, documents, evaluated and successful
    expectation counts, failures), both also when a suite fails. Returns the summary (per suite
    ``<suite>_success`` as 0/1 and the counts; ``artifacts``). Raises ConfigError for a bad suite,
    DataError for missing or unreadable shards, ValidationFailed when a suite fails.
    """
    from lmpipe import tracking
    from lmpipe.engine import connect, current

    started = time.perf_counter()
    specs = {name: load_suite(name, cfg, paths) for name in SUITES}  # config errors before any work
    if current().kind == "ray":
        connect(current())  # an unreachable engine.address fails here, in seconds
    for directory in (paths.raw, paths.clean):
        shard_files(directory)  # a missing directory fails before any work
    docs_dir = paths.reports / "validation"
    outcomes: dict[str, SuiteOutcome] = {}
    with atomic_dir(docs_dir) as tmp_docs:
        context = _context(tmp_docs)
        for name, directory in (("raw", paths.raw), ("clean", paths.clean)):
            spec = specs[name]
            log.info("validating %s: %d expectations (%s), %d documents a batch", name, len(spec.expectations),
                     spec.source, cfg.sample_docs)
            verdicts, total, _ = judge_directory(spec, directory, cfg.sample_docs, context)
            outcomes[name] = SuiteOutcome(
                name=name, success=all(v.success for v in verdicts), documents=total, evaluated=len(verdicts),
                successful=sum(v.success for v in verdicts),
                failures=[describe_failure(v) for v in verdicts if not v.success])
        context.build_data_docs(site_names=[DOCS_SITE])
    success = all(o.success for o in outcomes.values())
    metrics_path = record_validation(paths, success, {n: o.to_json() for n, o in outcomes.items()})
    summary: dict[str, Any] = {"success": int(success), "seconds": round(time.perf_counter() - started, 3)}
    for name, outcome in outcomes.items():
        summary[f"{name}_success"] = int(outcome.success)
        summary[f"{name}_documents"] = outcome.documents
        summary[f"{name}_evaluated_expectations"] = outcome.evaluated
        summary[f"{name}_successful_expectations"] = outcome.successful
    summary["artifacts"] = [str(metrics_path), str(docs_dir)]
    if not success:
        # The CLI logs artifacts only from a returned summary; log them here so a failed run
        # still carries the report of what failed.
        tracker = tracking.active()
        tracker.log_metrics({k: v for k, v in summary.items() if k != "artifacts"})
        for artifact in summary["artifacts"]:
            tracker.log_artifact(artifact)
        lines = [o.summary_line() for o in outcomes.values() if not o.success]
        index = docs_dir / "index.html"
        shown = index.relative_to(paths.root) if index.is_relative_to(paths.root) else index
        raise ValidationFailed(" | ".join(lines) + f" (details: {shown})")
    log.info("validation passed: %s", ", ".join(f"{n} {o.successful}/{o.evaluated}" for n, o in outcomes.items()))
    return summary
