"""Publishing a cube under its final name so that nobody ever opens a partial one.

The cube is merged, patched and verified under a staging name first. Publishing then:
- local folder: swaps the staged folder in by renames (old version removed after);
- object store (no renames): hides the old version by deleting its metadata objects
  (consolidated metadata first), copies the chunks server-side straight from the inputs the
  list next to the staged cube names (`chunk_sources_key`: each chunk is copied once, not
  into the staged cube and again out of it), checks their sizes, removes stale ones, and writes the
  metadata last, consolidated metadata very last. While that runs the name holds no
  openable cube; if it is interrupted, rerunning the publish completes it.
Chunks are only ever moved or copied as stored objects, never decoded. The overview levels
(`<stem>.levels`) are published the same way, with `.zlevels` as their last object.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from fsspec.asyn import sync

from polar_cube.keys import is_metadata, metadata_order
from polar_cube.levels import ZLEVELS
from polar_cube.location import StoreLocation, remote_files
from polar_cube.zarr_store import replace_directory

STAGING_PREFIX = ".staging"
CHUNK_SOURCES_SUFFIX = ".chunk-sources.json"
COPIES_IN_FLIGHT = 32  # concurrent server-side copies on an object store
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP)


def copy_objects(location: StoreLocation, pairs: Sequence[tuple[str, str]]) -> None:
    """Copy stored objects (filesystem paths: source, target) byte for byte, never decoding
    them: hard links in a local folder (a file copy where linking is impossible, e.g. across
    devices), server-side copies (CopyObject) on an object store."""
    if not pairs:
        return
    if not location.is_local:
        sync(location.fs.loop, _copy_server_side, location.fs, pairs)
        return
    folders: set[str] = set()
    for source, target in pairs:
        folder = os.path.dirname(target)
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)
            folders.add(folder)
        link_or_copy_file(source, target)


async def _copy_server_side(fs, pairs: Sequence[tuple[str, str]]) -> None:
    """CopyObject for every pair, COPIES_IN_FLIGHT at a time. s3fs's `copy` asks for each
    source's size first (to choose a multipart copy above 5 GB); chunks never are that
    big, so one request per object is enough."""
    in_flight = asyncio.Semaphore(COPIES_IN_FLIGHT)

    async def copy(source: str, target: str) -> None:
        async with in_flight:
            await fs._copy_basic(source, target)

    await asyncio.gather(*(copy(source, target) for source, target in pairs))


def link_or_copy_file(source: str, target: str) -> None:
    """Hard-link `source` as `target`, or copy it where the filesystem cannot link it."""
    try:
        os.link(source, target)
    except FileExistsError:
        os.unlink(target)
        link_or_copy_file(source, target)
    except OSError as error:
        if error.errno not in _NO_HARD_LINK:
            raise
        shutil.copyfile(source, target)


def chunk_sources_key(staged_key: str) -> str:
    """Next to a cube (or levels folder) staged on an object store: {chunk key below it:
    [source object path, size]}, the chunks its publication copies."""
    return staged_key + CHUNK_SOURCES_SUFFIX


def staging_key(final_key: str, fingerprint: str) -> str:
    """Deterministic per inputs, so a rerun finds (and resumes) its own staged cube."""
    return f"{STAGING_PREFIX}/{final_key}.{fingerprint[:16]}"


def publish(location: StoreLocation, staged_key: str, final_key: str) -> str:
    """Move the staged cube (or levels folder) to `final_key`; returns the published URL."""
    if location.is_local:
        final = Path(location.path(final_key))
        replace_directory(Path(location.path(staged_key)), final)
        _remove_swap_leftovers(final)
        return location.url(final_key)
    fs = location.fs
    source, target = location.path(staged_key), location.path(final_key)
    staged = remote_files(location, staged_key)
    if not any(k in staged for k in (".zmetadata", ZLEVELS)):
        raise FileNotFoundError(f"{location.url(staged_key)}: no complete staged cube or levels")
    chunks = _chunk_sources(location, staged_key, staged)
    old = remote_files(location, final_key)
    hidden = _hide(location, final_key, old)
    copy_objects(location, [(path, f"{target}/{k}") for k, (path, _) in chunks.items()])
    arrived = remote_files(location, final_key)
    broken = sorted(k for k, (_, size) in chunks.items() if arrived.get(k) != size)
    if broken:
        raise OSError(
            f"{location.url(final_key)}: {len(broken)} chunk(s) did not arrive intact, "
            f"e.g. {broken[0]}; publishing again completes it"
        )
    metadata = [k for k in staged if is_metadata(k)]
    stale = sorted(set(old) - set(chunks) - set(metadata) - set(hidden))
    if stale:
        fs.rm([f"{target}/{k}" for k in stale])
    for batch in metadata_batches(metadata):
        fs.copy([f"{source}/{k}" for k in batch], [f"{target}/{k}" for k in batch])
    fs.rm(source, recursive=True)
    fs.rm(location.path(chunk_sources_key(staged_key)))
    return location.url(final_key)


def _chunk_sources(location: StoreLocation, staged_key: str, staged: dict[str, int]) -> dict:
    """{chunk key: (object path, size)} of a staged cube or levels folder: the chunks its
    `chunk_sources_key` lists, and any chunk object stored in it."""
    listing = location.path(chunk_sources_key(staged_key))
    if not location.fs.exists(listing):
        raise FileNotFoundError(f"{location.url(staged_key)}: no list of its chunks ({listing})")
    chunks = {
        k: (path, size) for k, (path, size) in json.loads(location.fs.cat_file(listing)).items()
    }
    source = location.path(staged_key)
    chunks.update((k, (f"{source}/{k}", size)) for k, size in staged.items() if not is_metadata(k))
    return chunks


def withdraw(location: StoreLocation, key: str) -> None:
    """Make what is published at `key` unopenable ahead of replacing it: a local folder is
    removed (renamed away first), an object store's metadata deleted, marker first."""
    if location.is_local:
        folder = Path(location.path(key))
        if folder.exists():  # renamed away first: never half-removed under its name
            folder.rename(folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}"))
        _remove_swap_leftovers(folder)
        return
    _hide(location, key, remote_files(location, key))


