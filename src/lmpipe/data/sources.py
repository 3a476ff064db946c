"""The data-rows reader (local files, globs, Hugging Face datasets) and the sources of ``collect``.

:func:`file_rows`, :func:`files_rows` and :func:`hf_rows` yield :class:`DataRow` objects, a
record's fields plus where it is, so every stage that reads user data (collect, finetune,
evaluate's eval files, decontamination) parses each format one way and reports bad input with
the same path:line (or path and row). :func:`resolve_paths` is the one glob expansion.

On top of it, the ``files`` and ``hf`` sources of ``collect`` are generators of ``(text, meta)``
records, read in a streaming fashion so a large corpus never sits in memory. ``meta`` says where
the record came from (file and line or row, hub name and split) and carries the record's other
scalar fields (labels, ids) under ``fields``, so later stages (a classifier fine-tune, say) can
use them. Bad input raises :class:`~lmpipe.errors.DataError` naming the file and line/row; empty
texts in structured files are skipped and counted in :class:`SourceStats` instead. The ``url``
source lives in :mod:`lmpipe.data.download`, the ``synthetic`` one in :mod:`lmpipe.data.synthetic`.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import json
import logging
import os
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.data.config import FilesSource, HFSource
from lmpipe.errors import DataError

log = logging.getLogger(__name__)

Record = tuple[str, dict[str, Any]]

# extension (after stripping .gz) -> format
EXTENSIONS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
_SCALARS = (str, int, float, bool)
_BATCH_ROWS = 4096


@dataclass
class SourceStats:
    """What reading one source found besides its documents."""

    skipped_empty: int = 0
    inputs: dict[str, Path] = field(default_factory=dict)  # local files read, for the manifest
    # Hugging Face datasets read: requested revision and `datasets`' own content fingerprint
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ paths


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (stable across clones), else absolute."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def resolve_paths(patterns: Sequence[str], root: Path, key: str | None = None) -> list[Path]:
    """Expand files and glob patterns (relative to ``root``) into a list: each pattern's matches
    sorted, in pattern order, a file listed twice kept at its first place.

    Raises DataError (naming the params ``key`` that lists the patterns, when given) for a glob
    that matches no file and a plain path that is not a file.
    """
    found: list[Path] = []
    where = f"{key}: " if key else ""
    relative = f"paths are relative to the project root {root}"
    for pattern in patterns:
        full = Path(pattern) if Path(pattern).is_absolute() else root / pattern
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{where}no file matches {pattern!r} ({relative})")
            found.extend(matches)
        elif full.is_file():
            found.append(full)
        elif full.is_dir():
            raise DataError(f"{where}{pattern!r} is a directory, not a file (use a glob such as dir/*.txt; {relative})")
        else:
            raise DataError(f"{where}{pattern!r} matches no file: file not found ({relative})")
    return list(dict.fromkeys(found))  # de-duplicated, first occurrence wins


def detect_format(path: Path | str, fmt: str) -> str:
    """The format to parse ``path`` with: ``fmt`` itself unless it is 'auto' (then by extension)."""
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(str(path).lower().removesuffix(".gz"))[1]
    if ext not in EXTENSIONS:
        raise DataError(f"cannot tell the format from the extension '{ext or '(none)'}'; rename the file or set "
                        f"its source's `format` ({', '.join(sorted(set(EXTENSIONS.values())))})", path=str(path))
    return EXTENSIONS[ext]


# ------------------------------------------------------------------------------------ data rows


@dataclass(slots=True)
class DataRow:
    """One row of an input and where it is: ``line``, the 1-based physical line of a text file
    (txt, jsonl, csv, tsv), and ``row``, the 0-based index of the record (parquet, json, csv, HF)."""

    values: dict[str, Any]
    where: str
    line: int | None = None
    row: int | None = None

    def error(self, message: str) -> DataError:
        """``message`` as a DataError at ``where:line``, else at ``where`` naming the row."""
        if self.line is not None:
            return DataError(message, path=self.where, line=self.line)
        return DataError(f"row {self.row}: {message}", path=self.where)


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - closed by the caller's with-block


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line with its newline) of a UTF-8 (optionally gzipped) file.

    Raises DataError with the line and byte offset of the first byte that is not valid UTF-8.
    """
    offset = 0
    try:
        with _open_binary(path) as handle:
            for lineno, raw in enumerate(handle, 1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"not valid UTF-8 at byte offset {offset + err.start} ({err.reason}); "
                        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                        path=str(path), line=lineno,
                    ) from None
                offset += len(raw)
                yield lineno, text
    except (gzip.BadGzipFile, EOFError) as err:
        raise DataError(f"not a readable gzip file: {err}", path=str(path)) from None


