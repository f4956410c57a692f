"""Deterministic tar and zip archives of stand-in files: fixed timestamps and modes, so the
same members give the same bytes."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

FIXED_TIME = (2022, 1, 10, 0, 0, 0)  # timestamp stamped into every archive member
FIXED_MTIME = 1641772800  # the same, as a tar member's mtime


def zip_bytes(members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    """A deterministic zip (fixed timestamps) of ``members``, preceded by ``dirs`` entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for d in dirs:
            info = zipfile.ZipInfo(d, FIXED_TIME)
            info.external_attr = 0o40755 << 16 | 0x10
            zf.writestr(info, b"")
        for name, data in members.items():
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A deterministic tar (fixed timestamps, sorted members)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