def _remove_swap_leftovers(folder: Path) -> None:
    """Remove the hidden old versions (`.<name>.old-*`) of a local `folder` that a publish or
    withdrawal killed between its rename and the removal left behind."""
    for leftover in folder.parent.glob(f"{glob.escape(f'.{folder.name}')}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _hide(location: StoreLocation, key: str, stored: dict[str, int]) -> list[str]:
    """Delete the metadata objects among `stored` in reverse write order
    (consolidated metadata and `.zlevels` before anything else), a batch at a time; returns
    their keys."""
    batches = metadata_batches(k for k in stored if is_metadata(k))
    for batch in reversed(batches):
        location.fs.rm([location.path(key, name) for name in batch])
    return [name for batch in batches for name in batch]


def metadata_batches(keys: Iterable[str]) -> list[list[str]]:
    """Metadata keys in write order (`keys.metadata_order`), in batches of keys that may
    be written (or, in reverse, deleted) at once: same rank, same depth."""
    batches: dict[tuple, list[str]] = {}
    for key in keys:
        batches.setdefault(metadata_order(key)[:2], []).append(key)
    return [sorted(batches[rank]) for rank in sorted(batches)]


def remove_stale_staging(location: StoreLocation, final_key: str, keep: str) -> None:
    """Drop staged cubes of earlier inputs (crashed runs), keeping the current one."""
    prefix = location.path(STAGING_PREFIX)
    if not location.fs.exists(prefix):
        return
    kept = keep.rsplit("/", 1)[-1]
    for path in location.fs.ls(prefix, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(f"{final_key}.") and name not in (kept, chunk_sources_key(kept)):
            location.fs.rm(path, recursive=True)
