"""Fixtures for the data-stage tests: project paths in tmp_path and a real local HTTP server (the
session's real local Ray cluster, ``ray_cluster``, is in tests/conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lmpipe.config import Paths
from lmpipe.data.config import CollectConfig


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


@pytest.fixture
def collect_config() -> Callable[..., CollectConfig]:
    """Build a validated collect section from source dicts, as params.yaml would give it."""

    def make(*sources: dict[str, Any], **options: Any) -> CollectConfig:
        return CollectConfig.model_validate({"sources": list(sources), **options})

    return make


@dataclass
class FileServer:
    """Serves ``files`` (url path -> bytes) with HTTP Range support on 127.0.0.1.

    ``cut_after`` (url path -> n) makes the next response for that path send n bytes and then
    drop the connection, once, as a flaky network would. ``redirects`` (url path -> Location)
    answers 302 with that Location. ``trickle`` (url path -> seconds) sends the body 100 bytes at
    a time with that pause between them; ``no_length`` paths are sent without Content-Length
    (the end of the body is the end of the connection). ``log`` records each request's
    (path, Range header, status).
    """

    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    trickle: dict[str, float] = field(default_factory=dict)
    no_length: set[str] = field(default_factory=set)
    log: list[tuple[str, str | None, int]] = field(default_factory=list)

    scheme: str = "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = server.files.get(self.path)
            byte_range = self.headers.get("Range")
            if self.path in server.redirects:
                server.log.append((self.path, byte_range, 302))
                self.send_response(302)
                self.send_header("Location", server.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if body is None:
                server.log.append((self.path, byte_range, 404))
                self.send_error(404, "Not Found")
                return
            start = int(byte_range.removeprefix("bytes=").split("-")[0]) if byte_range else 0
            if start >= len(body) and byte_range:
                server.log.append((self.path, byte_range, 416))
                self.send_error(416, "Range Not Satisfiable")
                return
            status = 206 if byte_range else 200
            server.log.append((self.path, byte_range, status))
            self.send_response(status)
            if self.path not in server.no_length:
                self.send_header("Content-Length", str(len(body) - start))
            if byte_range:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            payload = body[start:]
            pause = server.trickle.get(self.path)
            if pause is not None:
                try:
                    for i in range(0, len(payload), 100):
                        self.wfile.write(payload[i:i + 100])
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: expected
                    pass
                return
            cut = server.cut_after.pop(self.path, None)
            self.wfile.write(payload if cut is None else payload[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True

    return Handler


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), valid for an hour."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _serve(state: FileServer, tls: tuple[Path, Path] | None = None) -> Iterator[FileServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        state.scheme = "https"
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    yield from _serve(FileServer())


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """The same server over TLS, with a self-signed certificate for 127.0.0.1 that the default SSL
    context (what URL sources use) trusts through SSL_CERT_FILE."""
    tls = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    yield from _serve(FileServer(), tls)
