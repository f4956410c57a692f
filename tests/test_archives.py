"""extract_archive: good archives, hostile members, idempotency, crash leftovers, corruption."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from polar_cube.sources import archives
from polar_cube.sources.archives import (
    ArchiveError,
    NoRoomError,
    UnsafeArchiveError,
    check_archive,
    extract_archive,
)


def _make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode="w") -> Path:
    with tarfile.open(path, mode) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


GOOD = [("data/a.tif", b"aaa"), ("data/sub/b.txt", b"bb"), ("README", b"r")]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_good_tar(tmp_path, mode):
    archive = _make_tar(tmp_path / "good.tar", GOOD, mode)
    dest = extract_archive(archive, tmp_path / "out", "tar")
    assert dest == tmp_path / "out"
    assert (dest / "data" / "a.tif").read_bytes() == b"aaa"
    assert (dest / "data" / "sub" / "b.txt").read_bytes() == b"bb"
    marker = json.loads((dest / ".extracted.json").read_text())
    assert marker["archive"] == "good.tar" and marker["size"] == archive.stat().st_size
    assert "data/a.tif" in marker["members"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_good_zip(tmp_path):
    archive = _make_zip(tmp_path / "good.zip", {"d/": b"", "d/x.nc": b"xx", "y.csv": b"1,2"})
    dest = extract_archive(archive, tmp_path / "out", "zip")
    assert (dest / "d" / "x.nc").read_bytes() == b"xx"
    assert (dest / "y.csv").read_bytes() == b"1,2"
    assert (dest / ".extracted.json").exists()


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (("../evil.tif", b"x"), "path escapes the extraction folder"),
        (("data/../../evil.tif", b"x"), "path escapes the extraction folder"),
        (("/etc/evil", b"x"), "absolute path"),
        (("C:/evil", b"x"), "absolute path"),
        (("data\\..\\evil", b"x"), "backslash"),
        (_link("data/passwd", "/etc/passwd"), "symlink"),
        (_link("data/up", "../../x"), "symlink"),
        (_link("data/link.tif", "a.tif"), "symlink"),  # inside, but data needs no links
        (_link("hard", "../outside", tarfile.LNKTYPE), "hardlink"),
        (_link("data/hard.tif", "data/a.tif", tarfile.LNKTYPE), "hardlink"),
        (_link("fifo", "", tarfile.FIFOTYPE), "device or fifo"),
        (_link("dev", "", tarfile.CHRTYPE), "device or fifo"),
    ],
)
def test_unsafe_tar_member_rejected_before_extracting(tmp_path, member, why):
    archive = _make_tar(tmp_path / "Malczyk.tar", [*GOOD, member])
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, dest, "tar")
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    assert f"Malczyk.tar: unsafe member {name!r}" in str(info.value)
    assert why in str(info.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Malczyk.tar"]


def test_chained_symlinks_escaping_are_rejected(tmp_path):
    # "here" -> "." is harmless on its own, but "here/.." then points above the root: no
    # link is extracted at all, so the first one is refused
    archive = _make_tar(tmp_path / "chain.tar", [_link("here", "."), _link("up", "here/..")])
    with pytest.raises(UnsafeArchiveError, match=r"'here' \(symlink to '.'\)"):
        extract_archive(archive, tmp_path / "out", "tar")
    assert not (tmp_path / "out").exists()


def test_unsafe_zip_member_rejected(tmp_path):
    archive = _make_zip(tmp_path / "bad.zip", {"ok.txt": b"1", "../evil.tif": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"bad.zip: unsafe member '../evil.tif'"):
        extract_archive(archive, tmp_path / "out", "zip")
    assert not (tmp_path / "out").exists()


def test_absolute_zip_member_rejected(tmp_path):
    archive = _make_zip(tmp_path / "abs.zip", {"/etc/evil": b"x"})
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        extract_archive(archive, tmp_path / "out", "zip")
    assert not (tmp_path / "out").exists()


def test_rerun_is_idempotent(tmp_path):
    archive = _make_tar(tmp_path / "good.tar", GOOD)
    dest = extract_archive(archive, tmp_path / "out", "tar")
    (dest / "data" / "a.tif").write_bytes(b"touched")  # a rerun must not redo the work
    assert extract_archive(archive, dest, "tar") == dest
    assert (dest / "data" / "a.tif").read_bytes() == b"touched"


def test_changed_archive_is_extracted_again(tmp_path):
    archive = _make_tar(tmp_path / "good.tar", GOOD)
    dest = extract_archive(archive, tmp_path / "out", "tar")
    _make_tar(archive, [("new.txt", b"n" * 20_000)])  # tars pad to 10 KiB: make the size differ
    extract_archive(archive, dest, "tar")
    assert (dest / "new.txt").exists() and not (dest / "data").exists()


def test_half_done_folder_without_marker_is_replaced(tmp_path):
    archive = _make_zip(tmp_path / "good.zip", {"x.nc": b"xx"})
    dest = tmp_path / "out"
    (dest / "junk").mkdir(parents=True)
    (dest / "x.nc").write_bytes(b"trunc")
    extract_archive(archive, dest, "zip")
    assert sorted(p.name for p in dest.iterdir()) == [".extracted.json", "x.nc"]
    assert (dest / "x.nc").read_bytes() == b"xx"


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_corrupt_archive_names_the_file(tmp_path, fmt):
    archive = tmp_path / f"broken.{fmt}"
    archive.write_bytes(b"this is not an archive at all" * 20)
    with pytest.raises(ArchiveError, match=r"broken\." + fmt) as info:
        extract_archive(archive, tmp_path / "out", fmt)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_tar(tmp_path):
    archive = _make_tar(tmp_path / "big.tar.gz", [("a.bin", bytes(range(256)) * 4000)], "w:gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ArchiveError, match="big.tar.gz"):
        extract_archive(archive, tmp_path / "out", "tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tar.gz"]


# --- bombs, nested archives, room (issue 21) ---------------------------------------------------


def _bzip2_zip(path: Path, name: str, size: int) -> Path:
    """A zip whose one member is `size` zero bytes, bzip2-compressed (a few kB per GB)."""
    zeros = bytes(2**24)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_BZIP2
        with zf.open(info, "w", force_zip64=True) as member:
            for _ in range(size // len(zeros)):
                member.write(zeros)
    return path


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    return _bzip2_zip(tmp_path_factory.mktemp("bomb") / "WAIS_Max_Extent.zip", "x.shp", 2**30)


def test_a_zip_bomb_is_refused_in_seconds_writing_nothing(zip_bomb, tmp_path):
    import time

    assert zip_bomb.stat().st_size < 10_000  # a few kB ...
    started = time.monotonic()
    with pytest.raises(UnsafeArchiveError) as refused:
        extract_archive(zip_bomb, tmp_path / "out", "zip")
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert message.startswith("WAIS_Max_Extent.zip: member 'x.shp' expands ")  # ... to 1 GB
    assert "a bomb?" in message and "1.1 GB" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written at all
    with pytest.raises(UnsafeArchiveError, match="x.shp"):  # the download's own check
        check_archive(zip_bomb, "zip")


def test_a_tar_bomb_is_refused_by_its_ratio(tmp_path):
    archive = tmp_path / "Malczyk.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.tif")
        info.size = 200 * 2**20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1_000_000
    with pytest.raises(UnsafeArchiveError, match=r"Malczyk.tar.gz: its content expands .* a bomb"):
        extract_archive(archive, tmp_path / "out", "tar")
    assert not (tmp_path / "out").exists()


def test_the_total_cap_is_checked_before_extracting(tmp_path, monkeypatch):
    archive = _make_tar(tmp_path / "big.tar", [("a.bin", bytes(3000)), ("b.bin", bytes(3000))])
    monkeypatch.setenv(archives.MAX_TOTAL_BYTES_VARIABLE, "5000")
    with pytest.raises(UnsafeArchiveError) as refused:
        extract_archive(archive, tmp_path / "out", "tar")
    assert "declares 6.0 kB of members, more than the 5.0 kB allowed" in str(refused.value)
    assert archives.MAX_TOTAL_BYTES_VARIABLE in str(refused.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(archives.MAX_TOTAL_BYTES_VARIABLE, "lots")
    with pytest.raises(ArchiveError, match="not a number of bytes"):
        extract_archive(archive, tmp_path / "out", "tar")


@pytest.mark.parametrize(
    ("inner", "kind"),
    [
        ("data.zip", "zip"),
        ("data.tar", "tar"),
        ("layer.tif.gz", "gzip"),
    ],
)
def test_a_nested_archive_is_refused(tmp_path, inner, kind):
    import gzip

    payload = {
        "zip": lambda: (_make_zip(tmp_path / "in.zip", {"a.tif": b"a"})).read_bytes(),
        "tar": lambda: (_make_tar(tmp_path / "in.tar", [("a.tif", b"a")])).read_bytes(),
        "gzip": lambda: gzip.compress(b"a" * 100),
    }[kind]()
    archive = _make_zip(tmp_path / "outer.zip", {"ok.txt": b"1", inner: payload})
    with pytest.raises(UnsafeArchiveError) as refused:
        extract_archive(archive, tmp_path / "out", "zip")
    assert str(refused.value) == (
        f"outer.zip: unsafe member {inner!r} (a nested {kind} archive: archives inside "
        "archives are not extracted)"
    )
    assert not (tmp_path / "out").exists()


def test_zip_documents_are_data_not_nested_archives(tmp_path):
    kmz = _make_zip(tmp_path / "doc.kmz", {"doc.kml": b"<kml/>"}).read_bytes()
    archive = _make_zip(tmp_path / "WAIS.zip", {"WAIS/x.kmz": kmz, "WAIS/x.prj": b"p"})
    dest = extract_archive(archive, tmp_path / "out", "zip")
    assert (dest / "WAIS" / "x.kmz").read_bytes() == kmz


def test_zip_symlinks_are_refused(tmp_path):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("data/passwd")
        link.external_attr = 0o120777 << 16  # a symlink, as Info-ZIP stores one
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(
        UnsafeArchiveError, match=r"links.zip: unsafe member 'data/passwd' \(symlink\)"
    ):
        extract_archive(archive, tmp_path / "out", "zip")


def test_an_extraction_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil

    archive = _make_tar(tmp_path / "fits.tar", GOOD)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        archives.shutil, "disk_usage", lambda path: usage._replace(free=100 * 10**6)
    )
    with pytest.raises(NoRoomError) as refused:
        extract_archive(archive, tmp_path / "out", "tar")
    assert str(refused.value) == f"fits.tar: extracting needs 6 bytes, {tmp_path} has 100.0 MB free"
    assert not (tmp_path / "out").exists()
