"""Safe extraction of an NIH image archive into ROOT/images/, without trusting `tarfile`'s own extract.

Every member is checked before a byte is written: only regular files `images/NAME.png` (and the `images`
directory entry) are allowed; absolute paths, `..`, links, devices and anything else are rejected, and
member and total sizes are bounded (a gzip bomb stops early). Each PNG is written to a hidden temporary
name and renamed, so an interrupted extraction never leaves a truncated PNG under its final name.
"""

from __future__ import annotations

import gzip
import logging
import re
import tarfile
import threading
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from xraycls.files import atomic_path

__all__ = ["ArchiveError", "extract_images", "MAX_MEMBER_BYTES", "MAX_TOTAL_RATIO"]

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 64 << 20  # NIH PNGs are 0.1-1 MB; 64 MiB is room for 16-bit mirrors, not for a bomb
MAX_TOTAL_RATIO = 4.0  # PNGs barely compress: unpacked bytes beyond 4x the archive size mean a bomb
_CHUNK = 1 << 20
_PNG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.png")


class ArchiveError(ValueError):
    """An archive is unsafe (a member outside images/, a link, a device, too large) or corrupt."""


def extract_images(
    archive: Path,
    root: Path,
    *,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_ratio: float = MAX_TOTAL_RATIO,
    progress: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Extract `archive` (tar, gzip or not) into `root/images/`; return the number of PNGs written.

    On a rejected or corrupt archive, PNGs this call wrote are removed and ArchiveError names the archive
    and the member. Nothing is ever written outside `root/images/`.
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    max_total = int(max_total_ratio * archive.stat().st_size)
    written: list[Path] = []
    total = 0
    try:
        # Stream mode ("r|"): one sequential pass, no index of members in memory. gzip is opened here, not
        # by tarfile, because GzipFile checks the stream's end (CRC, length): tarfile alone takes an archive
        # cut at a member boundary for a complete one.
        with (
            _open_stream(archive) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
            tqdm(desc=f"extract {archive.name}", unit=" png", disable=not progress, leave=True) as bar,
        ):
            for member in tar:
                name = _checked_png_name(archive, member, max_member_bytes)
                if name is None:
                    continue
                total += member.size
                if total > max_total:
                    raise ArchiveError(
                        f"{archive.name}: members unpack to more than {max_total} bytes "
                        f"({max_total_ratio:g}x the archive) at {member.name!r}: a possible gzip bomb"
                    )
                _write_member(tar, member, images / name, written)
                bar.update(1)
                if stop is not None and stop.is_set():
                    raise ArchiveError(f"{archive.name}: extraction interrupted; rerun to extract again")
            while stream.read(_CHUNK):  # the tar's zero padding, up to the gzip trailer (EOFError if cut)
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError, ArchiveError) as err:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, ArchiveError):
            raise
        corrupt = isinstance(err, (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error))
        what = "truncated or corrupt archive" if corrupt else "extraction failed"
        raise ArchiveError(f"{archive.name}: {what} ({type(err).__name__}: {err})") from err
    return len(written)


def _open_stream(archive: Path) -> BinaryIO:
    with open(archive, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(archive, "rb") if magic == b"\x1f\x8b" else open(archive, "rb")


def _checked_png_name(archive: Path, member: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """The PNG file name to write for `member`, None to skip it (the images/ directory), or ArchiveError."""

    def reject(why: str) -> ArchiveError:
        return ArchiveError(
            f"{archive.name}: unsafe member {member.name!r}: {why}; nothing extracted from it"
        )

    raw = member.name
    if raw.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", raw):
        raise reject("absolute path")
    parts = [p for p in PurePosixPath(raw.replace("\\", "/")).parts if p != "."]
    if ".." in parts:
        raise reject("'..' in the path")
    if member.issym() or member.islnk():
        raise reject(f"a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}")
    if member.isdir():
        if parts == ["images"]:
            return None
        raise reject("a directory other than images/")
    if not member.isreg():
        raise reject("not a regular file (device, FIFO or other special member)")
    if len(parts) != 2 or parts[0] != "images" or not _PNG_NAME.fullmatch(parts[1]):
        raise reject("expected images/NAME.png")
    if member.size > max_member_bytes:
        raise reject(f"{member.size} bytes, over the {max_member_bytes}-byte limit per member")
    return parts[1]


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, written: list[Path]) -> None:
    source = tar.extractfile(member)
    if source is None:  # only regular files reach here, so this means a damaged header
        raise ArchiveError(f"cannot read member {member.name!r}")
    # atomic_path renames over dest: a link planted at dest is replaced, never written through.
    with atomic_path(dest) as tmp, source, open(tmp, "xb") as out:
        remaining = member.size
        while remaining > 0:
            chunk = source.read(min(_CHUNK, remaining))
            if not chunk:
                raise EOFError(f"member {member.name!r} ends early")
            out.write(chunk)
            remaining -= len(chunk)
    written.append(dest)
