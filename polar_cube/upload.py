"""Upload per-dataset cubes to the store's input prefix: metadata last, verified, skipped
when the same cube is already there."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from polar_cube.location import StoreLocation

METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata")
FILES_IN_FLIGHT = 8  # s3fs reads each small file whole: bound how many are in memory at once
INPUTS_PREFIX = "inputs"


class UploadError(RuntimeError):
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


def remote_files(location: StoreLocation, *parts: str) -> dict[str, int]:
    """{relative key: size} of every object under `parts` (empty if there is none)."""
    base = location.path(*parts).rstrip("/")
    location.fs.invalidate_cache()  # s3fs caches listings; other processes may have written
    if not location.fs.exists(base):
        return {}
    found = location.fs.find(base, detail=True)
    return {key[len(base) + 1 :]: int(info["size"]) for key, info in found.items()}


def is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_NAMES


def upload_cube(cube: Path, location: StoreLocation, name: str | None = None) -> UploadResult:
    """Copy a local zarr to `<root>/inputs/<name>`.

    Skipped when the remote has the same files with the same sizes and the same
    consolidated metadata (which holds the inputs fingerprint). Otherwise the remote's
    consolidated metadata goes first (so a half-updated copy cannot be opened), then the
    chunks, then the metadata; stale objects are removed and the result is checked.
    """
    name = name or cube.name
    key = f"{INPUTS_PREFIX}/{name}"
    url = location.url(key)
    local = local_files(cube)
    if ".zmetadata" not in local:
        raise UploadError(f"{cube}: not a complete cube (no consolidated metadata)")
    remote = remote_files(location, key)
    total = sum(local.values())
    if remote == local and _same_metadata(cube, location, key):
        return UploadResult(url, len(local), total, skipped=True)
    fs, base = location.fs, location.path(key).rstrip("/")
    if ".zmetadata" in remote:
        fs.rm(f"{base}/.zmetadata")
    chunks = sorted(k for k in local if not is_metadata(k))
    metadata = sorted((k for k in local if is_metadata(k)), key=lambda k: k.endswith(".zmetadata"))
    for batch in (chunks, metadata):
        if batch and location.is_local:
            for k in batch:
                replace_file(cube / k, Path(base, k))
        elif batch:
            fs.put(
                [str(cube / k) for k in batch],
                [f"{base}/{k}" for k in batch],
                batch_size=FILES_IN_FLIGHT,
            )
    stale = sorted(set(remote) - set(local))
    if stale:
        fs.rm([f"{base}/{k}" for k in stale])
    arrived = remote_files(location, key)
    if arrived != local:
        missing = sorted(k for k in local if arrived.get(k) != local[k])
        raise UploadError(f"{url}: {len(missing)} file(s) did not arrive intact: {missing[:5]}")
    return UploadResult(url, len(local), total, skipped=False)


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


def _same_metadata(cube: Path, location: StoreLocation, key: str) -> bool:
    remote = location.fs.cat_file(location.path(key, ".zmetadata"))
    return remote == (cube / ".zmetadata").read_bytes()
