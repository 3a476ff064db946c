"""URL sources of ``collect``: downloads that are resumable, verified and bounded, parsed like files.

A ``url`` source is downloaded into ``data/downloads/`` (resumed with HTTP Range requests,
verified against its sha256, within the limits of :class:`UrlPolicy`: http(s) only, public
addresses unless allowed, bounded redirects, size and time) and then read with
:func:`lmpipe.data.sources.read_file`.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe import __version__
from lmpipe.data.config import UrlSource
from lmpipe.data.sources import Record, SourceStats, detect_format, display_path, read_file
from lmpipe.errors import ChecksumError, DataError
from lmpipe.io import sha256_file
from lmpipe.progress import Progress

log = logging.getLogger(__name__)

DOWNLOADS = Path("data") / "downloads"
# HTTP client errors that another attempt cannot fix (408 Request Timeout and 429 Too Many
# Requests are transient and retried like server errors).
_TRANSIENT_4XX = {408, 429}


def download_path(source: UrlSource, root: Path) -> Path:
    """Where a URL source is kept: ``data/downloads/<sha256 prefix>-<file name>``.

    Keyed by the expected checksum, so a verified download is reused by later runs and a new
    ``sha256`` in params.yaml fetches the new file.
    """
    name = os.path.basename(urllib.parse.urlparse(source.url).path) or "download"
    return root / DOWNLOADS / f"{source.sha256[:16]}-{name}"


@dataclass(frozen=True)
class UrlPolicy:
    """What a download may do (the ``url`` source's limits; see ``UrlSource`` for their meaning).

    ``allow_networks`` holds CIDR ranges a connection may reach although they are not public
    (loopback, link-local, private, reserved, multicast); every other address is refused.
    """

    max_bytes: int | None = None
    deadline_s: float | None = None
    max_redirects: int = 5
    allow_networks: tuple[str, ...] = ()

    @classmethod
    def of(cls, source: UrlSource) -> UrlPolicy:
        return cls(max_bytes=source.max_bytes, deadline_s=source.deadline_s, max_redirects=source.max_redirects,
                   allow_networks=tuple(source.allow_networks))


class _Refused(Exception):
    """A download the policy forbids: never retried."""


# most specific first: 127.0.0.1 and 0.0.0.0 also count as "private" in the ipaddress module
_NOT_PUBLIC = (("is_unspecified", "unspecified"), ("is_loopback", "loopback"), ("is_link_local", "link-local"),
               ("is_multicast", "multicast"), ("is_private", "private"), ("is_reserved", "reserved"))


def address_refusal(address: str, allow_networks: tuple[str, ...] = ()) -> str | None:
    """Why a connection to ``address`` (an IP) is refused ("a loopback address"), or None if allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in ipaddress.ip_network(net, strict=False) for net in allow_networks):
        return None
    kind = next((what for attr, what in _NOT_PUBLIC if getattr(ip, attr)), None)
    if kind is None and not ip.is_global:
        kind = "non-public"
    return f"a {kind} address" if kind else None


