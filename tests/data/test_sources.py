"""Source readers: every file format, globs, Hugging Face datasets, URL downloads, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmpipe.data.config import FilesSource, HFSource, UrlSource
from lmpipe.data.download import UrlPolicy, address_refusal, download, download_path, read_url_source
from lmpipe.data.sources import (
    SourceStats,
    file_rows,
    files_rows,
    hf_rows,
    load_hf,
    read_files_source,
    read_hf_source,
)
from lmpipe.errors import ChecksumError, DataError

STORY = "The fox ran.\nIt was fast.\n\nThe dog slept.\n\n\nThe end came."


def files_source(*paths: str, **options: Any) -> FilesSource:
    return FilesSource.model_validate({"type": "files", "name": "local", "paths": list(paths), **options})


def read(root: Path, *paths: str, **options: Any) -> tuple[list[tuple[str, dict[str, Any]]], SourceStats]:
    stats = SourceStats()
    return list(read_files_source(files_source(*paths, **options), root, stats)), stats


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize(("split", "texts", "lines"), [
    ("paragraph", ["The fox ran.\nIt was fast.", "The dog slept.", "The end came."], [1, 4, 7]),
    ("line", ["The fox ran.", "It was fast.", "The dog slept.", "The end came."], [1, 2, 4, 7]),
    ("file", [STORY], [None]),
])
def test_txt_splits(tmp_path: Path, split: str, texts: list[str], lines: list[int | None]) -> None:
    (tmp_path / "story.txt").write_text(STORY)
    records, _ = read(tmp_path, "story.txt", txt_split=split)
    assert [t for t, _ in records] == texts
    assert [m.get("line") for _, m in records] == lines
    assert all(m["path"] == "story.txt" for _, m in records)


def test_jsonl_keeps_scalar_fields_and_skips_empty_texts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first doc", "label": 1, "tags": ["x"]}, {"text": None},
                                       {"text": "  "}, {"text": "second doc", "label": 0}])
    records, stats = read(tmp_path, "a.jsonl")
    assert [t for t, _ in records] == ["first doc", "second doc"]
    assert records[0][1] == {"path": "a.jsonl", "line": 1, "fields": {"label": 1}}
    assert records[1][1]["line"] == 4
    assert stats.skipped_empty == 2


def test_parquet_csv_tsv_and_gzip(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["p one", None, "p two"], "score": [1.5, 2.0, 3.0]}), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text('id,body\n1,"csv, with comma"\n2,\n3,"multi\nline"\n')
    (tmp_path / "d.tsv").write_text("label\tbody\r\n0\ttsv one\r\n1\ttsv two\r\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": "gz doc"}) + "\n")
    records, stats = read(tmp_path, "d.parquet", "d.csv", "d.tsv", "z.jsonl.gz", text_field="body")
    assert [t for t, _ in records] == ["p one", "p two", "csv, with comma", "multi\nline", "tsv one", "tsv two", "gz doc"]
    assert records[1][1] == {"path": "d.parquet", "row": 2, "fields": {"score": 3.0}}
    assert records[3][1] == {"path": "d.csv", "row": 2, "fields": {"id": "3"}}
    assert records[5][1]["fields"] == {"label": "1"}
    assert stats.skipped_empty == 2  # parquet null + csv empty cell
    assert set(stats.inputs.values()) == {tmp_path / n for n in ("d.parquet", "d.csv", "d.tsv", "z.jsonl.gz")}


def test_globs_are_relative_to_root_sorted_and_deduplicated(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}")
    records, _ = read(tmp_path, "*.txt", "a.txt", "**/c.txt")
    assert [m["path"] for _, m in records] == ["a.txt", "b.txt", "sub/c.txt"]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.log", [{"text": "from a .log file"}])
    records, _ = read(tmp_path, "data.log", format="jsonl")
    assert records[0][0] == "from a .log file"


# -------------------------------------------------------------------------------------- bad input


def _error(root: Path, *paths: str, **options: Any) -> str:
    with pytest.raises(DataError) as info:
        read(root, *paths, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    # blank lines are skipped, and still counted in the line number
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n \n{"text": "ok"}\n{"text": broken}\n')
    assert _error(tmp_path, "bad.jsonl").startswith(f"{tmp_path / 'bad.jsonl'}:4: not valid JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('["text"]\n')
    assert "bad.jsonl:1: expected a JSON object, got list" in _error(tmp_path, "bad.jsonl")


def test_non_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    message = _error(tmp_path, "latin.txt")
    assert "latin.txt:2: not valid UTF-8 at byte offset 14" in message


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "empty.jsonl: file is empty" in _error(tmp_path, "empty.jsonl")
    (tmp_path / "blank.txt").write_text("\n \n")
    assert "blank.txt: file is empty" in _error(tmp_path, "blank.txt")


def test_missing_text_field_lists_what_exists(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "id": 1}])
    assert "a.jsonl:1: no field 'text' (fields: content, id)" in _error(tmp_path, "a.jsonl")
    (tmp_path / "a.csv").write_text("content,id\nx,1\n")
    assert "a.csv:1: no column 'text' (columns: content, id)" in _error(tmp_path, "a.csv")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "a.parquet")
    assert "no column 'text' (columns: content)" in _error(tmp_path, "a.parquet")


def test_parquet_text_column_must_be_string(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert "column 'text' has type int64, expected string" in _error(tmp_path, "ints.parquet")


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,id\nfine,1\nbroken\n")
    assert "a.csv:3: 1 fields, but the header has 2" in _error(tmp_path, "a.csv")


def test_one_reader_gives_every_format_the_same_rows(tmp_path: Path, hf_cache: Path) -> None:
    """jsonl, json (a list), csv, parquet, gzip and a saved HF dataset give the same field dicts
    (every field, not just text), each with its place: line for text formats, row index otherwise."""
    import datasets

    records = [{"text": "first", "label": "a"}, {"text": "second", "label": "b"}]
    write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "d.csv").write_text("text,label\nfirst,a\n\nsecond,b\n")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in records))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name, places in [("d.jsonl", [(1, 0), (2, 1)]), ("d.json", [(None, 0), (None, 1)]),
                         ("d.csv", [(2, 0), (4, 1)]), ("d.parquet", [(None, 0), (None, 1)]),
                         ("z.jsonl.gz", [(1, 0), (2, 1)])]:
        rows = list(file_rows(tmp_path / name, required=["text"]))
        assert [r.values for r in rows] == records, name
        assert [(r.line, r.row) for r in rows] == places, name
    dataset, inputs = load_hf("saved", tmp_path)
    assert [r.values for r in hf_rows(dataset, "hub")] == records and inputs == [tmp_path / "saved"]
    assert [r.values["text"] for r in files_rows(["d.c*", "d.*"], tmp_path, "auto", required=["text"])
            if r.where.endswith("d.csv")] == ["first", "second"]  # d.csv read once
    assert str(rows[1].error("bad label")) == f"{tmp_path / 'z.jsonl.gz'}:2: bad label"
    parquet_row = list(file_rows(tmp_path / "d.parquet", columns=["label"]))[1]
    assert parquet_row.values == {"label": "b"}
    assert str(parquet_row.error("bad label")) == f"{tmp_path / 'd.parquet'}: row 1: bad label"
    with pytest.raises(DataError, match=r"d\.jsonl:1: no field 'body' \(fields: text, label\); set eval_field"):
        list(file_rows(tmp_path / "d.jsonl", required=["body"], setting="eval_field"))
    with pytest.raises(DataError, match=r"d\.parquet: no column 'body' \(columns: text, label\)"):
        list(file_rows(tmp_path / "d.parquet", columns=["body"]))
    (tmp_path / "bad.json").write_text('[{"text": "x"},\n 3]')
    with pytest.raises(DataError, match=r"bad\.json: row 1: expected a JSON object, got int"):
        list(file_rows(tmp_path / "bad.json"))


def test_glob_matching_nothing_and_missing_file(tmp_path: Path) -> None:
    assert "no file matches 'corpus/*.txt'" in _error(tmp_path, "corpus/*.txt")
    assert "'nope.txt' matches no file: file not found" in _error(tmp_path, "nope.txt")


def test_unknown_extension_asks_for_format(tmp_path: Path) -> None:
    (tmp_path / "data.xml").write_text("<a/>")
    assert "cannot tell the format from the extension '.xml'" in _error(tmp_path, "data.xml")


# --------------------------------------------------------------------------------------------- hf


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the datasets cache inside the test directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


def hf_read(root: Path, **options: Any) -> tuple[list[tuple[str, dict[str, Any]]], SourceStats]:
    stats = SourceStats()
    source = HFSource.model_validate({"type": "hf", "name": "hub", **options})
    return list(read_hf_source(source, root, stats)), stats


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_builder_with_local_data_files(tmp_path: Path, hf_cache: Path, streaming: bool) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "alpha", "label": 1}, {"text": ""}, {"text": "beta", "label": 0}])
    records, stats = hf_read(tmp_path, path="json", data_files="train.jsonl", streaming=streaming)
    assert [t for t, _ in records] == ["alpha", "beta"]
    assert records[1][1]["row"] == 2 and records[1][1]["split"] == "train" and records[1][1]["dataset"] == "json"
    assert stats.skipped_empty == 1
    assert stats.inputs == {"hub:train.jsonl": tmp_path / "train.jsonl"}


def test_hf_parquet_builder(tmp_path: Path, hf_cache: Path) -> None:
    pq.write_table(pa.table({"content": ["one", "two"]}), tmp_path / "p.parquet")
    records, _ = hf_read(tmp_path, path="parquet", data_files=["p.parquet"], text_field="content")
    assert [t for t, _ in records] == ["one", "two"]


def test_hf_save_to_disk_directory(tmp_path: Path, hf_cache: Path) -> None:
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"], "label": [0, 1]}),
                                   "test": datasets.Dataset.from_dict({"text": ["e1"], "label": [1]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    records, stats = hf_read(tmp_path, path="saved", split="test")
    assert records == [("e1", {"dataset": "saved", "config": None, "split": "test", "row": 0, "fields": {"label": 1}})]
    recorded = stats.datasets["hub"]  # collect's manifest records what was read
    assert recorded["path"] == "saved" and isinstance(recorded["fingerprint"], str) and recorded["fingerprint"]
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        hf_read(tmp_path, path="saved", split="validation")


def test_hf_missing_column_and_missing_files(tmp_path: Path, hf_cache: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="no column 'text' \\(columns: body\\)"):
        hf_read(tmp_path, path="json", data_files="a.jsonl")
    with pytest.raises(DataError, match="no file matches 'missing/\\*.jsonl'"):
        hf_read(tmp_path, path="json", data_files="missing/*.jsonl")


# ------------------------------------------------------------------------------------------- urls


# The test server listens on loopback, which URL sources refuse unless the source allows it.
LOOPBACK = ["127.0.0.1/32"]
LOCAL = UrlPolicy(allow_networks=tuple(LOOPBACK))


def url_source(url: str, body: bytes, **options: Any) -> UrlSource:
    return UrlSource.model_validate({"type": "url", "name": "web", "url": url, "allow_networks": LOOPBACK,
                                     "sha256": hashlib.sha256(body).hexdigest(), **options})


BODY = b"".join(json.dumps({"text": f"web document {i}"}).encode() + b"\n" for i in range(200))


def test_url_download_verify_and_parse(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    source = url_source(file_server.url("/c.jsonl"), BODY)
    stats = SourceStats()
    records = list(read_url_source(source, tmp_path, stats))
    assert len(records) == 200 and records[0] == ("web document 0", {"url": source.url, "line": 1, "fields": {}})
    assert download_path(source, tmp_path).read_bytes() == BODY
    # a verified download is reused: no second request
    list(read_url_source(source, tmp_path, SourceStats()))
    assert len(file_server.log) == 1


def test_url_checksum_mismatch_keeps_nothing(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    source = url_source(file_server.url("/c.jsonl"), b"other content")
    with pytest.raises(ChecksumError, match=f"expected {source.sha256}, got {hashlib.sha256(BODY).hexdigest()}"):
        list(read_url_source(source, tmp_path, SourceStats()))
    assert list(download_path(source, tmp_path).parent.iterdir()) == []


def test_url_resumes_partial_download_with_range(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    source = url_source(file_server.url("/c.jsonl"), BODY)
    dest = download_path(source, tmp_path)
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").write_bytes(BODY[:1000])
    download(source.url, dest, source.sha256, policy=LOCAL)
    assert dest.read_bytes() == BODY
    assert file_server.log == [("/c.jsonl", "bytes=1000-", 206)]


def test_url_dropped_connection_is_retried_and_resumed(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    file_server.cut_after["/c.jsonl"] = 700
    dest = tmp_path / "c.jsonl"
    download(file_server.url("/c.jsonl"), dest, hashlib.sha256(BODY).hexdigest(), backoff_s=0.01, policy=LOCAL)
    assert dest.read_bytes() == BODY
    assert [entry[1:] for entry in file_server.log] == [(None, 200), ("bytes=700-", 206)]


def test_url_404_fails_at_once(tmp_path: Path, file_server: Any) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        download(file_server.url("/missing.txt"), tmp_path / "m.txt", "0" * 64, retries=3, backoff_s=0.01, policy=LOCAL)
    assert len(file_server.log) == 1


def test_url_connection_error_after_retries(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed after 3 attempt\\(s\\)"):  # nothing listens on port 1
        download("http://127.0.0.1:1/x.txt", tmp_path / "x.txt", "0" * 64, retries=2, backoff_s=0.01, policy=LOCAL)


# --------------------------------------------------------------------------- what a URL source may do


def test_only_http_and_https_urls(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("a local file a URL source must never read")
    for url in (secret.as_uri(), "ftp://example.org/x.txt", "data:text/plain,hello", "http:///no-host"):
        with pytest.raises(ValueError, match="only http:// and https:// URLs"):
            url_source(url, b"")
    with pytest.raises(DataError, match="download refused: .*only http:// and https://"):
        download(secret.as_uri(), tmp_path / "out.txt", hashlib.sha256(secret.read_bytes()).hexdigest())
    assert not (tmp_path / "out.txt").exists()


def test_default_refuses_loopback_before_any_request(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    source = url_source(file_server.url("/c.jsonl"), BODY, allow_networks=[])
    with pytest.raises(DataError, match=r"127\.0\.0\.1 resolves to 127\.0\.0\.1, a loopback address"):
        list(read_url_source(source, tmp_path, SourceStats()))
    with pytest.raises(DataError, match="a loopback address"):
        download(f"http://localhost:{file_server.port}/c.jsonl", tmp_path / "c.jsonl", source.sha256)
    assert file_server.log == []  # refused before connecting, and not retried


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("10.1.2.3", "private"),
    ("192.168.0.10", "private"), ("172.16.5.4", "private"), ("fd00::1", "private"), ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "non-public"), ("224.0.0.1", "multicast"),
])
def test_internal_addresses_are_refused_unless_their_range_is_allowed(address: str, kind: str) -> None:
    assert address_refusal(address) == f"a {kind} address"
    network = "::/0" if ":" in address and "." not in address else "0.0.0.0/0"  # ::ffff:a.b.c.d is a.b.c.d
    assert address_refusal(address, (network,)) is None
    assert address_refusal("93.184.215.14") is None and address_refusal("2606:4700::1111") is None


def test_redirect_into_a_range_not_allowed_is_refused(tmp_path: Path, file_server: Any) -> None:
    """127.0.0.1 is allowed, 127.0.0.2 (loopback too) is not: the redirect's target is checked."""
    file_server.redirects["/moved"] = f"http://127.0.0.2:{file_server.port}/c.jsonl"
    with pytest.raises(DataError, match=r"127\.0\.0\.2 resolves to 127\.0\.0\.2, a loopback address"):
        download(file_server.url("/moved"), tmp_path / "c.jsonl", "0" * 64, policy=LOCAL)
    file_server.redirects["/to-file"] = (tmp_path / "secret.txt").as_uri()
    with pytest.raises(DataError, match="only http:// and https://"):
        download(file_server.url("/to-file"), tmp_path / "c.jsonl", "0" * 64, policy=LOCAL)
    assert [entry[0] for entry in file_server.log] == ["/moved", "/to-file"]