def _txt_rows(path: Path, split: str) -> Iterator[DataRow]:
    """Plain text as ``{"text": ...}`` rows: the whole file, each blank-line separated paragraph
    (stripped), or each non-blank line without its line ending."""
    where = str(path)
    if split == "file":
        text = "".join(line for _, line in decoded_lines(path)).replace("\r\n", "\n")
        if text.strip():
            yield DataRow({"text": text}, where)
        return
    if split == "line":
        for lineno, line in decoded_lines(path):
            if line.strip():
                yield DataRow({"text": line.rstrip("\r\n")}, where, line=lineno)
        return
    start, lines = 0, list[str]()
    for lineno, line in decoded_lines(path):
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line.rstrip("\r\n"))
        elif lines:
            yield DataRow({"text": "\n".join(lines).strip()}, where, line=start)
            lines = []
    if lines:
        yield DataRow({"text": "\n".join(lines).strip()}, where, line=start)


def _missing(name: str, names: Sequence[str], what: str, setting: str) -> str:
    return f"no {what} '{name}' ({what}s: {', '.join(map(str, names)) or 'none'}); set {setting}"


def _jsonl_rows(path: Path, required: Sequence[str], setting: str) -> Iterator[DataRow]:
    """JSON Lines: one object per line; blank lines are ignored."""
    row = 0
    for lineno, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg} at column {err.colno}); each line must be one JSON object",
                            path=str(path), line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(path), line=lineno)
        for name in required:
            if name not in obj:
                raise DataError(_missing(name, list(obj), "field", setting), path=str(path), line=lineno)
        yield DataRow(obj, str(path), line=lineno, row=row)
        row += 1


