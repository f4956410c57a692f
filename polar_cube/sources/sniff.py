"""What the first bytes of a body or file hold: binary data, text, an HTML page or nothing.

Shared by the download's checks (`polar_cube.sources.download`) and the per-format file checks
(`polar_cube.sources.checks`): both refuse a login or error page saved under a data file's
name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

SNIFF_BYTES = 4096  # how much of a body to read to tell what it is


def body_kind(head: bytes) -> Literal["html", "text", "empty"] | None:
    """What the first bytes of a body are when they are not binary data: an HTML page,
    other text, or nothing; None for binary data."""
    if not head:
        return "empty"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n\f\v").lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text" if _is_text(head) else None


def read_head(path: Path) -> bytes:
    """The first `SNIFF_BYTES` of the file at `path`."""
    with path.open("rb") as f:
        return f.read(SNIFF_BYTES)


def body_start(head: bytes, length: int = 60) -> str:
    """The first `length` characters of a text body, for messages."""
    return head.decode("utf-8", "replace")[:length]


def _is_text(head: bytes) -> bool:
    """UTF-8 text of printable characters and whitespace (a character cut at the end is ok)."""
    if b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: error.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)
