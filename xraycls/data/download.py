"""`xraycls download`: fetch NIH ChestX-ray14 (label file, split lists, 12 image archives) into ROOT/.

Layout written (the one `xraycls prepare` reads):

    ROOT/Data_Entry_2017_v2020.csv, ROOT/train_val_list.txt, ROOT/test_list.txt
    ROOT/images/NNNNNNNN_NNN.png           (112,120 PNGs, 42 GB, when all 12 archives are fetched)
    ROOT/archives/images_NNN.tar.gz        (removed after extraction unless keep_archives)
    ROOT/archives/images_NNN.tar.gz.done   (JSON marker: extracted, member count, fetch and extraction
                                           seconds; a rerun skips the archive)
    ROOT/download_report.json              (wall seconds of every run, summed: what `xraycls cost` reads)

Every step can be interrupted and rerun: partial downloads resume (`*.part`, HTTP Range), complete files
and extracted archives are skipped without a request. Sources: `nih_files.tsv` in this package (NIH's
links, https://nihcc.app.box.com/v/ChestXray-NIHCC; cite Wang et al., CVPR 2017) or a mirror TSV.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from xraycls.data._extract import ArchiveError, extract_images
from xraycls.data._http import ChecksumError, DownloadError, FetchOptions, WebPageError, fetch, file_md5
from xraycls.data._http import check_problem as _check_problem
from xraycls.files import write_text

__all__ = [
    "RemoteFile",
    "DownloadReport",
    "load_sources",
    "parse_archive_selection",
    "download_nih",
    "DownloadError",
    "WebPageError",
    "ChecksumError",
    "ArchiveError",
    "NUM_ARCHIVES",
    "DOWNLOAD_REPORT_NAME",
]

log = logging.getLogger(__name__)

NUM_ARCHIVES = 12
DOWNLOAD_REPORT_NAME = "download_report.json"
KINDS = ("archive", "labels", "split_list")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SPLIT_LINE = re.compile(rb"\d{8}_\d{3}\.png\s*")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name under ROOT/ (labels, split lists) or ROOT/archives/ (archives)
    kind: str  # archive | labels | split_list
    url: str
    md5: str | None  # lower-case hex; None: not checked
    size: int | None  # bytes; None: not checked


@dataclass
class DownloadReport:
    present: list[str]  # files (and extracted archives) complete in ROOT after this run
    failed: dict[str, str]  # file name -> why it is missing
    images: int  # PNGs in ROOT/images
    seconds: float
    root: Path | None = field(default=None, compare=False)

    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        where = f" in {self.root}" if self.root else ""
        lines = [f"download {'complete' if self.ok() else 'INCOMPLETE'}{where} ({self.seconds:.1f} s)"]
        lines.append(f"  present ({len(self.present)}): {', '.join(self.present) or 'nothing'}")
        lines.append(f"  images: {self.images} PNGs in images/")
        for name, reason in self.failed.items():
            lines.append(f"  FAILED {name}: {reason.removeprefix(f'{name}: ')}")
        if self.failed:
            lines.append("  rerun the same command to retry; finished files are kept and skipped")
        return "\n".join(lines)


def load_sources(path: Path | None = None) -> list[RemoteFile]:
    """The files to fetch: the package's `nih_files.tsv`, or a TSV with the same columns (a mirror).

    Columns: name, kind, url, md5, size_bytes (md5/size may be empty); lines starting with '#' are comments.
    """
    if path is None:
        resource = resources.files("xraycls.data") / "nih_files.tsv"
        text, where = resource.read_text(encoding="utf-8"), "xraycls/data/nih_files.tsv"
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"sources TSV not found: {path}")
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    rows = [
        (n, line.split("\t"))
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and line[0] != "#"
    ]
    if not rows:
        raise ValueError(f"{where}: no header and no rows")
    header = [cell.strip() for cell in rows[0][1]]
    missing = {"name", "kind", "url"} - set(header)
    if missing:
        raise ValueError(
            f"{where}: header lacks {sorted(missing)} (columns: name, kind, url, md5, size_bytes)"
        )
    files = []
    for n, cells in rows[1:]:
        if len(cells) > len(header):
            raise ValueError(
                f"{where} line {n}: {len(cells)} tab-separated cells, the header has {len(header)}"
            )
        # Fewer cells than columns is fine: trailing md5 / size_bytes may be left out.
        files.append(_parse_row(dict(zip(header, cells, strict=False)), f"{where} line {n}"))
    names = [f.name for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: file name(s) listed twice: {duplicates}")
    return files


def _parse_row(row: dict[str, str | None], where: str) -> RemoteFile:
    def cell(key: str) -> str:
        return (row.get(key) or "").strip()

    name, kind, url, md5, size = (
        cell("name"),
        cell("kind"),
        cell("url"),
        cell("md5").lower(),
        cell("size_bytes"),
    )
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{where}: bad file name {name!r} (a plain name: letters, digits, '_', '-', '.')")
    if kind not in KINDS:
        raise ValueError(f"{where}: {name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: {name}: url {url!r} is not http(s)")
    if md5 and not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise ValueError(f"{where}: {name}: md5 {md5!r} is not 32 hex digits")
    if size and not size.isdigit():
        raise ValueError(f"{where}: {name}: size_bytes {size!r} is not a whole number of bytes")
    return RemoteFile(name, kind, url, md5 or None, int(size) if size else None)


def parse_archive_selection(text: str) -> list[int]:
    """Archive numbers from 'all' | 'none' | '1,2,5' | '1-3,7' (1-12), sorted and unique."""
    spec = text.strip().lower()
    if spec == "all":
        return list(range(1, NUM_ARCHIVES + 1))
    if spec == "none":
        return []
    chosen: set[int] = set()
    for piece in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not match:
            raise ValueError(f"--archives {text!r}: {piece.strip()!r} is not a number or range like 1-3")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        for number in (low, high):
            if not 1 <= number <= NUM_ARCHIVES:
                raise ValueError(f"--archives {text!r}: archive {number} does not exist (1-{NUM_ARCHIVES})")
        if low > high:
            raise ValueError(f"--archives {text!r}: range {low}-{high} runs backwards")
        chosen.update(range(low, high + 1))
    return sorted(chosen)


def download_nih(
    root: Path,
    archives: list[int] | None = None,
    *,
    workers: int = 2,
    keep_archives: bool = False,
    sources: Path | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
    timeout: float = 60.0,
) -> DownloadReport:
    """Fetch the label file and split lists into `root/` and archives (None: all 12; []: none) into images/.

    Archive numbers index the sources' archive rows in order (1 = first). Failures are collected in the
    report, not raised; bad arguments raise ValueError before any request.
    """
    start = time.perf_counter()
    files = load_sources(sources)
    for label, value, ok in (
        ("workers", workers, workers >= 1),
        ("retries", retries, retries >= 0),
        ("backoff", backoff, backoff >= 0),
        ("timeout", timeout, timeout > 0),
    ):
        if not ok:
            raise ValueError(f"download_nih: {label}={value!r} is out of range")
    rows = [f for f in files if f.kind == "archive"]
    numbers = list(range(1, len(rows) + 1)) if archives is None else list(archives)
    for number in numbers:
        if not isinstance(number, int) or not 1 <= number <= len(rows):
            src = sources or "the package's nih_files.tsv"
            raise ValueError(f"archive {number!r} does not exist: {src} lists archives 1-{len(rows)}")
    todo = [f for f in files if f.kind != "archive"] + [rows[n - 1] for n in sorted(set(numbers))]
    root = Path(root)
    (root / "archives").mkdir(parents=True, exist_ok=True)
    options = FetchOptions(retries=retries, backoff=backoff, timeout=timeout, progress=progress)
    failed: dict[str, str] = {}
    done: set[str] = set()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xraycls-download")
    try:
        futures = {pool.submit(_get, remote, root, options, keep_archives): remote for remote in todo}
        for future in as_completed(futures):
            name = futures[future].name
            try:
                future.result()
                done.add(name)
            except (DownloadError, ArchiveError, OSError) as err:
                failed[name] = str(err)
                log.error("%s", err)
    except BaseException:
        options.stop.set()  # Ctrl-C: threads stop at their next chunk; .part files stay for the rerun
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    present = [f.name for f in todo if f.name in done]
    images = (
        sum(1 for e in os.scandir(root / "images") if e.name.endswith(".png"))
        if (root / "images").is_dir()
        else 0
    )
    report = DownloadReport(present, failed, images, time.perf_counter() - start, root)
    log.debug("%s", report.format())
    _record_report(root, report)
    return report


def _record_report(root: Path, report: DownloadReport) -> None:
    """Append this run to ROOT/download_report.json; `seconds` sums the wall time of every run (a resumed
    download took all of its runs), `extract_seconds`/`fetch_seconds` sum the archive markers' own times
    (thread-seconds inside that wall time, overlapping when workers > 1). An interrupted run is not
    recorded."""
    path = root / DOWNLOAD_REPORT_NAME
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    runs = [run for run in runs if _numbers(run, "seconds")] if isinstance(runs, list) else []
    runs.append(
        {"seconds": round(report.seconds, 3), "present": len(report.present), "failed": len(report.failed)}
    )
    markers = [_read_marker(marker) for marker in sorted((root / "archives").glob("*.done"))]
    timed = [marker for marker in markers if _numbers(marker, "fetch_seconds", "extract_seconds")]
    content = {
        "seconds": round(sum(run["seconds"] for run in runs), 3),
        "fetch_seconds": round(sum(float(marker["fetch_seconds"]) for marker in timed), 3),
        "extract_seconds": round(sum(float(marker["extract_seconds"]) for marker in timed), 3),
        "archives_extracted": len(markers),
        "archives_timed": len(timed),  # markers written before timings were recorded carry none
        "images": report.images,
        "complete": report.ok(),
        "runs": runs,
    }
    write_text(path, json.dumps(content, indent=2) + "\n")


def _numbers(entry: object, *keys: str) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(key), int | float) for key in keys)


def _read_marker(marker: Path) -> dict:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(remote: RemoteFile, root: Path, options: FetchOptions, keep_archives: bool) -> None:
    if remote.kind != "archive":
        _ensure_file(remote, root / remote.name, options)
        return
    archive = root / "archives" / remote.name
    marker = archive.with_name(remote.name + ".done")
    if _marker_members(marker) is not None:
        log.info("%s: already extracted (%s)", remote.name, marker)
        return
    started = time.perf_counter()
    _ensure_file(remote, archive, options)
    fetched = time.perf_counter()
    try:
        members = extract_images(archive, root, progress=options.progress, stop=options.stop)
    except ArchiveError as err:
        raise ArchiveError(f"{err}; the archive stays at {archive} (delete it to download it again)") from err
    timing = {
        "fetch_seconds": round(fetched - started, 3),
        "extract_seconds": round(time.perf_counter() - fetched, 3),
    }
    write_text(
        marker, json.dumps({"archive": remote.name, "md5": remote.md5, "members": members, **timing}) + "\n"
    )
    log.info("%s: extracted %d PNGs", remote.name, members)
    if not keep_archives:
        archive.unlink()


def _marker_members(marker: Path) -> int | None:
    try:
        return int(json.loads(marker.read_text())["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ensure_file(remote: RemoteFile, dest: Path, options: FetchOptions) -> None:
    """Make `dest` a verified copy of `remote`; a file already there (ours or placed by hand) is checked."""
    check = _content_check(remote.kind)
    if dest.is_file():
        problem = _check_problem(dest.stat().st_size, file_md5(dest), remote.md5, remote.size) or check(dest)
        if not problem:
            log.info("%s: present and verified, not downloaded", dest.name)
            return
        bad = dest.with_name(dest.name + ".bad")
        os.replace(dest, bad)
        log.warning(
            "%s: the file present is wrong (%s); moved to %s, downloading again", dest.name, problem, bad
        )
    fetch(remote.url, dest, md5=remote.md5, size=remote.size, options=options, check=check)


def _content_check(kind: str) -> Callable[[Path], str | None]:
    """A cheap look at the first line, so a metadata file without an md5 is still not any page or blob."""

    def check(path: Path) -> str | None:
        if kind == "archive":
            return None
        with open(path, "rb") as fh:
            first = fh.readline(4096).removeprefix(b"\xef\xbb\xbf")
        if kind == "labels" and not first.startswith(b"Image Index,"):
            return f"not an NIH label file: first line {first[:60]!r} does not start with 'Image Index,'"
        if kind == "split_list" and not _SPLIT_LINE.fullmatch(first):
            return (
                f"not an NIH split list: first line {first[:60]!r} is not an image name like 00000001_000.png"
            )
        return None

    return check