def _json_rows(path: Path, required: Sequence[str], setting: str) -> Iterator[DataRow]:
    """One JSON document: a list of objects or ``{"data": [...]}``. A file of several top-level
    objects is read as JSON Lines, as the ``datasets`` json builder reads it."""
    try:
        data = json.loads("".join(line for _, line in decoded_lines(path)))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            yield from _jsonl_rows(path, required, setting)
            return
        raise DataError(f"not valid JSON: {err.msg} at column {err.colno}", path=str(path), line=err.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects (or {\"data\": [...]})", path=str(path))
    for row, obj in enumerate(data):
        record = DataRow(obj, str(path), row=row)
        if not isinstance(obj, dict):
            raise record.error(f"expected a JSON object, got {type(obj).__name__}")
        for name in required:
            if name not in obj:
                raise record.error(_missing(name, list(obj), "field", setting))
        yield record


def parquet_file(path: Path) -> pq.ParquetFile:
    """``path`` opened as parquet. Raises DataError for a file that is not one."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", path=str(path)) from None


def _parquet_rows(path: Path, columns: Sequence[str] | None, required: Sequence[str],
                  setting: str) -> Iterator[DataRow]:
    """Parquet read in row batches of ``columns`` (None: all)."""
    parquet = parquet_file(path)
    names = parquet.schema_arrow.names
    for name in [*required, *(columns or ())]:
        if name not in names:
            raise DataError(_missing(name, names, "column", setting), path=str(path))
    if parquet.metadata.num_rows == 0:
        raise DataError("parquet file has no rows (empty file)", path=str(path))
    row, where = 0, str(path)
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=list(columns) if columns else None):
        data = batch.to_pydict()
        names = list(data)
        for values in zip(*data.values(), strict=True):
            yield DataRow(dict(zip(names, values, strict=True)), where, None, row)
            row += 1


def _delimited_rows(path: Path, delimiter: str, required: Sequence[str], setting: str) -> Iterator[DataRow]:
    """CSV/TSV with a header row naming the columns; blank lines are skipped. TSV fields are not
    quoted (GLUE and most NLP releases): a '"' in a TSV file is part of the text."""
    lines = (line for _, line in decoded_lines(path))
    reader = (csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if delimiter == "\t"
              else csv.reader(lines, delimiter=delimiter))
    # Default limit is 128 KiB per field; whole documents in one cell are routinely larger.
    csv.field_size_limit(1 << 30)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError("file is empty (no header row)", path=str(path))
        for name in required:
            if name not in header:
                raise DataError(_missing(name, header, "column", setting), path=str(path), line=1)
        row = 0
        for values in reader:
            if not values or (len(values) == 1 < len(header) and not values[0].strip()):
                continue  # a blank line (a one-column file's blank cell is a row with an empty value)
            if len(values) != len(header):
                raise DataError(f"{len(values)} fields, but the header has {len(header)} ({', '.join(header)})",
                                path=str(path), line=reader.line_num)
            yield DataRow(dict(zip(header, values, strict=True)), str(path), line=reader.line_num, row=row)
            row += 1
    except csv.Error as err:
        raise DataError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {err}",
                        path=str(path), line=reader.line_num) from None
    if row == 0:
        raise DataError("has a header row but no data rows (empty file)", path=str(path))


CONLL_DOCSTART = "-DOCSTART-"


def _conll_rows(path: Path) -> Iterator[DataRow]:
    """CoNLL-style columns (CoNLL-2003, WikiNER): one token per line, its tag in the last
    whitespace-separated column (columns in between, such as POS and chunk tags, are ignored), a
    blank line between sentences, ``-DOCSTART-`` lines skipped. Each sentence is a row
    ``{"tokens", "tags", "tag_lines"}`` at the line of its first token; ``tag_lines`` holds the
    physical line of every token, so a bad tag is reported at its own line."""
    where = str(path)
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    row = 0
    for lineno, line in decoded_lines(path):
        fields = line.split()
        if fields and fields[0] == CONLL_DOCSTART:
            continue
        if fields:
            if len(fields) < 2:
                raise DataError(f"expected a token and its tag separated by whitespace, got {fields[0]!r} alone",
                                path=where, line=lineno)
            tokens.append(fields[0])
            tags.append(fields[-1])
            lines.append(lineno)
        elif tokens:
            yield DataRow({"tokens": tokens, "tags": tags, "tag_lines": lines}, where, line=lines[0], row=row)
            tokens, tags, lines, row = [], [], [], row + 1
    if tokens:
        yield DataRow({"tokens": tokens, "tags": tags, "tag_lines": lines}, where, line=lines[0], row=row)
        row += 1
    if row == 0:
        raise DataError("no sentences in this CoNLL file (only blank or -DOCSTART- lines)", path=where)


def file_rows(path: Path, fmt: str = "auto", *, columns: Sequence[str] | None = None, required: Sequence[str] = (),
              txt_split: str = "paragraph", setting: str = "text_field") -> Iterator[DataRow]:
    """The rows of one local file (txt, jsonl, json, parquet, csv, tsv, conll; any of them gzipped).

    ``fmt`` 'auto' picks the format by extension (conll only when asked for: CoNLL files carry no
    extension of their own). A txt file gives ``{"text": ...}`` rows split by ``txt_split`` (file,
    paragraph, line), a conll file one ``{"tokens", "tags", "tag_lines"}`` row per sentence
    (:func:`_conll_rows`); the other formats give each record's fields, for parquet
    only ``columns`` (None: all). Every row must have the ``required`` fields. Raises DataError
    naming the file and line (or row) for an empty, unreadable or malformed file and for a missing
    field, whose message tells to set ``setting``.
    """
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise DataError("file not found (paths are relative to the project root)", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes); remove it or fix the paths", path=str(path))
    if fmt == "txt":
        return _txt_rows(path, txt_split)
    if fmt == "conll":
        return _conll_rows(path)
    if fmt == "jsonl":
        return _jsonl_rows(path, required, setting)
    if fmt == "json":
        return _json_rows(path, required, setting)
    if fmt == "parquet":
        return _parquet_rows(path, columns, required, setting)
    return _delimited_rows(path, "\t" if fmt == "tsv" else ",", required, setting)


def files_rows(patterns: Sequence[str], root: Path, fmt: str = "auto", **options: Any) -> Iterator[DataRow]:
    """The rows of every file ``patterns`` name (see :func:`resolve_paths`, :func:`file_rows`).
    Every file's format is known before the first is read."""
    files = resolve_paths(patterns, root)
    for file in files:
        detect_format(file, fmt)
    for file in files:
        yield from file_rows(file, fmt, **options)


# ---------------------------------------------------------------------------------- hf datasets


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_hf(path: str, root: Path, *, config_name: str | None = None, split: str = "train",
            revision: str | None = None, data_files: str | list[str] | None = None,
            streaming: bool = False) -> tuple[Any, list[Path]]:
    """A Hugging Face dataset split and the local files it was read from.

    ``path`` is a directory written by ``save_to_disk``, a local dataset directory or a hub name;
    ``data_files`` (globs relative to ``root``, or URLs) feed builder datasets ('json', 'csv').
    Raises DataError naming the dataset when it cannot be loaded or has no such split.
    """
    import datasets

    local = Path(path) if Path(path).is_absolute() else root / path
    inputs: list[Path] = []
    try:
        if local.is_dir() and _is_saved_dataset(local):
            inputs.append(local)
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"no split '{split}' (splits: {', '.join(loaded)})", path=str(local))
                loaded = loaded[split]
            return (loaded.to_iterable_dataset() if streaming else loaded), inputs
        if data_files is not None:
            listed = [data_files] if isinstance(data_files, str) else list(data_files)
            inputs.extend(resolve_paths([f for f in listed if "://" not in f], root))
            data_files = [f if "://" in f or Path(f).is_absolute() else str(root / f) for f in listed]
        dataset = datasets.load_dataset(str(local) if local.exists() else path, name=config_name, split=split,
                                        revision=revision, data_files=data_files, streaming=streaming)
        return dataset, inputs
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load split '{split}': {first} (check path/config_name/split; "
                        "offline, point `path` at local files)", path=f"hf dataset '{path}'") from None


def hf_rows(dataset: Any, where: str, start: int = 0) -> Iterator[DataRow]:
    """The rows of a loaded dataset split in order, ``row`` their index in the split (``dataset``
    being the split's rows from ``start`` on). Raises DataError naming ``where`` and the row when
    reading fails."""
    import datasets

    row = start
    try:
        for batch in dataset.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*batch.values(), strict=True):
                yield DataRow(dict(zip(names, values, strict=True)), where, row=row)
                row += 1
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"reading failed at row {row}: {err}", path=where) from None