def test_at_most_max_redirects_are_followed(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    file_server.redirects.update({"/r1": "/r2", "/r2": "/r3", "/r3": file_server.url("/c.jsonl")})
    source = url_source(file_server.url("/r1"), BODY, max_redirects=2, format="jsonl")
    with pytest.raises(DataError, match=r"more than 2 redirect\(s\) \(the last to http://127\.0\.0\.1:\d+/c\.jsonl\)"):
        list(read_url_source(source, tmp_path, SourceStats()))
    assert len(file_server.log) == 3  # r1, r2, r3; the file itself was never asked for
    source = url_source(file_server.url("/r1"), BODY, max_redirects=3, format="jsonl")
    assert len(list(read_url_source(source, tmp_path, SourceStats()))) == 200


def test_size_cap_from_content_length_and_from_bytes_received(tmp_path: Path, file_server: Any) -> None:
    file_server.files["/c.jsonl"] = BODY
    file_server.files["/stream.jsonl"] = BODY
    file_server.no_length.add("/stream.jsonl")
    with pytest.raises(DataError, match=f"the file has {len(BODY)} bytes, more than max_bytes=1000"):
        list(read_url_source(url_source(file_server.url("/c.jsonl"), BODY, max_bytes=1000), tmp_path, SourceStats()))
    source = url_source(file_server.url("/stream.jsonl"), BODY, max_bytes=1000)
    with pytest.raises(DataError, match="more than max_bytes=1000 bytes received"):
        list(read_url_source(source, tmp_path, SourceStats()))
    assert list(download_path(source, tmp_path).parent.iterdir()) == []  # nothing over the cap is kept
    assert len(file_server.log) == 2  # a refusal is not retried
    source = url_source(file_server.url("/stream.jsonl"), BODY, max_bytes=len(BODY))
    assert len(list(read_url_source(source, tmp_path, SourceStats()))) == 200


def test_overall_deadline_stops_a_server_that_trickles(tmp_path: Path, file_server: Any) -> None:
    """Each read gets bytes well within timeout_s, so only the overall deadline can stop it."""
    import time

    file_server.files["/slow.jsonl"] = BODY  # ~5 KB at 100 bytes per 0.05 s: ~2.5 s
    file_server.trickle["/slow.jsonl"] = 0.05
    source = url_source(file_server.url("/slow.jsonl"), BODY, deadline_s=0.5, timeout_s=30.0)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"did not finish within deadline_s=0\.5 \(still receiving\)"):
        list(read_url_source(source, tmp_path, SourceStats()))
    assert time.monotonic() - start < 2.0
    assert len(file_server.log) == 1



def test_https_goes_through_the_same_checks(tmp_path: Path, https_server: Any) -> None:
    https_server.files["/c.jsonl"] = BODY
    source = url_source(https_server.url("/c.jsonl"), BODY)
    assert source.url.startswith("https://127.0.0.1:")
    assert len(list(read_url_source(source, tmp_path, SourceStats()))) == 200
    with pytest.raises(DataError, match="a loopback address"):
        download(source.url, tmp_path / "again.jsonl", source.sha256)  # the default policy
    assert len(https_server.log) == 1
