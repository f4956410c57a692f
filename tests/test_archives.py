"""extract_archive: good archives, hostile members, idempotency, crash leftovers, corruption."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from polar_cube.sources.archives import ArchiveError, UnsafeArchiveError, extract_archive


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
    archive = _make_tar(tmp_path / "good.tar", [*GOOD, _link("data/link.tif", "a.tif")], mode)
    dest = extract_archive(archive, tmp_path / "out", "tar")
    assert dest == tmp_path / "out"
    assert (dest / "data" / "a.tif").read_bytes() == b"aaa"
    assert (dest / "data" / "sub" / "b.txt").read_bytes() == b"bb"
    assert (dest / "data" / "link.tif").read_bytes() == b"aaa"
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
        (_link("hard", "../outside", tarfile.LNKTYPE), "hardlink"),
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
    # "here" -> "." is harmless on its own, but "here/.." then points above the root.
    archive = _make_tar(tmp_path / "chain.tar", [_link("here", "."), _link("up", "here/..")])
    with pytest.raises(UnsafeArchiveError, match="'up'"):
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
