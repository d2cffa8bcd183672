"""`xraycls download` against a real HTTP server on 127.0.0.1 serving tar.gz archives of real PNGs."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from _http_server import Behaviour, FileServer
from _project import NIH_SHARED
from PIL import Image

from xraycls.data._extract import ArchiveError, extract_images
from xraycls.data.download import DownloadReport, download_nih, load_sources, parse_archive_selection

LABELS = "Data_Entry_2017_v2020.csv"
SPLITS = ("train_val_list.txt", "test_list.txt")
ARCHIVES = ("images_001.tar.gz", "images_002.tar.gz", "images_003.tar.gz")


def png_bytes(seed: int, side: int = 24) -> bytes:
    # Noise, so gzip cannot shrink the PNGs below their size (as with NIH's real X-rays).
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def tar_gz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


class Mirror:
    """A FileServer holding a tiny NIH release (3 archives of 2 PNGs) and a sources TSV pointing at it."""

    def __init__(self, server: FileServer, tmp_path: Path) -> None:
        self.server, self.root, self.sources = server, tmp_path / "root", tmp_path / "sources.tsv"
        self.pngs: dict[str, bytes] = {}
        for a, archive in enumerate(ARCHIVES):
            members = [(f"images/{a + 1:08d}_{i:03d}.png", png_bytes(10 * a + i)) for i in range(2)]
            self.pngs.update({Path(name).name: data for name, data in members})
            server.files[archive] = tar_gz(members)
        names = sorted(self.pngs)
        server.files[LABELS] = ("Image Index,Finding Labels,Patient ID\n" + "".join(
            f"{n},No Finding,{int(n[:8])}\n" for n in names)).encode()  # fmt: skip
        server.files[SPLITS[0]] = "".join(f"{n}\n" for n in names[:4]).encode()
        server.files[SPLITS[1]] = "".join(f"{n}\n" for n in names[4:]).encode()
        self.overrides: dict[str, dict] = {}
        self.write_sources()

    def write_sources(self) -> None:
        with open(self.sources, "w", newline="") as fh:
            out = csv.writer(fh, delimiter="\t", lineterminator="\n")
            out.writerow(["name", "kind", "url", "md5", "size_bytes"])
            for name in (LABELS, *SPLITS, *ARCHIVES):
                data = self.server.files[name]
                row = {"md5": hashlib.md5(data).hexdigest(), "size_bytes": len(data), "redirect": False}
                row.update(self.overrides.get(name, {}))
                kind = "labels" if name == LABELS else "split_list" if name in SPLITS else "archive"
                out.writerow(
                    [name, kind, self.server.url(name, row["redirect"]), row["md5"], row["size_bytes"]]
                )

    def run(self, archives: list[int] | None = None, **kwargs: object) -> DownloadReport:
        kwargs = {"backoff": 0.001, "timeout": 5.0, "progress": False, **kwargs}
        return download_nih(self.root, archives, sources=self.sources, **kwargs)

    def assert_images(self, archive_numbers: list[int]) -> None:
        want = {n for n in self.pngs if int(n[:8]) in archive_numbers}
        got = {p.name for p in (self.root / "images").iterdir()}
        assert got == want  # no temp files either
        for name in want:
            assert (self.root / "images" / name).read_bytes() == self.pngs[name]


@pytest.fixture
def mirror(tmp_path: Path):
    with FileServer() as server:
        yield Mirror(server, tmp_path)


# --- archive selection and sources ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("all", list(range(1, 13))), ("none", []), ("1,2,5", [1, 2, 5]), ("1-3,7", [1, 2, 3, 7]),
     (" 12 , 3-4,3", [3, 4, 12])],
)  # fmt: skip
def test_parse_archive_selection(text: str, expected: list[int]) -> None:
    assert parse_archive_selection(text) == expected


@pytest.mark.parametrize(("text", "named"), [("0", "0"), ("13", "13"), ("x", "x"), ("1-13", "13"),
                                            ("3-1", "3-1"), ("1,,2", "''"), ("", "''")])  # fmt: skip
def test_parse_archive_selection_rejects(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_archive_selection(text)


def test_package_sources_list_nih_files() -> None:
    files = load_sources()
    archives = [f for f in files if f.kind == "archive"]
    assert [f.name for f in archives] == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert all(
        f.md5 and len(f.md5) == 32 and f.size and f.url.startswith("https://nihcc.box.com/") for f in archives
    )
    meta = {f.name: f for f in files if f.kind != "archive"}
    assert {n: f.kind for n, f in meta.items()} == {
        LABELS: "labels",
        SPLITS[0]: "split_list",
        SPLITS[1]: "split_list",
    }
    assert meta[LABELS].url.endswith("vanity_name=ChestXray-NIHCC&file_id=f_219760887468")
    assert (meta[SPLITS[1]].md5, meta[SPLITS[1]].size) == ("adeeabf20ea2a8eb66ced87b78434400", 435131)


@pytest.mark.real_nih
def test_package_sources_match_genuine_files() -> None:
    files = {f.name: f for f in load_sources()}
    with open(NIH_SHARED / "archives.tsv") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            f = files[row["archive"]]
            assert (f.url, f.md5, f.size) == (row["url"], row["md5"], int(row["size_bytes_reported"]))
    for name in SPLITS:
        data = (NIH_SHARED / name).read_bytes()
        assert (files[name].md5, files[name].size) == (hashlib.md5(data).hexdigest(), len(data))


@pytest.mark.real_nih
def test_genuine_metadata_files_pass_the_package_checks(tmp_path: Path) -> None:
    # The genuine files, served as the package lists them (its md5s and sizes, its content checks).
    package = {f.name: f for f in load_sources() if f.kind != "archive"}
    with FileServer() as server:
        server.files[LABELS] = gzip.decompress((NIH_SHARED / f"{LABELS}.gz").read_bytes())
        for name in SPLITS:
            server.files[name] = (NIH_SHARED / name).read_bytes()
        sources = tmp_path / "genuine.tsv"
        sources.write_text(
            "name\tkind\turl\tmd5\tsize_bytes\n"
            + "".join(
                f"{f.name}\t{f.kind}\t{server.url(f.name)}\t{f.md5 or ''}\t{f.size or ''}\n"
                for f in package.values()
            )
        )
        report = download_nih(tmp_path / "root", [], sources=sources, progress=False, backoff=0.001)
    assert report.ok(), report.format()
    assert report.present == [LABELS, *SPLITS]
    assert (tmp_path / "root" / LABELS).read_bytes() == server.files[LABELS]


@pytest.mark.parametrize(
    ("row", "problem"),
    [("../x.csv\tlabels\thttp://h/x\t\t", "bad file name"), ("x.csv\tzip\thttp://h/x\t\t", "kind 'zip'"),
     ("x.csv\tlabels\tftp://h/x\t\t", "not http"), ("x.csv\tlabels\thttp://h/x\tabc\t", "md5 'abc'"),
     ("x.csv\tlabels\thttp://h/x\t\t12kB", "size_bytes '12kB'")],
)  # fmt: skip
def test_load_sources_rejects_bad_rows(tmp_path: Path, row: str, problem: str) -> None:
    tsv = tmp_path / "mirror.tsv"
    tsv.write_text(f"# a mirror\nname\tkind\turl\tmd5\tsize_bytes\n{row}\n")
    with pytest.raises(ValueError, match=rf"mirror.tsv line 3: .*{problem}"):
        load_sources(tsv)


# --- whole runs -----------------------------------------------------------------------------------


def test_download_extracts_removes_archives_and_rerun_makes_no_requests(mirror: Mirror) -> None:
    mirror.overrides[SPLITS[0]] = {"redirect": True}  # Box answers with redirects; urllib follows them
    mirror.write_sources()
    report = mirror.run(workers=2)
    assert report.ok(), report.format()
    assert report.present == [LABELS, *SPLITS, *ARCHIVES] and report.images == 6
    for name in (LABELS, *SPLITS):
        assert (mirror.root / name).read_bytes() == mirror.server.files[name]
    mirror.assert_images([1, 2, 3])
    archives_dir = mirror.root / "archives"
    assert sorted(p.name for p in archives_dir.iterdir()) == [f"{a}.done" for a in ARCHIVES]
    assert json.loads((archives_dir / f"{ARCHIVES[0]}.done").read_text())["members"] == 2
    assert "present (6)" in report.format() and "FAILED" not in report.format()

    before = len(mirror.server.requests)
    again = mirror.run(workers=2)
    assert len(mirror.server.requests) == before  # complete files and extracted archives: zero requests
    assert again.ok() and again.present == report.present and again.images == 6


def test_keep_archives_and_metadata_only(mirror: Mirror) -> None:
    report = mirror.run([2], keep_archives=True)
    assert report.ok() and report.present == [LABELS, *SPLITS, ARCHIVES[1]]
    kept = mirror.root / "archives" / ARCHIVES[1]
    assert kept.read_bytes() == mirror.server.files[ARCHIVES[1]]
    mirror.assert_images([2])
    assert not mirror.server.requests_for(ARCHIVES[0])

    mirror.root = mirror.root.with_name("meta_only")
    report = mirror.run([])
    assert report.ok() and report.present == [LABELS, *SPLITS] and report.images == 0
    assert not (mirror.root / "images").exists()


def test_bad_archive_numbers_raise_before_any_request(mirror: Mirror) -> None:
    with pytest.raises(ValueError, match=r"archive 4 does not exist: .*sources.tsv lists archives 1-3"):
        mirror.run([4])
    with pytest.raises(ValueError, match="archive 13 does not exist"):
        download_nih(mirror.root, [13], progress=False)
    with pytest.raises(ValueError, match="workers=0"):
        mirror.run([], workers=0)
    assert mirror.server.requests == []


def test_workers_download_concurrently(mirror: Mirror) -> None:
    for name in (LABELS, *SPLITS):
        mirror.server.behaviour[name] = Behaviour(delay=0.2)
    assert mirror.run([], workers=3).ok()
    assert mirror.server.max_in_flight == 3
    mirror.root, mirror.server.max_in_flight = mirror.root.with_name("one_worker"), 0
    assert mirror.run([], workers=1).ok()
    assert mirror.server.max_in_flight == 1


def test_progress_bar_shows_bytes_per_second(mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    mirror.run([], progress=True)
    assert "B/s" in capsys.readouterr().err
    mirror.root = mirror.root.with_name("quiet")
    mirror.run([], progress=False)
    assert capsys.readouterr().err == ""


# --- resume, retries, verification ----------------------------------------------------------------


def test_cut_connection_resumes_with_range(mirror: Mirror) -> None:
    mirror.server.behaviour[ARCHIVES[0]] = Behaviour(cut=1)
    report = mirror.run([1], keep_archives=True)
    assert report.ok(), report.format()
    data = mirror.server.files[ARCHIVES[0]]
    assert [r.range for r in mirror.server.requests_for(ARCHIVES[0])] == [None, f"bytes={len(data) // 2}-"]
    assert (mirror.root / "archives" / ARCHIVES[0]).read_bytes() == data
    assert not list(mirror.root.rglob("*.part"))


def test_interrupted_download_leaves_only_a_part_file(mirror: Mirror) -> None:
    mirror.server.behaviour[ARCHIVES[0]] = Behaviour(cut=1)
    report = mirror.run([1], retries=0)
    assert "connection closed after" in report.failed[ARCHIVES[0]]
    data = mirror.server.files[ARCHIVES[0]]
    assert not (mirror.root / "archives" / ARCHIVES[0]).exists()  # never a partial file under its name
    assert (mirror.root / "archives" / f"{ARCHIVES[0]}.part").read_bytes() == data[: len(data) // 2]
    assert mirror.run([1]).ok()  # the rerun resumes
    assert mirror.server.requests_for(ARCHIVES[0])[-1].range == f"bytes={len(data) // 2}-"
    mirror.assert_images([1])


def test_part_left_by_earlier_run_is_resumed(mirror: Mirror) -> None:
    data = mirror.server.files[LABELS]
    mirror.root.mkdir()
    (mirror.root / f"{LABELS}.part").write_bytes(data[:100])
    assert mirror.run([]).ok()
    assert [r.range for r in mirror.server.requests_for(LABELS)] == ["bytes=100-"]
    assert (mirror.root / LABELS).read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(mirror: Mirror) -> None:
    mirror.server.behaviour[LABELS] = Behaviour(cut=1, ignore_range=True)
    assert mirror.run([]).ok()
    assert len(mirror.server.requests_for(LABELS)) == 2
    assert (mirror.root / LABELS).read_bytes() == mirror.server.files[LABELS]  # no duplicated prefix


def test_5xx_is_retried_then_reported(mirror: Mirror) -> None:
    mirror.server.behaviour[SPLITS[1]] = Behaviour(fail_5xx=2)
    assert mirror.run([], retries=2).ok()
    assert len(mirror.server.requests_for(SPLITS[1])) == 3

    mirror.root = mirror.root.with_name("give_up")
    mirror.server.behaviour[SPLITS[1]] = Behaviour(fail_5xx=10)
    report = mirror.run([], retries=1)
    assert not report.ok() and report.present == [LABELS, SPLITS[0]]
    assert "HTTP 503" in report.failed[SPLITS[1]] and "2 attempts" in report.failed[SPLITS[1]]
    assert f"FAILED {SPLITS[1]}: " in report.format()


def test_transient_corruption_is_downloaded_again(mirror: Mirror) -> None:
    mirror.server.behaviour[ARCHIVES[0]] = Behaviour(corrupt=1)
    report = mirror.run([1])
    assert report.ok(), report.format()
    assert len(mirror.server.requests_for(ARCHIVES[0])) == 2
    mirror.assert_images([1])


def test_persistent_corruption_fails_clearly_and_keeps_nothing(mirror: Mirror) -> None:
    mirror.server.behaviour[ARCHIVES[0]] = Behaviour(corrupt=-1)
    report = mirror.run([1])
    reason = report.failed[ARCHIVES[0]]
    expected = hashlib.md5(mirror.server.files[ARCHIVES[0]]).hexdigest()
    assert ARCHIVES[0] in reason and f"expected {expected}, got " in reason and "2 downloads" in reason
    got = reason.split("got ")[1][:32]
    assert len(got) == 32 and got != expected
    assert len(mirror.server.requests_for(ARCHIVES[0])) == 2
    assert [p.name for p in (mirror.root / "archives").iterdir()] == []
    assert report.images == 0 and report.present == [LABELS, *SPLITS]


@pytest.mark.parametrize("how", ["content-type", "sniff"])
def test_html_page_is_never_saved(mirror: Mirror, how: str) -> None:
    mirror.server.behaviour[ARCHIVES[2]] = Behaviour(html=how)
    report = mirror.run([3])
    reason = report.failed[ARCHIVES[2]]
    assert "served a web page" in reason and "in a browser" in reason
    assert str(mirror.root / "archives" / ARCHIVES[2]) in reason
    assert len(mirror.server.requests_for(ARCHIVES[2])) == 1  # a login page is not retried
    assert list((mirror.root / "archives").iterdir()) == []

    # The advice works: a file placed by hand is verified and used, with no request.
    (mirror.root / "archives" / ARCHIVES[2]).write_bytes(mirror.server.files[ARCHIVES[2]])
    assert mirror.run([3]).ok()
    assert len(mirror.server.requests_for(ARCHIVES[2])) == 1
    mirror.assert_images([3])


def test_html_page_keeps_a_valid_partial_download(mirror: Mirror) -> None:
    data = mirror.server.files[ARCHIVES[0]]
    part = mirror.root / "archives" / f"{ARCHIVES[0]}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:300])
    for how in ("content-type", "sniff"):  # "sniff": the page comes as a 200 that ignores Range
        mirror.server.behaviour[ARCHIVES[0]] = Behaviour(html=how)
        assert "served a web page" in mirror.run([1]).failed[ARCHIVES[0]]
        assert part.read_bytes() == data[:300]
    mirror.server.behaviour[ARCHIVES[0]] = Behaviour()
    assert mirror.run([1]).ok()
    assert mirror.server.requests_for(ARCHIVES[0])[-1].range == "bytes=300-"
    mirror.assert_images([1])


def test_wrong_file_in_place_is_moved_aside_and_downloaded(mirror: Mirror) -> None:
    mirror.root.mkdir()
    (mirror.root / SPLITS[0]).write_text("00000001_000.png\n")
    assert mirror.run([]).ok()
    assert (mirror.root / SPLITS[0]).read_bytes() == mirror.server.files[SPLITS[0]]
    assert (mirror.root / f"{SPLITS[0]}.bad").read_text() == "00000001_000.png\n"


def test_label_file_without_md5_is_checked_by_content(mirror: Mirror) -> None:
    mirror.overrides[LABELS] = {"md5": "", "size_bytes": ""}
    mirror.write_sources()
    mirror.server.files[LABELS] = b"PK\x03\x04 not a csv"
    report = mirror.run([])
    assert "not an NIH label file" in report.failed[LABELS]
    assert not (mirror.root / LABELS).exists()


# --- safe extraction ------------------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("member", ["../evil.png", "symlink"])
def test_unsafe_archive_is_rejected_and_nothing_escapes(mirror: Mirror, tmp_path: Path, member: str) -> None:
    link = _member("images/00000003_009.png", tarfile.SYMTYPE, "../../evil.png")
    bad = link if member == "symlink" else ("images/../../evil.png", png_bytes(99))
    mirror.server.files[ARCHIVES[2]] = tar_gz([("images/00000003_000.png", png_bytes(1)), bad])
    mirror.write_sources()
    report = mirror.run([3])
    reason = report.failed[ARCHIVES[2]]
    assert reason.startswith(f"{ARCHIVES[2]}: unsafe member 'images/") and "evil.png" in reason
    assert ("link" in reason) if member == "symlink" else ("'..'" in reason)
    assert not list(tmp_path.rglob("*evil*")) and not (tmp_path.parent / "evil.png").exists()
    assert list((mirror.root / "images").iterdir()) == []  # the good PNG before it was removed again
    assert not (mirror.root / "archives" / f"{ARCHIVES[2]}.done").exists()


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (_member("/tmp/abs.png"), "absolute path"),
        (_member("images/a.png", tarfile.LNKTYPE, "x"), "hard link"),
        (_member("images/dev.png", tarfile.CHRTYPE), "not a regular file"),
        (_member("etc", tarfile.DIRTYPE), "directory"),
        (_member("other/a.png"), "images/NAME"),
        (_member("images/sub/a.png"), "images/NAME"),
        (_member("images/x.sh"), "images/NAME"),
    ],
)
def test_extract_rejects_member(tmp_path: Path, member: tarfile.TarInfo, problem: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz([member]))
    with pytest.raises(ArchiveError, match=rf"bad.tar.gz: unsafe member '{member.name}': .*{problem}"):
        extract_images(archive, tmp_path / "root")
    assert list((tmp_path / "root" / "images").iterdir()) == []


def test_extract_bounds_member_and_total_size(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([(f"images/{i:08d}_000.png", png_bytes(i)) for i in range(3)]))
    with pytest.raises(ArchiveError, match="over the 100-byte limit per member"):
        extract_images(archive, tmp_path / "r1", max_member_bytes=100)
    assert extract_images(archive, tmp_path / "r2") == 3
    bomb = tmp_path / "bomb.tar.gz"  # 8 MiB of zeros packs into a few kB: far over 4x the archive size
    bomb.write_bytes(
        tar_gz([("images/00000001_000.png", png_bytes(1)), ("images/00000002_000.png", bytes(8 << 20))])
    )
    with pytest.raises(ArchiveError, match=r"bomb.tar.gz: members unpack to more than \d+ bytes .*gzip bomb"):
        extract_images(bomb, tmp_path / "r3")
    assert list((tmp_path / "r3" / "images").iterdir()) == []


def _damaged_archive(how: str) -> bytes:
    """A tar.gz of 3 PNGs, damaged: cut inside a PNG, cut right after the first member, or a wrong CRC."""
    buffer, ends = io.BytesIO(), []
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"images/00000003_{i:03d}.png")
            data = png_bytes(i, side=128)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            ends.append(tar.offset)  # where the next member's header starts
    raw = buffer.getvalue()
    if how == "boundary":  # a valid deflate stream up to the second member's header, then nothing
        gz = zlib.compressobj(wbits=31)
        return gz.compress(raw[: ends[0]]) + gz.flush(zlib.Z_SYNC_FLUSH)
    whole = gzip.compress(raw)
    if how == "crc":  # every member reads fine; only the gzip trailer tells the bytes are wrong
        return whole[:-8] + bytes([whole[-8] ^ 1]) + whole[-7:]
    return whole[: len(whole) // 2]


@pytest.mark.parametrize("how", ["inside", "boundary", "crc"])
def test_damaged_archive_leaves_no_png(mirror: Mirror, how: str) -> None:
    mirror.server.files[ARCHIVES[2]] = _damaged_archive(how)
    mirror.overrides[ARCHIVES[2]] = {"md5": "", "size_bytes": ""}
    mirror.write_sources()
    report = mirror.run([3])
    assert "truncated or corrupt archive" in report.failed[ARCHIVES[2]]
    assert list((mirror.root / "images").iterdir()) == []  # no PNG under its final name, no temp file
    assert (mirror.root / "archives" / ARCHIVES[2]).exists()  # kept for inspection; no .done marker
    assert not (mirror.root / "archives" / f"{ARCHIVES[2]}.done").exists()
