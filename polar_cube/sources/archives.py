"""Safe, atomic, idempotent extraction of tar and zip archives."""

from __future__ import annotations

import json
import lzma
import posixpath
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Literal

from polar_cube.errors import PolarCubeError

MARKER_NAME = ".extracted.json"
_MAX_LINK_DEPTH = 40
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
    """An archive member would land outside the extraction folder (or is a device/fifo)."""


def check_archive(
    archive: Path, compression_format: Literal["tar", "zip"], name: str | None = None
) -> list[str]:
    """Check that `archive` lists completely (a tar must end with its end-of-archive block)
    and that no member is unsafe; return the member names. Messages name `name` (default:
    the file name)."""
    with _reader(Path(archive), compression_format, name) as source:
        return source.validate()


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
        members = source.validate()
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
        try:
            source.extract_to(tmp)
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


def _normalise(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _resolve_inside(path: str, links: dict[str, str], depth: int = 0) -> list[str] | None:
    """Resolve `path` (relative to the root) through the archive's symlinks, lexically.

    Returns the resolved components, or None when it escapes the root (or loops).
    """
    if depth > _MAX_LINK_DEPTH or path.startswith("/"):
        return None
    stack: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = links.get("/".join(stack))
        if target is not None:
            stack.pop()
            resolved = _resolve_inside(posixpath.join(*stack, target), links, depth + 1)
            if resolved is None:
                return None
            stack = resolved
    return stack


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

    def validate(self) -> list[str]:
        links = {_normalise(m.name): m.linkname for m in self.members if m.issym()}
        for member in self.members:
            self._check(member, links)
        return [m.name for m in self.members]

    def _check(self, member: tarfile.TarInfo, links: dict[str, str]) -> None:
        _check_name(self.name, member.name)
        where = f"{self.name}: unsafe member {member.name!r}"
        if member.isdev():
            raise UnsafeArchiveError(f"{where} (device or fifo)")
        if member.issym():
            target = posixpath.join(posixpath.dirname(member.name), member.linkname)
            if _resolve_inside(target, links) is None:
                raise UnsafeArchiveError(
                    f"{where} (symlink to {member.linkname!r} points outside the folder)"
                )
        elif member.islnk() and _resolve_inside(member.linkname, links) is None:
            raise UnsafeArchiveError(
                f"{where} (hardlink to {member.linkname!r} points outside the folder)"
            )

    def extract_to(self, folder: Path) -> None:
        for member in self.members:
            try:  # one by one to name a bad member; directories keep default attributes
                self.tar.extract(member, folder, set_attrs=not member.isdir(), filter="data")
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"{self.name}: unsafe member ({exc})") from exc
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

    def validate(self) -> list[str]:
        for member in self.members:
            _check_name(self.name, member.filename)
        return [m.filename for m in self.members]

    def extract_to(self, folder: Path) -> None:
        for member in self.members:
            try:
                self.zip.extract(member, folder)
            except (*_CORRUPT_ERRORS, NotImplementedError) as exc:
                raise ArchiveError(
                    f"{self.name}: cannot extract member {member.filename!r} (truncated or "
                    f"damaged?): {exc}"
                ) from exc
            except RuntimeError as exc:  # e.g. an encrypted member
                raise ArchiveError(
                    f"{self.name}: cannot extract member {member.filename!r}: {exc}"
                ) from exc
