"""Fetch one file over HTTP(S): resume with Range, retry with back-off, verify md5/size, rename atomically.

Standard library only (urllib). The body streams to `NAME.part` in 1 MiB chunks while its md5 is updated,
so a file is read once; `NAME` itself appears only after verification (os.replace), so a file under its
final name is always complete.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

__all__ = [
    "DownloadError",
    "WebPageError",
    "ChecksumError",
    "FetchOptions",
    "fetch",
    "file_md5",
    "check_problem",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_USER_AGENT = "xraycls-download (python urllib)"
_HTML_STARTS = (b"<!doctype html", b"<html")
BOX_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names the file and the reason."""


class WebPageError(DownloadError):
    """The server answered with an HTML page (a Box login, consent or quota page) instead of the file."""


class ChecksumError(DownloadError):
    """The file's md5, size or content was wrong on every download."""


class _Incomplete(ConnectionError):
    """The body ended early or resumed at the wrong byte: retryable, the next try resumes or restarts."""


@dataclass
class FetchOptions:
    retries: int = 5  # network errors / 5xx retried this many times per download
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    timeout: float = 60.0  # seconds a socket may stay silent
    progress: bool = True  # tqdm bar per file (bytes, bytes/s, ETA)
    stop: threading.Event = field(default_factory=threading.Event)  # set on Ctrl-C: threads stop at a chunk


class _Part:
    """`NAME.part` and the running md5 of exactly its bytes (re-read from disk only when they disagree)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.md5 = hashlib.md5()
        self.nbytes = 0

    def sync(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self.nbytes:  # a part left by an earlier run (or changed under us): hash what is there
            self.md5, self.nbytes = (_md5_state(self.path) if size else hashlib.md5()), size

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.md5, self.nbytes = hashlib.md5(), 0

    def append(self, fh: BinaryIO, chunk: bytes) -> None:
        fh.write(chunk)
        self.md5.update(chunk)
        self.nbytes += len(chunk)


def _md5_state(path: Path):  # hashlib's md5 object has no public type to annotate with
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    return _md5_state(path).hexdigest()


def check_problem(nbytes: int, md5: str, want_md5: str | None, want_size: int | None) -> str | None:
    """None if the bytes are right; md5 decides when known (a wrong size then only warns), else size."""
    if want_md5 is not None and md5 != want_md5:
        return f"md5 mismatch: expected {want_md5}, got {md5}"
    if want_size is not None and nbytes != want_size:
        if want_md5 is None:
            return f"size mismatch: expected {want_size} bytes, got {nbytes}"
        log.warning("md5 matches but size is %d bytes, not the %d listed in the sources", nbytes, want_size)
    return None


def fetch(
    url: str,
    dest: Path,
    *,
    md5: str | None,
    size: int | None,
    options: FetchOptions,
    check: Callable[[Path], str | None] | None = None,
) -> None:
    """Download `url` to `dest` (via `dest.part`), verified; a failed check deletes and downloads once more.

    `check(part_path)` may return a problem with the content (e.g. not a label file). Raises DownloadError.
    """
    part = _Part(dest.with_name(dest.name + ".part"))
    problem = ""
    for attempt in (1, 2):
        # A WebPageError propagates as is: nothing of the page was written, a partial .part stays valid.
        _download_with_retries(url, part, dest, options)
        problem = check_problem(part.nbytes, part.md5.hexdigest(), md5, size) or (check and check(part.path))
        if not problem:
            os.replace(part.path, dest)
            return
        part.reset()
        log.warning("%s: %s (download %d of 2)", dest.name, problem, attempt)
    raise ChecksumError(f"{dest.name}: {problem}, on 2 downloads from {url}; nothing was kept")


def _download_with_retries(url: str, part: _Part, dest: Path, options: FetchOptions) -> None:
    for attempt in range(options.retries + 1):
        try:
            _stream(url, part, dest, options)
            return
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if not _retryable(err) or attempt == options.retries:
                tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
                raise DownloadError(f"{dest.name}: {_describe(err)} from {url} ({tries})") from err
            delay = options.backoff * 2**attempt
            log.warning("%s: %s; retry %d in %.1f s", dest.name, _describe(err), attempt + 1, delay)
            if options.stop.wait(delay):
                raise DownloadError(f"{dest.name}: interrupted") from err


def _retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    # Other URLErrors are connection failures; local OSErrors (disk full, permissions) are not retried.
    return isinstance(err, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def _describe(err: BaseException) -> str:
    if isinstance(err, _Incomplete):
        return str(err)
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"connection failed ({err.reason})"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _stream(url: str, part: _Part, dest: Path, options: FetchOptions) -> None:
    part.sync()
    offset = part.nbytes
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=options.timeout
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            err.close()  # the part already holds (at least) the whole file: verification decides
            return
        raise
    with response:
        html_ok = dest.suffix.lower() in (".html", ".htm")
        if response.headers.get_content_type() == "text/html" and not html_ok:
            raise WebPageError(_web_page_message(url, dest, "Content-Type text/html"))
        first = response.read(CHUNK)
        if response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.reset()
                raise _Incomplete(f"server resumed at byte {start}, not {offset}; restarting")
        elif offset:
            if _looks_like_html(first) and not html_ok:  # checked before the valid partial file is dropped
                raise WebPageError(_web_page_message(url, dest, "the body is an HTML page"))
            log.info("%s: server ignored the Range request; restarting from byte 0", dest.name)
            part.reset()
            offset = 0
        if offset == 0 and _looks_like_html(first) and not html_ok:
            raise WebPageError(_web_page_message(url, dest, "the body is an HTML page"))
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        got = _copy(response, first, part, dest, offset, expected, options)
    if expected is not None and got < expected:
        raise _Incomplete(f"connection closed after {got} of {expected} bytes")


def _copy(
    response: http.client.HTTPResponse,
    first: bytes,
    part: _Part,
    dest: Path,
    offset: int,
    expected: int | None,
    options: FetchOptions,
) -> int:
    """Append `first` and the rest of the body to the part file; return the bytes received."""
    total = offset + expected if expected is not None else None
    bar = tqdm(
        total=total, initial=offset, desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not options.progress, leave=True,
    )  # fmt: skip
    got = 0
    with open(part.path, "ab") as fh, bar:
        chunk = first
        while chunk:
            part.append(fh, chunk)
            got += len(chunk)
            bar.update(len(chunk))
            if options.stop.is_set():
                raise DownloadError(f"{dest.name}: interrupted at byte {part.nbytes}; rerun to resume")
            chunk = response.read(CHUNK)
    return got


def _range_start(content_range: str) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", content_range)
    return int(match.group(1)) if match else None


def _looks_like_html(body: bytes) -> bool:
    return body.lstrip()[:15].lower().startswith(_HTML_STARTS)


def _web_page_message(url: str, dest: Path, evidence: str) -> str:
    return (
        f"{dest.name}: {url} served a web page instead of the file ({evidence}); NIH Box does this for a "
        f"login, consent or download-quota page. Download {dest.name} in a browser from {BOX_PAGE} "
        f"and place it at {dest}, then rerun (it will be checked, not downloaded again)"
    )