# ------------------------------------------------------------------- collect's (text, meta) records


def _scalar_fields(obj: dict[str, Any], text_field: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != text_field and isinstance(v, _SCALARS)}


def _is_text_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _is_scalar_type(dtype: pa.DataType) -> bool:
    return _is_text_type(dtype) or any(check(dtype) for check in (pa.types.is_integer, pa.types.is_floating,
                                                                   pa.types.is_boolean))


def _parquet_columns(path: Path, text_field: str) -> list[str]:
    """The text column (which must be a string column) and the scalar columns of a parquet file."""
    schema = parquet_file(path).schema_arrow
    if text_field not in schema.names:
        raise DataError(_missing(text_field, schema.names, "column", "the source's text_field"), path=str(path))
    if not _is_text_type(schema.field(text_field).type):
        raise DataError(f"column '{text_field}' has type {schema.field(text_field).type}, expected string",
                        path=str(path))
    return [text_field, *(f.name for f in schema if f.name != text_field and _is_scalar_type(f.type))]


def _text_of(row: DataRow, text_field: str, stats: SourceStats) -> str | None:
    """The text of a row, None (counted) when it is null or blank; DataError when it is no string."""
    value = row.values.get(text_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        stats.skipped_empty += 1
        return None
    if not isinstance(value, str):
        raise row.error(f"field '{text_field}' is a {type(value).__name__}, expected a string")
    return value


def read_file(path: Path, fmt: str, text_field: str, txt_split: str, where: str,
              stats: SourceStats) -> Iterator[Record]:
    """The (text, meta) records of one local file in ``fmt`` (or by extension for 'auto'): meta
    has ``path`` (``where``), the ``line`` (txt, jsonl) or ``row`` (parquet, csv) and the record's
    other scalar ``fields``. Raises DataError on bad input or a file without any text."""
    fmt = detect_format(path, fmt)
    columns = _parquet_columns(path, text_field) if fmt == "parquet" else None
    rows = file_rows(path, fmt, columns=columns, required=() if fmt == "txt" else (text_field,),
                     txt_split=txt_split, setting="the source's text_field")
    skipped_before, produced = stats.skipped_empty, 0
    by_line = fmt in ("jsonl", "json")
    for row in rows:
        values = row.values
        if fmt == "txt":
            text = values["text"]
            yield (text.strip() if txt_split == "line" else text), ({"path": where, "line": row.line} if row.line
                                                                    else {"path": where})
        else:
            value = _text_of(row, text_field, stats)
            if value is None:
                continue
            fields = _scalar_fields(values, text_field)
            if by_line and row.line:
                yield value, {"path": where, "line": row.line, "fields": fields}
            else:
                yield value, {"path": where, "row": row.row, "fields": fields}
        produced += 1
    if produced == 0 and stats.skipped_empty == skipped_before:
        raise DataError("file is empty (no text in it)", path=str(path))


def source_files(source: FilesSource, root: Path) -> list[Path]:
    """The files of a ``files`` source, in sorted path order per pattern, every format known."""
    files = resolve_paths(source.paths, root, f"collect.sources.{source.name}.paths")
    for file in files:
        detect_format(file, source.format)  # fail on an unknown extension before reading anything
    return files


def read_source_file(source: FilesSource, file: Path, root: Path, stats: SourceStats) -> Iterator[Record]:
    """The records of one file of a ``files`` source (:func:`read_file`), noted in ``stats.inputs``."""
    where = display_path(file, root)
    stats.inputs[f"{source.name}:{where}"] = file
    return read_file(file, source.format, source.text_field, source.txt_split, where, stats)


def read_files_source(source: FilesSource, root: Path,
                      stats: SourceStats) -> Generator[Record, None, None]:
    """All files of a ``files`` source, in sorted path order per pattern."""
    for file in source_files(source, root):
        yield from read_source_file(source, file, root, stats)


def read_hf_source(source: HFSource, root: Path, stats: SourceStats,
                   rows: range | None = None) -> Generator[Record, None, None]:
    """Rows of a Hugging Face dataset (hub or local), streamed when ``streaming`` is set; with
    ``rows``, only those rows of the split (not streaming)."""
    import datasets

    dataset, inputs = load_hf(source.path, root, config_name=source.config_name, split=source.split,
                              revision=source.revision, data_files=source.data_files, streaming=source.streaming)
    for file in inputs:
        stats.inputs[f"{source.name}:{display_path(file, root)}"] = file
    where = f"hf dataset '{source.path}'"
    stats.datasets[source.name] = {"path": source.path, "config": source.config_name, "split": source.split,
                                   "revision": source.revision,
                                   "fingerprint": getattr(dataset, "_fingerprint", None)}  # None when streaming
    features = dataset.features
    if features is not None:
        if source.text_field not in features:
            raise DataError(f"no column '{source.text_field}' (columns: {', '.join(features)}); set text_field",
                            path=where)
        feature = features[source.text_field]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"column '{source.text_field}' has type {feature}, expected string", path=where)
        extra = [name for name, f in features.items()
                 if name != source.text_field and isinstance(f, datasets.Value | datasets.ClassLabel)]
        dataset = dataset.select_columns([source.text_field, *extra])
    if rows is not None:
        dataset = dataset.select(rows)
    base = {"dataset": source.path, "config": source.config_name, "split": source.split}
    if source.revision:
        base["revision"] = source.revision
    for row in hf_rows(dataset, where, rows.start if rows is not None else 0):
        if source.text_field not in row.values:
            raise DataError(f"no column '{source.text_field}' (columns: {', '.join(row.values)}); set text_field",
                            path=where)
        if (text := _text_of(row, source.text_field, stats)) is not None:
            yield text, {**base, "row": row.row, "fields": _scalar_fields(row.values, source.text_field)}