def _vetted_socket(host: str, port: int, timeout: Any, source_address: Any,
                   allow_networks: tuple[str, ...]) -> socket.socket:
    """Resolve ``host`` once, refuse it if any address is not allowed, connect to a checked address.

    Connecting to the very addresses that were checked (not resolving again) means a DNS answer
    that changes between check and connect cannot redirect the connection inside the network.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve {host}: {err}") from None
    for *_, sockaddr in infos:
        why = address_refusal(str(sockaddr[0]), allow_networks)
        if why:
            raise _Refused(f"{host} resolves to {sockaddr[0]}, {why}; list its range in the source's "
                           "allow_networks to allow it")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            error = err
    raise error or OSError(f"cannot connect to {host}")


class _VettedHTTPConnection(http.client.HTTPConnection):
    allow_networks: tuple[str, ...] = ()  # set per connection by _connection

    def connect(self) -> None:
        self.sock = _vetted_socket(self.host, self.port, self.timeout, getattr(self, "source_address", None),
                                   self.allow_networks)


class _VettedHTTPSConnection(http.client.HTTPSConnection, _VettedHTTPConnection):
    """TLS over a vetted socket: ``HTTPSConnection.connect`` wraps what ``_VettedHTTPConnection`` opened."""


def _connection(cls: type[_VettedHTTPConnection], allow_networks: tuple[str, ...]) -> Any:
    """A constructor of ``cls`` connections that may reach ``allow_networks``, for ``do_open``."""

    def make(*args: Any, **kwargs: Any) -> _VettedHTTPConnection:
        connection = cls(*args, **kwargs)
        connection.allow_networks = allow_networks
        return connection

    return make


class _VettedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_networks: tuple[str, ...]) -> None:
        super().__init__()
        self.allow_networks = allow_networks

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_connection(_VettedHTTPConnection, self.allow_networks), req)


class _VettedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_networks: tuple[str, ...]) -> None:
        super().__init__()
        self.allow_networks = allow_networks

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_connection(_VettedHTTPSConnection, self.allow_networks), req,
                            context=self._context)  # type: ignore[attr-defined]


def _opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """http(s) only, no proxies (the address check must see the real destination), no automatic
    redirects (:func:`_open` follows them one by one, checking each)."""
    opener = urllib.request.OpenerDirector()
    for handler in (_VettedHTTPHandler(policy.allow_networks), _VettedHTTPSHandler(policy.allow_networks),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


_REDIRECTS = {301, 302, 303, 307, 308}


def _check_scheme(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _Refused(f"{url}: only http:// and https:// URLs are downloaded")


def _remaining(timeout_s: float, deadline: float | None) -> float:
    if deadline is None:
        return timeout_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlinePassed()
    return min(timeout_s, left)


class _DeadlinePassed(Exception):
    """The download's overall deadline passed: not retried (the ``.part`` file is kept for a resume)."""


def _open(url: str, headers: dict[str, str], timeout_s: float, policy: UrlPolicy,
          deadline: float | None) -> http.client.HTTPResponse:
    """Open ``url``, following at most ``policy.max_redirects`` redirects, each to an http(s) URL
    whose host passes the address check."""
    opener, current = _opener(policy), url
    for _ in range(policy.max_redirects + 1):
        _check_scheme(current)
        try:
            response: http.client.HTTPResponse = opener.open(
                urllib.request.Request(current, headers=headers), timeout=_remaining(timeout_s, deadline))
            return response
        except urllib.error.HTTPError as err:
            location = err.headers.get("Location") if err.code in _REDIRECTS else None
            if not location:
                raise
            err.close()
            log.info("%s redirects (%d) to %s", current, err.code, location)
            current = urllib.parse.urljoin(current, location)
    raise _Refused(f"more than {policy.max_redirects} redirect(s) (the last to {current}); raise the source's "
                   "max_redirects if this is expected")


