"""The ``validate`` stage: Great Expectations suites on data/raw and data/clean.

Reads the parquet shards of ``data/raw`` and ``data/clean`` and the two suites (shipped in
``lmpipe/data/suites/`` or named by ``validate.raw_suite`` / ``validate.clean_suite``). Writes the
Data Docs HTML site to ``reports/validation/`` and ``metrics/validate.json``. A failed suite fails
the stage with :class:`~lmpipe.errors.ValidationFailed` after both outputs are written, so the
report of what failed is always there to read.

Suites are JSON in Great Expectations' own suite layout (``{"expectations": [{"type", "kwargs",
"notes"}]}``, or a bare list of expectations). A kwarg written as ``"$name"`` is filled from the
field ``name`` of :class:`~lmpipe.data.config.ValidateConfig`, so thresholds live in params.yaml.
Expectations see the four shard columns plus three derived ones (:func:`add_derived_columns`):
``n_chars``, ``meta_kind`` and ``lang``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc

from lmpipe.config import Paths
from lmpipe.data.config import ValidateConfig
from lmpipe.data.gate import record_validation
from lmpipe.data.shards import read_documents
from lmpipe.errors import ConfigError, ValidationFailed
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
    expectations = []
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
    return SuiteSpec(name=name, source=source, expectations=expectations, notes=notes)


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


def add_derived_columns(directory: Path) -> pd.DataFrame:
    """Read the shards of ``directory`` into pandas with the columns the suites derive from:

    - ``n_chars``: characters (code points) of ``text``; 0 where text is missing.
    - ``meta_kind``: JSON type of ``meta`` ("object", "array", ...), "invalid" if it does not parse.
    - ``lang``: ``meta["lang"]`` where meta is an object carrying one, else "und".

    Raises DataError (from the shard reader) for a missing directory or unreadable shard.
    """
    table = read_documents(directory)
    n_chars = pc.fill_null(pc.utf8_length(table["text"]), 0)
    frame = table.to_pandas()
    frame["n_chars"] = n_chars.to_numpy().astype("int64")
    kinds_langs = [_meta_kind_and_lang(m) for m in table["meta"].to_pylist()]
    frame["meta_kind"] = pd.Series([k for k, _ in kinds_langs], index=frame.index, dtype="str")
    frame["lang"] = pd.Series([lang for _, lang in kinds_langs], index=frame.index, dtype="str")
    return frame


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


def describe_failure(result: Any) -> str:
    """One phrase for a failed expectation: ``type(column): what was observed``."""
    config = result.expectation_config
    column = config.kwargs.get("column")
    head = f"{config.type}({column})" if column else config.type
    error = _exception_message(result.exception_info)
    if error:
        return f"{head}: error: {error}"
    res = result.result or {}
    if "unexpected_count" in res:
        what = {"expect_column_values_to_be_unique": "duplicated",
                "expect_column_values_to_not_be_null": "null"}.get(config.type, "unexpected")
        pct = res.get("unexpected_percent") or 0.0
        text = f"{res['unexpected_count']} of {res.get('element_count')} rows {what} ({pct:.2f}%"
        mostly = config.kwargs.get("mostly")
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


def _context(docs_dir: Path) -> Any:
    """One ephemeral GE context (in-memory stores) with a single Data Docs site in ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context: Any = gx.get_context(mode="ephemeral")  # Any: GE types its config as a union
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars in our logs
    for site in list(context.get_config().data_docs_sites or {}):
        context.delete_data_docs_site(site)  # the default site writes to a stray temp dir
    context.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    return context


def validate_frame(context: Any, spec: SuiteSpec, frame: pd.DataFrame) -> SuiteOutcome:
    """Run ``spec`` on ``frame`` in ``context`` (result kept in its store for Data Docs)."""
    import great_expectations as gx

    source = context.data_sources.add_or_update_pandas("lmpipe")
    batch = source.add_dataframe_asset(spec.name).add_batch_definition_whole_dataframe(spec.name)
    suite = context.suites.add(gx.ExpectationSuite(name=spec.name, expectations=spec.expectations,
                                                   notes=spec.notes, meta={"source": spec.source}))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=spec.name, data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame})
    stats = result.statistics
    failures = [describe_failure(r) for r in result.results if not r.success]
    return SuiteOutcome(name=spec.name, success=bool(result.success), documents=len(frame),
                        evaluated=int(stats["evaluated_expectations"]),
                        successful=int(stats["successful_expectations"]), failures=failures)


def run(cfg: ValidateConfig, paths: Paths) -> dict[str, Any]:
    """Validate data/raw and data/clean with their suites.

    Writes ``reports/validation/`` (Data Docs HTML, index.html at its top) and
    ``metrics/validate.json`` (per suite: success, documents, evaluated and successful
    expectation counts, failures), both also when a suite fails. Returns the summary (per suite
    ``<suite>_success`` as 0/1 and the counts; ``artifacts``). Raises ConfigError for a bad suite,
    DataError for missing or unreadable shards, ValidationFailed when a suite fails.
    """
    from lmpipe import tracking

    started = time.perf_counter()
    specs = {name: load_suite(name, cfg, paths) for name in SUITES}  # config errors before any work
    frames = {"raw": add_derived_columns(paths.raw), "clean": add_derived_columns(paths.clean)}
    docs_dir = paths.reports / "validation"
    outcomes: dict[str, SuiteOutcome] = {}
    with atomic_dir(docs_dir) as tmp_docs:
        context = _context(tmp_docs)
        for name in SUITES:
            log.info("validating %s: %d documents, %d expectations (%s)", name, len(frames[name]),
                     len(specs[name].expectations), specs[name].source)
            outcomes[name] = validate_frame(context, specs[name], frames[name])
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
