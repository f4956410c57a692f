"""Upload per-dataset cubes and their overview levels to the store's input prefix: metadata
last, verified, skipped when the same cube is already there."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.keys import INPUTS_PREFIX, is_metadata, metadata_order
from polar_cube.levels import ZLEVELS, levels_name
from polar_cube.location import FILES_IN_FLIGHT, StoreLocation, remote_files
from polar_cube.zarr_store import levels_path

# The flow uploads the cubes concurrently; their files are sent one tree at a time, so that
# FILES_IN_FLIGHT bounds them all together (the bandwidth is shared anyway).
_SENDING = threading.Lock()


class UploadError(PolarCubeError, RuntimeError):
    """What arrived differs from what was sent; the message names the cube and the files."""


@dataclass(frozen=True)
class UploadResult:
    url: str
    files: int
    bytes: int
    skipped: bool


def local_files(cube: Path) -> dict[str, int]:
    """{relative key: size} of every file of a local zarr."""
    return {
        p.relative_to(cube).as_posix(): p.stat().st_size for p in cube.rglob("*") if p.is_file()
    }


def write_batches(keys: Iterable[str]) -> list[list[str]]:
    """`keys` in the batches to write one after the other: chunks, array and group metadata,
    consolidated metadata, `.zlevels` (each batch may be written concurrently)."""
    batches: dict[int, list[str]] = {}
    for key in keys:
        rank = metadata_order(key)[0] + 1 if is_metadata(key) else 0
        batches.setdefault(rank, []).append(key)
    return [sorted(batches[rank], key=metadata_order) for rank in sorted(batches)]


def upload_cube(cube: Path, location: StoreLocation, name: str | None = None) -> UploadResult:
    """Copy a local zarr to `<root>/inputs/<name>`, and its `<stem>.levels` sibling (if any)
    to `<root>/inputs/<stem>.levels`, the levels first.

    Skipped when the remote has the same files with the same sizes and the same
    consolidated metadata (which holds the inputs fingerprint and the statistics); the levels
    are uploaded whenever the cube is. Otherwise the remote's consolidated metadata (the
    levels' `.zlevels`) goes first (so a half-updated copy cannot be opened), then the
    chunks, then the metadata; stale objects are removed and the result is checked.
    """
    name = name or cube.name
    key = f"{INPUTS_PREFIX}/{name}"
    if not (cube / ".zmetadata").is_file():
        raise UploadError(f"{cube}: not a complete cube (no consolidated metadata)")
    same_cube = _is_there(cube, location, key, ".zmetadata")
    levels = levels_path(cube)
    uploaded = []
    if levels.is_dir():
        if not (levels / ZLEVELS).is_file():
            raise UploadError(f"{levels}: not complete overview levels (no {ZLEVELS})")
        levels_key = f"{INPUTS_PREFIX}/{levels_name(name)}"
        if not (same_cube and _is_there(levels, location, levels_key, ZLEVELS)):
            uploaded.append(_upload_tree(levels, location, levels_key, ZLEVELS))
    if not same_cube:
        uploaded.append(_upload_tree(cube, location, key, ".zmetadata"))
    files = {**local_files(cube), **{f"levels/{k}": v for k, v in _level_files(levels).items()}}
    return UploadResult(location.url(key), len(files), sum(files.values()), skipped=not uploaded)


def _level_files(levels: Path) -> dict[str, int]:
    return local_files(levels) if levels.is_dir() else {}


def _is_there(folder: Path, location: StoreLocation, key: str, marker: str) -> bool:
    """The remote copy has the same files, sizes and `marker` (metadata) bytes."""
    if remote_files(location, key) != local_files(folder):
        return False
    return location.fs.cat_file(location.path(key, marker)) == (folder / marker).read_bytes()


def _upload_tree(folder: Path, location: StoreLocation, key: str, marker: str) -> UploadResult:
    """Hide the remote copy (its `marker` first), send chunks, then metadata, drop stale
    objects, and check what arrived."""
    url = location.url(key)
    local = local_files(folder)
    remote = remote_files(location, key)
    fs, base = location.fs, location.path(key).rstrip("/")
    if marker in remote:
        fs.rm(f"{base}/{marker}")
    with _SENDING:
        _send(folder, location, base, local)
    stale = sorted(set(remote) - set(local))
    if stale:
        fs.rm([f"{base}/{k}" for k in stale])
    arrived = remote_files(location, key)
    if arrived != local:
        missing = sorted(k for k in local if arrived.get(k) != local[k])
        raise UploadError(f"{url}: {len(missing)} file(s) did not arrive intact: {missing[:5]}")
    return UploadResult(url, len(local), sum(local.values()), skipped=False)


def _send(folder: Path, location: StoreLocation, base: str, local: dict[str, int]) -> None:
    """Chunks first, then metadata in write order (each batch concurrently)."""
    for batch in write_batches(local):
        if location.is_local:
            for k in batch:
                replace_file(folder / k, Path(base, k))
        else:
            location.fs.put(
                [str(folder / k) for k in batch],
                [f"{base}/{k}" for k in batch],
                batch_size=FILES_IN_FLIGHT,
            )


def replace_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` as a new file swapped in by a rename, never by writing into
    the old one: a merged cube may share the old one's bytes (a hard link)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