def _fetch(url: str, part: Path, timeout_s: float, progress: Progress | None, policy: UrlPolicy,
           deadline: float | None) -> None:
    """Append the rest of ``url`` to ``part`` (HTTP Range from its current size) within the policy."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"lmpipe/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with _open(url, headers, timeout_s, policy, deadline) as response:
        content_range = response.headers.get("Content-Range", "")
        if offset and getattr(response, "status", 200) == 206 and content_range.startswith(f"bytes {offset}-"):
            mode = "ab"
            log.info("resuming %s at byte %d", url, offset)
        else:  # the server ignored the Range header and sends the whole file
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        cap = policy.max_bytes
        if cap is not None and total is not None and total > cap:
            raise _Refused(f"the file has {total} bytes, more than max_bytes={cap}")
        task = progress.add_task(f"download {part.name}", total=total, completed=offset) if progress else None
        size = offset
        with open(part, mode) as handle:
            # read1: whatever one socket read brings, so a server that trickles bytes cannot hold
            # the loop past the deadline for longer than one read's timeout
            while chunk := response.read1(1 << 20):
                size += len(chunk)
                if cap is not None and size > cap:
                    raise _Refused(f"more than max_bytes={cap} bytes received")
                handle.write(chunk)
                if progress is not None and task is not None:
                    progress.advance(task, len(chunk))
                if deadline is not None and time.monotonic() > deadline:
                    raise _DeadlinePassed()
        if progress is not None and task is not None:
            progress.remove_task(task)
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def download(url: str, dest: Path, sha256: str, *, retries: int = 4, timeout_s: float = 60.0,
             backoff_s: float = 1.0, policy: UrlPolicy | None = None, progress: Progress | None = None) -> Path:
    """Download ``url`` to ``dest`` and verify its sha256; return ``dest``.

    Reads/writes ``dest`` and ``dest.part``: bytes arrive in the ``.part`` file, which a later
    attempt (or run) resumes with an HTTP Range request; only a verified file is renamed to
    ``dest``, and an existing verified ``dest`` is reused without network. Network errors and
    5xx/408/429 responses are retried ``retries`` times with exponential backoff
    (``backoff_s * 2**k``), all within ``policy.deadline_s``.

    Raises ChecksumError when the file does not match (the ``.part`` is deleted), DataError for
    other HTTP errors (4xx at once, the rest after the retries) and, at once, for what ``policy``
    forbids: a scheme other than http(s), an address that is not public (unless allowed), too many
    redirects, a file over ``max_bytes`` (its ``.part`` deleted), the deadline passed.
    """
    policy = policy or UrlPolicy()
    deadline = time.monotonic() + policy.deadline_s if policy.deadline_s is not None else None
    try:
        _check_scheme(url)
    except _Refused as err:
        raise DataError(f"download refused: {err}", path=url) from None
    if dest.is_file():
        if sha256_file(dest) == sha256:
            log.info("using verified download %s", dest)
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    error = ""
    for attempt in range(retries + 1):
        try:
            if attempt:
                delay = backoff_s * 2 ** (attempt - 1)
                log.warning("download of %s failed (%s); retry %d/%d in %.1fs", url, error, attempt, retries, delay)
                time.sleep(min(delay, _remaining(delay, deadline)))
            _fetch(url, part, timeout_s, progress, policy, deadline)
            break
        except _Refused as err:
            if part.exists() and "max_bytes" in str(err):
                part.unlink()
            raise DataError(f"download refused: {err}", path=url) from None
        except _DeadlinePassed:
            raise DataError(f"download did not finish within deadline_s={policy.deadline_s:g} "
                            f"({'last error: ' + error if error else 'still receiving'}); the partial "
                            "file is kept and resumed by the next run", path=url) from None
        except urllib.error.HTTPError as err:
            if err.code == 416 and part.exists():  # Range not satisfiable: the .part is already whole
                break
            error = f"HTTP {err.code} {err.reason}"
            if 400 <= err.code < 500 and err.code not in _TRANSIENT_4XX:
                raise DataError(f"download failed: {error}; check the URL", path=url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            error = str(getattr(err, "reason", None) or err) or type(err).__name__
    else:
        raise DataError(f"download failed after {retries + 1} attempt(s): {error}", path=url)
    actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        if resumed:  # a stale partial file from another version: start over once
            log.warning("resumed download of %s does not match its sha256; downloading it again", url)
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            return download(url, dest, sha256, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                            policy=dataclasses.replace(policy, deadline_s=left), progress=progress)
        raise ChecksumError(
            f"sha256 mismatch: expected {sha256}, got {actual}; the download was deleted "
            "(update the source's sha256 if the file changed upstream)",
            path=url,
        )
    os.replace(part, dest)
    return dest


def read_url_source(source: UrlSource, root: Path, stats: SourceStats,
                    progress: Progress | None = None) -> Generator[Record, None, None]:
    """Download a ``url`` source (see :func:`download`) and parse it like a local file."""
    fmt = detect_format(urllib.parse.urlparse(source.url).path, source.format)
    dest = download(source.url, download_path(source, root), source.sha256, retries=source.retries,
                    timeout_s=source.timeout_s, policy=UrlPolicy.of(source), progress=progress)
    stats.inputs[f"{source.name}:{source.url}"] = dest
    for text, meta in read_file(dest, fmt, source.text_field, source.txt_split, display_path(dest, root), stats):
        meta.pop("path", None)
        yield text, {"url": source.url, **meta}
