"""Carry unchanged sources into a new version: their stored objects, copied, never decoded.

A version is immutable and a plain zarr cannot point at another prefix's chunks, so a source
whose inputs did not change since the version it was built into has its chunk objects (cube
and levels) and its metadata copied into the new version: hard links in a local folder,
server-side copies (CopyObject) on an object store. Nothing is recomputed and nothing passes
through this machine. (An Icechunk repository would share them by reference instead.)
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
from collections.abc import Iterable, Sequence

from fsspec.asyn import sync

from polar_cube.cube.integrity import record_carried_digests
from polar_cube.keys import VersionKeys, is_metadata, metadata_order
from polar_cube.location import StoreLocation, remote_files
from polar_cube.spec import CubeSpec
from polar_cube.zarr3_shards import ZARR_JSON

COPIES_IN_FLIGHT = 32  # concurrent server-side copies on an object store
COPY_BATCH = 256  # objects per copy call
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP)


def carry_sources(
    location: StoreLocation,
    spec: CubeSpec,
    origins: dict[str, VersionKeys],
    into: VersionKeys,
) -> int:
    """Copy each source's part of the version `origins[source id]` into the version `into`:
    its variables' chunks (cube and levels), the record of their digests (`cube.integrity`),
    then its metadata, completion markers last (an interrupted carry is redone whole).
    Returns how many objects were copied."""
    copied = 0
    listings: dict[str, dict[str, int]] = {}
    for source_id, origin in origins.items():
        names = [v.name for v in spec.variables_of(source_id)]
        metadata_trees = [
            (origin.input_key(source_id), into.input_key(source_id)),
            (origin.input_levels_key(source_id), into.input_levels_key(source_id)),
        ]
        old = [target for _, target in metadata_trees]  # unmarked first, then cleared:
        old.append(into.input_chunks_key(source_id))
        old += [f"{into.cube}/{name}" for name in names]  # what an earlier attempt left
        for found in location.fs.glob(location.path(into.levels, "*.zarr")):
            level = found.rstrip("/").rsplit("/", 1)[-1]
            old += [f"{into.levels}/{level}/{name}" for name in names]
        for key in old:
            if location.exists(key):
                location.fs.rm(location.path(key), recursive=True)
        pairs, copies = [], []
        for key_from, key_to, pattern in (
            (origin.cube, into.cube, _chunk_pattern(names, levels=False)),
            (origin.levels, into.levels, _chunk_pattern(names, levels=True)),
        ):
            if key_from not in listings:
                listings[key_from] = remote_files(location, key_from)
            names = [name for name in sorted(listings[key_from]) if pattern.fullmatch(name)]
            pairs += [(location.path(key_from, n), location.path(key_to, n)) for n in names]
            copies += [f"{key_to}/{name}" for name in names]
        for start in range(0, len(pairs), COPY_BATCH):
            copy_objects(location, pairs[start : start + COPY_BATCH])
        record_carried_digests(location, origin, into, source_id, copies)
        for key_from, key_to in metadata_trees:
            stored = remote_files(location, key_from)
            for batch in metadata_batches(stored):
                copy_objects(
                    location,
                    [(location.path(key_from, k), location.path(key_to, k)) for k in batch],
                )
        copied += len(pairs)
    location.fs.invalidate_cache()
    return copied


def _chunk_pattern(names: list[str], levels: bool) -> re.Pattern:
    """Chunk keys (`<var>/i.j`, `<var>/t.i.j`; zarr 3: `<var>/c/i/j`, `<var>/c/t/i/j`; in
    levels `<k>.zarr/<var>/…`) of `names`."""
    variables = "|".join(re.escape(name) for name in names)
    level = r"\d+\.zarr/" if levels else ""
    return re.compile(rf"{level}(?:{variables})/(?:\d+(?:\.\d+)+|c(?:/\d+)+)")


def metadata_batches(keys: Iterable[str]) -> list[list[str]]:
    """Keys in write order: chunks and other objects first, then metadata by
    `keys.metadata_order` (arrays', groups', consolidated, `.zlevels` last), in batches that
    may be written at once."""
    batches: dict[tuple, list[str]] = {}
    for key in keys:
        rank = (metadata_order(key)[0] + 1, metadata_order(key)[1]) if is_metadata(key) else (0, 0)
        if key.rsplit("/", 1)[-1] == ZARR_JSON:  # zarr 3: arrays' before their group's
            rank = (1, -key.count("/"))
        batches.setdefault(rank, []).append(key)
    return [sorted(batches[rank]) for rank in sorted(batches)]


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
