"""Safe, atomic, idempotent extraction of tar and zip archives.

Refused, with one line naming the archive and the member, before the member is written:
- names that leave the folder: absolute paths, `..`, backslashes, drive letters, NULs;
- symlinks, hardlinks, devices and fifos (data archives need none of them);
- a nested archive (zip, tar, gzip, bzip2, xz, zstd, 7z or rar bytes inside; document
  formats that are zip files by definition, such as `.kmz`, are data, not archives);
- a bomb: declared sizes adding up to more than `ArchiveLimits.max_total_bytes`, a member
  (or a compressed tar) expanding more than `max_ratio` times, or a member whose bytes run
  past its declared size (counted while it is written).
An extraction that would not fit on the disk is refused before it starts (`NoRoomError`).
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from polar_cube.errors import PolarCubeError, size_text

MARKER_NAME = ".extracted.json"
MAX_TOTAL_BYTES_VARIABLE = "POLAR_CUBE_MAX_EXTRACTED_BYTES"
DEFAULT_MAX_TOTAL_BYTES = 64 * 10**9
DEFAULT_MAX_RATIO = 1000  # deflate cannot exceed about 1032: only bzip2/lzma tricks do
RATIO_CHECKED_FROM_BYTES = 10**6  # smaller members may expand as they like
FREE_SPACE_MARGIN_BYTES = 256 * 10**6
# zip files by definition, holding data rather than other files to extract
ZIP_DOCUMENT_SUFFIXES = (".kmz", ".xlsx", ".docx", ".pptx", ".ods", ".odt", ".odp")
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
)
_PIECE = 2**20
_CORRUPT_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
)


class ArchiveError(PolarCubeError, ValueError):
    """An archive cannot be read (corrupt, truncated, or not an archive at all)."""


class UnsafeArchiveError(ArchiveError):
    """A member would land outside the extraction folder, is a link, a device or a fifo, an
    archive itself, or expands like a bomb."""


class NoRoomError(PolarCubeError, OSError):
    """The extraction would not fit on the disk (the archive itself is fine)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may expand to: in all (declared sizes), and per member (ratio)."""

    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO

    @classmethod
    def from_environment(cls) -> ArchiveLimits:
        """The defaults, the total from POLAR_CUBE_MAX_EXTRACTED_BYTES when set."""
        raw = os.environ.get(MAX_TOTAL_BYTES_VARIABLE)
        if not raw:
            return cls()
        try:
            return cls(max_total_bytes=int(raw))
        except ValueError:
            raise ArchiveError(
                f"{MAX_TOTAL_BYTES_VARIABLE}={raw!r}: not a number of bytes"
            ) from None


def check_archive(
    archive: Path, compression_format: Literal["tar", "zip"], name: str | None = None
) -> list[str]:
    """Check that `archive` lists completely (a tar must end with its end-of-archive block)
    and that no member is unsafe; return the member names. Messages name `name` (default:
    the file name)."""
    with _reader(Path(archive), compression_format, name) as source:
        return source.validate(ArchiveLimits.from_environment())


def extract_archive(
    archive: Path,
    dest_dir: Path,
    compression_format: Literal["tar", "zip"],
    *,
    archive_sha256: str | None = None,
    name: str | None = None,
) -> Path:
    """Extract `archive` into `dest_dir` after validating every member; return `dest_dir`.

    Extraction goes to a hidden sibling folder that is renamed into place once complete, with a
    marker file inside; a folder that has the marker (for an archive of the same size, and the
    same sha256 when given) is reused. A failure leaves neither folder behind.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    size = archive.stat().st_size
    if _is_complete(dest_dir, size, archive_sha256):
        return dest_dir
    if dest_dir.exists():
        shutil.rmtree(dest_dir)  # half-done from an interrupted run
    with _reader(archive, compression_format, name) as source:
        limits = ArchiveLimits.from_environment()
        members = source.validate(limits)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        _check_room(source.name, source.declared_bytes(), dest_dir.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
        try:
            source.extract_to(tmp, limits)
            _write_marker(tmp, archive, size, archive_sha256, members)
            _move_into_place(tmp, dest_dir, size, archive_sha256)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def _reader(archive: Path, compression_format: str, name: str | None) -> _TarReader | _ZipReader:
    if compression_format not in ("tar", "zip"):
        raise ValueError(f"{archive.name}: unknown compression format {compression_format!r}")
    reader = _TarReader if compression_format == "tar" else _ZipReader
    return reader(archive, name or archive.name)


# --- marker and atomic move ---------------------------------------------------------------------


def _is_complete(dest_dir: Path, size: int, sha256: str | None) -> bool:
    try:
        marker = json.loads((dest_dir / MARKER_NAME).read_text())
        return int(marker["size"]) == size and marker.get("sha256") == sha256
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_marker(
    folder: Path, archive: Path, size: int, sha256: str | None, members: list[str]
) -> None:
    record = {"archive": archive.name, "size": size, "sha256": sha256, "members": members}
    (folder / MARKER_NAME).write_text(json.dumps(record, indent=1) + "\n")


def _move_into_place(tmp: Path, dest_dir: Path, size: int, sha256: str | None) -> None:
    try:
        tmp.rename(dest_dir)
    except OSError:
        if not _is_complete(dest_dir, size, sha256):  # a concurrent run may have won the race
            raise


# --- member validation --------------------------------------------------------------------------


def _check_name(archive: str, name: str) -> None:
    """Reject absolute names, `..` components, backslashes, drive letters and NULs."""
    why = None
    if "\0" in name:
        why = "NUL character in the name"
    elif "\\" in name:
        why = "backslash in the name"
    elif name.startswith("/") or re.match(r"[A-Za-z]:", name):
        why = "absolute path"
    elif ".." in name.split("/"):
        why = "path escapes the extraction folder"
    if why:
        raise UnsafeArchiveError(f"{archive}: unsafe member {name!r} ({why})")


def _check_totals(archive: str, declared: int, packed: int, limits: ArchiveLimits) -> None:
    """Refuse what expands past `limits.max_total_bytes`, or a compressed whole (a tar.gz)
    past `limits.max_ratio` times its `packed` size."""
    if declared > limits.max_total_bytes:
        raise UnsafeArchiveError(
            f"{archive}: declares {size_text(declared)} of members, more than the "
            f"{size_text(limits.max_total_bytes)} allowed ({MAX_TOTAL_BYTES_VARIABLE}): a bomb?"
        )
    _check_ratio(archive, None, declared, packed, limits)


def _check_ratio(
    archive: str, member: str | None, size: int, packed: int, limits: ArchiveLimits
) -> None:
    if size >= RATIO_CHECKED_FROM_BYTES and size > limits.max_ratio * max(packed, 1):
        what = f"member {member!r}" if member else "its content"
        raise UnsafeArchiveError(
            f"{archive}: {what} expands {size / max(packed, 1):,.0f} times "
            f"({size_text(packed)} to {size_text(size)}; at most {limits.max_ratio:,.0f} allowed): "
            "a bomb?"
        )


def _check_room(archive: str, declared: int, folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if declared + FREE_SPACE_MARGIN_BYTES > free:
        raise NoRoomError(
            f"{archive}: extracting needs {size_text(declared)}, "
            f"{folder} has {size_text(free)} free"
        )


def _nested_kind(name: str, head: bytes) -> str | None:
    """The archive format `head` (a member's first bytes) starts with, None if it is none (or
    the member is a zip-based document such as a .kmz)."""
    if name.lower().endswith(ZIP_DOCUMENT_SUFFIXES):
        return None
    for magic, kind in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _copy_member(
    archive: str, name: str, stream: BinaryIO, target: Path, declared: int, budget: list[int]
) -> None:
    """Write `stream` (member `name`) to `target`, piece by piece: refuse it as a nested
    archive before writing, or once it runs past its `declared` size or the remaining
    `budget[0]` bytes of the whole extraction."""
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while piece := stream.read(_PIECE):
            if written == 0:
                kind = _nested_kind(name, piece)
                if kind:
                    raise UnsafeArchiveError(
                        f"{archive}: unsafe member {name!r} (a nested {kind} archive: "
                        "archives inside archives are not extracted)"
                    )
            written += len(piece)
            if written > declared or written > budget[0]:
                raise UnsafeArchiveError(
                    f"{archive}: member {name!r} runs past its declared size "
                    f"({size_text(declared)}): a bomb?"
                )
            out.write(piece)
    budget[0] -= written


# --- readers ------------------------------------------------------------------------------------


class _TarReader:
    """Validates and extracts a (possibly compressed) tar archive."""

    def __init__(self, archive: Path, name: str) -> None:
        self.archive, self.name = archive, name
        try:
            self.tar = tarfile.open(archive, "r:*")
        except (*_CORRUPT_ERRORS, OSError) as exc:
            raise ArchiveError(
                f"{name}: cannot read as a tar archive (truncated or damaged?): {exc}"
            ) from exc
        try:
            self.members = self.tar.getmembers()
        except (*_CORRUPT_ERRORS, OSError) as exc:
            self.tar.close()
            raise ArchiveError(f"{name}: cannot list as a tar archive (truncated?): {exc}") from exc
        # tarfile stops listing silently where the data ends; a complete archive ends with a
        # zero block, which tarfile has then read whole.
        if self.tar.fileobj.tell() < self.tar.offset + tarfile.BLOCKSIZE:
            self.tar.close()
            after = f"after member {self.members[-1].name!r} " if self.members else ""
            raise ArchiveError(f"{name} is truncated: it ends {after}without the tar end block")

    def __enter__(self) -> _TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tar.close()

    def declared_bytes(self) -> int:
        return sum(m.size for m in self.members if m.isfile())

    def validate(self, limits: ArchiveLimits) -> list[str]:
        for member in self.members:
            self._check(member)
        _check_totals(self.name, self.declared_bytes(), self.archive.stat().st_size, limits)
        return [m.name for m in self.members]

    def _check(self, member: tarfile.TarInfo) -> None:
        _check_name(self.name, member.name)
        where = f"{self.name}: unsafe member {member.name!r}"
        if member.isdev():
            raise UnsafeArchiveError(f"{where} (device or fifo)")
        if member.issym():
            raise UnsafeArchiveError(f"{where} (symlink to {member.linkname!r})")
        if member.islnk():
            raise UnsafeArchiveError(f"{where} (hardlink to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"{where} (neither a file nor a folder)")

    def extract_to(self, folder: Path, limits: ArchiveLimits) -> None:
        budget = [limits.max_total_bytes]
        for member in self.members:
            target = folder / _normalise(member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:  # one by one, to name a bad member
                stream = self.tar.extractfile(member)
                with stream:
                    _copy_member(self.name, member.name, stream, target, member.size, budget)
            except _CORRUPT_ERRORS as exc:
                raise ArchiveError(
                    f"{self.name}: cannot extract member {member.name!r} (truncated or "
                    f"damaged?): {exc}"
                ) from exc


class _ZipReader:
    """Validates and extracts a zip archive."""

    def __init__(self, archive: Path, name: str) -> None:
        self.archive, self.name = archive, name
        try:
            self.zip = zipfile.ZipFile(archive)
            self.members = self.zip.infolist()
        except (*_CORRUPT_ERRORS, OSError) as exc:
            raise ArchiveError(
                f"{name}: cannot read as a zip archive (truncated or damaged?): {exc}"
            ) from exc

    def __enter__(self) -> _ZipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    def declared_bytes(self) -> int:
        return sum(m.file_size for m in self.members)

    def validate(self, limits: ArchiveLimits) -> list[str]:
        for member in self.members:
            _check_name(self.name, member.filename)
            mode = member.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise UnsafeArchiveError(
                    f"{self.name}: unsafe member {member.filename!r} (symlink)"
                )
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(
                    f"{self.name}: unsafe member {member.filename!r} (device or fifo)"
                )
            _check_ratio(self.name, member.filename, member.file_size, member.compress_size, limits)
        _check_totals(self.name, self.declared_bytes(), self.declared_bytes(), limits)
        return [m.filename for m in self.members]

    def extract_to(self, folder: Path, limits: ArchiveLimits) -> None:
        budget = [limits.max_total_bytes]
        for member in self.members:
            target = folder / _normalise(member.filename)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with self.zip.open(member) as stream:
                    _copy_member(
                        self.name, member.filename, stream, target, member.file_size, budget
                    )
            except (*_CORRUPT_ERRORS, NotImplementedError) as exc:
                raise ArchiveError(
                    f"{self.name}: cannot extract member {member.filename!r} (truncated or "
                    f"damaged?): {exc}"
                ) from exc
            except RuntimeError as exc:  # e.g. an encrypted member
                raise ArchiveError(
                    f"{self.name}: cannot extract member {member.filename!r}: {exc}"
                ) from exc


def _normalise(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))
