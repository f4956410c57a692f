"""Integrity at rest: every chunk object of a cube version is recorded as it is written, so
damage done to it later (a flipped bit, a truncated or lost object) is found, named, and
repaired.

Each source's build records the sha256 and size of every chunk object it writes into the
version (cube and levels: `zarr_store.write_zarr`, in `<stem>.inputs/<id>.chunks.json`); a
carried source's record is carried with it. Before the version is published the records are
combined into its manifest `<stem>.chunks.json`, keyed by object key (`write_manifest`).

`deep_verify` reads every chunk object again and compares it with the manifest;
`repair_version` recomputes exactly the damaged or missing ones: a cube chunk from its source
(the download cache, or downloaded again) through the same reader and resampler as the
build, for that chunk's window only; a level chunk by halving its window of the level above
(as the build does). Both write the same bytes as a clean build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
import zarr

from polar_cube.errors import PolarCubeError
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, icechunk_key
from polar_cube.levels import ZLEVELS, halve, level_name, read_record
from polar_cube.location import FILES_IN_FLIGHT, StoreLocation, remote_files
from polar_cube.spec import CubeSpec, SourceSpec
from polar_cube.zarr3_shards import shard_key, write_shard
from polar_cube.zarr_store import (
    FINGERPRINT_ATTR,
    chunk_digest,
    encode_digests,
    rechunk_for_writing,
    stored_fingerprint,
    write_chunk,
)

MANIFEST_FORMAT = 1
# a chunk object's key under a cube (`<variable>/i.j`, `t.i.j`; zarr 3 `c/i/j`, `c/t/i/j`) or
# its levels (`<k>.zarr/<variable>/…`); coordinates (one index) never match
_CHUNK = re.compile(
    r"(?:(?P<level>\d+)\.zarr/)?(?P<variable>[^/]+)/(?P<index>\d+(?:\.\d+)+|c(?:/\d+){2,})"
)


class IntegrityError(PolarCubeError, ValueError):
    """A version whose chunks cannot be verified or repaired; one line says why."""


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk object that is not as the manifest recorded it."""

    key: str  # the object's key in the target
    kind: str  # "damaged", "missing" or "unexpected" (stored, but in no manifest)
    expected: tuple[str, int] | None = None
    found: tuple[str, int] | None = None

    def line(self, location: StoreLocation, keys: VersionKeys) -> str:
        """`magnetic_anomaly: chunk 0.3.5 damaged (sha256 1a2b3c4d5e6f ≠ manifest …): URL`."""
        variable, level, index = chunk_of(keys, self.key)
        where = f"level {level} chunk {index}" if level else f"chunk {index}"
        detail = ""
        if self.kind == "damaged" and self.expected and self.found:
            if self.found[1] != self.expected[1]:
                detail = f" ({self.found[1]} bytes ≠ manifest {self.expected[1]})"
            else:
                detail = f" (sha256 {self.found[0][:12]} ≠ manifest {self.expected[0][:12]})"
        elif self.kind == "unexpected":
            detail = " (stored, not in the manifest)"
        return f"{variable}: {where} {self.kind}{detail}: {location.url(self.key)}"


@dataclass(frozen=True)
class DeepReport:
    """What `deep_verify` found: the chunk objects read, of how many variables, and the
    problems (none: every chunk is as written)."""

    cube: str
    chunks: int
    variables: int
    problems: list[ChunkProblem] = field(default_factory=list)


def chunk_of(keys: VersionKeys, key: str) -> tuple[str, int, str]:
    """(variable, level (0: the cube), chunk index `0.3.5`) of a chunk object's key."""
    for root, in_levels in ((keys.cube, False), (keys.levels, True)):
        if key.startswith(f"{root}/"):
            match = _CHUNK.fullmatch(key[len(root) + 1 :])
            if match and bool(match["level"]) == in_levels:
                index = match["index"].removeprefix("c/").replace("/", ".")
                return match["variable"], int(match["level"] or 0), index
    raise IntegrityError(f"{key}: not a chunk object of {keys.cube} or its levels")


def chunk_index(key: str) -> tuple[int, ...]:
    """The chunk grid index of a chunk object's key (`…/0.3.5` or `…/c/0/3/5`)."""
    last = key.rsplit("/c/", 1)[1].split("/") if "/c/" in key else key.rsplit("/", 1)[1].split(".")
    return tuple(int(part) for part in last)


# --- the manifest --------------------------------------------------------------------------


def source_digests(location: StoreLocation, keys: VersionKeys, source_id: str) -> dict | None:
    """The digests a source's build (or carry) recorded in the version `keys`, if any."""
    try:
        return json.loads(location.fs.cat_file(location.path(keys.input_chunks_key(source_id))))
    except FileNotFoundError:
        return None


def record_carried_digests(
    location: StoreLocation, origin: VersionKeys, into: VersionKeys, source_id: str, copied
) -> None:
    """Give a carried source its record in `into`: the origin version's (same relative keys),
    or, for an origin built before chunks were recorded, the digests of the copies (`copied`:
    their keys in the target, under `into`'s cube or levels)."""
    part = source_digests(location, origin, source_id)
    if part is None:
        digests = read_digests(location, list(copied))
        part = {"cube": {}, "levels": {}}
        for key, digest in digests.items():
            if digest is None:
                raise IntegrityError(f"{location.url(key)}: vanished while it was carried")
            section, root = (
                ("levels", into.levels) if key.startswith(into.levels) else ("cube", into.cube)
            )
            part[section][key[len(root) + 1 :]] = digest
        data = encode_digests(part)
    else:
        data = json.dumps(part, separators=(",", ":")).encode()
    location.fs.pipe_file(location.path(into.input_chunks_key(source_id)), data)


def write_manifest(location: StoreLocation, keys: VersionKeys, source_ids: Iterable[str]) -> int:
    """Combine the sources' records into the version's manifest `<stem>.chunks.json`; returns
    how many chunk objects it lists. IntegrityError when a source has no record (its build
    did not finish)."""
    chunks: dict[str, list] = {}
    for source_id in sorted(source_ids):
        part = source_digests(location, keys, source_id)
        if part is None:
            raise IntegrityError(
                f"{location.url(keys.input_chunks_key(source_id))}: missing, "
                f"{source_id}'s chunks were not recorded (rerun the build)"
            )
        for section, root in (("cube", keys.cube), ("levels", keys.levels)):
            chunks |= {f"{root}/{key}": digest for key, digest in part.get(section, {}).items()}
    record = {
        "format": MANIFEST_FORMAT,
        "cube": keys.cube,
        "algorithm": "sha256",
        "chunks": dict(sorted(chunks.items())),
    }
    data = json.dumps(record, separators=(",", ":")).encode()
    location.fs.pipe_file(location.path(keys.manifest), data)
    return len(chunks)


def has_manifest(location: StoreLocation, keys: VersionKeys) -> bool:
    return location.exists(keys.manifest)


def read_manifest(location: StoreLocation, keys: VersionKeys) -> dict[str, tuple[str, int]]:
    """{object key: (sha256, size)} of the version's chunks; IntegrityError without one."""
    try:
        record = json.loads(location.fs.cat_file(location.path(keys.manifest)))
    except FileNotFoundError:
        raise IntegrityError(
            f"{location.url(keys.cube)}: no chunk manifest ({keys.manifest}): built before "
            "chunks were recorded, it cannot be deep-verified (a rebuild records them)"
        ) from None
    except ValueError as error:
        message = f"{location.url(keys.manifest)}: not a readable manifest ({error})"
        raise IntegrityError(message) from None
    return {key: (digest[0], int(digest[1])) for key, digest in record["chunks"].items()}


# --- reading it all again --------------------------------------------------------------------


def read_digests(location: StoreLocation, keys: list[str]) -> dict[str, list | None]:
    """{key: [sha256, size], or None when the object is missing} of the objects `keys`, read
    `FILES_IN_FLIGHT` at a time (memory: that many objects)."""

    def one(key: str) -> list | None:
        try:
            return chunk_digest(location.fs.cat_file(location.path(key)))
        except FileNotFoundError:
            return None

    location.fs.invalidate_cache()
    with ThreadPoolExecutor(FILES_IN_FLIGHT) as pool:
        return dict(zip(keys, pool.map(one, keys), strict=True))


def stored_chunks(location: StoreLocation, keys: VersionKeys) -> set[str]:
    """The keys of every chunk object stored under the version's cube and levels."""
    found = set()
    for root in (keys.cube, keys.levels):
        found |= {f"{root}/{key}" for key in remote_files(location, root) if _CHUNK.fullmatch(key)}
    return found


def deep_verify(location: StoreLocation, keys: VersionKeys) -> DeepReport:
    """Read every chunk object of the version `keys` and compare it with its manifest: each
    damaged, missing or unexpected one is a `ChunkProblem`."""
    manifest = read_manifest(location, keys)
    stored = stored_chunks(location, keys)
    digests = read_digests(location, sorted(manifest))
    problems = []
    for key, expected in sorted(manifest.items()):
        found = digests[key]
        if found is None:
            problems.append(ChunkProblem(key, "missing", expected))
        elif tuple(found) != expected:
            problems.append(ChunkProblem(key, "damaged", expected, (found[0], found[1])))
    problems += [ChunkProblem(key, "unexpected") for key in sorted(stored - set(manifest))]
    variables = {chunk_of(keys, key)[0] for key in manifest}
    return DeepReport(keys.cube, len(manifest), len(variables), problems)


def refuse_damaged_draft(
    location: StoreLocation, spec: CubeSpec, report: DeepReport
) -> IntegrityError:
    """The error for a draft version that failed its deep verification (nothing published):
    the sources owning its damaged chunks lose their record, so the next run builds them
    again instead of reusing them. One line per problem after the first."""
    keys = VersionKeys(spec.data_id)
    source_of = {v.name: v.source for v in spec.variables}
    for problem in report.problems:
        source_id = source_of.get(chunk_of(keys, problem.key)[0])
        if source_id and location.exists(keys.input_chunks_key(source_id)):
            location.fs.rm_file(location.path(keys.input_chunks_key(source_id)))
    lines = "\n".join(p.line(location, keys) for p in report.problems)
    return IntegrityError(
        f"{location.url(keys.cube)}: {len(report.problems)} chunk(s) not as written, "
        "nothing published (a rerun writes their sources again; chunks carried from an "
        f"earlier version: `polar-cube repair` that one first):\n{lines}"
    )


# --- repair --------------------------------------------------------------------------------


def repair_version(
    location: StoreLocation,
    spec: CubeSpec,
    grid: TargetGrid,
    fetch: Callable[[SourceSpec], object],
) -> tuple[DeepReport, list[ChunkProblem]]:
    """Recompute the damaged or missing chunks of the version `spec` names (`at_version`,
    `at_format` as it was built) and remove unexpected ones; then verify it deeply again.
    `fetch(source)` returns the source's `FetchedSource` (cache, or downloaded again).
    Returns (the report after the repair, the problems repaired). IntegrityError when the
    version cannot be repaired (no manifest, an Icechunk-committed series, a source that is
    not the one it was built from) or is still not whole afterwards."""
    keys = VersionKeys(spec.data_id)
    before = deep_verify(location, keys)
    if not before.problems:
        return before, []
    if location.exists(icechunk_key(spec.series)):
        raise IntegrityError(
            f"{location.url(icechunk_key(spec.series))}: its commits pin each chunk's ETag; "
            "repair of an Icechunk-committed series is not supported (rebuild the version)"
        )
    damaged = [p for p in before.problems if p.kind != "unexpected"]
    in_cube = [p for p in damaged if chunk_of(keys, p.key)[1] == 0]
    in_levels = sorted(
        (p for p in damaged if chunk_of(keys, p.key)[1]), key=lambda p: chunk_of(keys, p.key)[1]
    )
    source_of = {v.name: v.source for v in spec.variables}
    by_source: dict[str, list[ChunkProblem]] = {}
    for problem in in_cube:
        variable = chunk_of(keys, problem.key)[0]
        if variable not in source_of:
            raise IntegrityError(f"{problem.line(location, keys)}: not a variable of the spec")
        by_source.setdefault(source_of[variable], []).append(problem)
    for source_id, problems in sorted(by_source.items()):
        _recompute_cube_chunks(location, spec, grid, keys, fetch(spec.source(source_id)), problems)
    for problem in in_levels:
        _recompute_level_chunk(location, keys, problem)
    for problem in before.problems:
        if problem.kind == "unexpected":
            location.fs.rm_file(location.path(problem.key))
    after = deep_verify(location, keys)
    if after.problems:
        lines = "\n".join(p.line(location, keys) for p in after.problems)
        raise IntegrityError(f"{location.url(keys.cube)}: still not whole after repair:\n{lines}")
    return after, before.problems


def _recompute_cube_chunks(
    location: StoreLocation,
    spec: CubeSpec,
    grid: TargetGrid,
    keys: VersionKeys,
    fetched,
    problems: list[ChunkProblem],
) -> None:
    """Recompute `problems`' cube chunks from `fetched` (the source they were built from,
    refused otherwise), each from its window of the lazily resampled source."""
    from polar_cube import dataset as ds  # the per-dataset build's reader and resampler

    source_id = fetched.source.id
    inputs = location.child(keys.input_key(source_id))
    if stored_fingerprint(inputs) != ds.dataset_fingerprint(spec, fetched, grid):
        built_from = _source_sha256(inputs)
        why = (
            f"changed upstream (sha256 {fetched.sha256[:12]} ≠ {built_from[:12]} it was built from)"
            if built_from and built_from != fetched.sha256
            else f"the recipe or the software changed since ({FINGERPRINT_ATTR} differs)"
        )
        raise IntegrityError(
            f"{source_id} ({fetched.url}): {why}: {keys.cube} cannot be repaired from it, "
            "build a new version instead"
        )
    converted = ds.convert_source(spec, fetched)
    layers = {}
    for problem in problems:
        variable = chunk_of(keys, problem.key)[0]
        array_key = f"{keys.cube}/{variable}"
        array = zarr.open_array(location.mapper(array_key), mode="r")
        shards = array.shards
        outer = shards or array.chunks
        if variable not in layers:
            dataset = ds.resample_layers(converted, grid)
            layers[variable] = rechunk_for_writing(dataset, outer[-1])[variable].data
        index = chunk_index(problem.key)
        window = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, outer, array.shape, strict=True)
        )
        block = np.asarray(layers[variable][window].astype("float32").compute())
        where = location.child(array_key)
        if shards:
            write_shard(where, index, block, inner_chunk_shape=array.chunks, shard_shape=shards)
        elif not np.isnan(block).all():
            write_chunk(where, index, block, array.chunks, zarr_format=array.metadata.zarr_format)


def _source_sha256(inputs: StoreLocation) -> str:
    """The sha256 of the source a per-dataset cube was built from (its variables'
    `source_sha256`), or "" when it does not say."""
    dataset = xr.open_zarr(_store(inputs), consolidated=True)
    found = {str(v.attrs.get("source_sha256", "")) for v in dataset.data_vars.values()}
    return next(iter(found - {""}), "")


def _store(where: StoreLocation):
    return where.root if where.is_local else where.mapper()


def _recompute_level_chunk(
    location: StoreLocation, keys: VersionKeys, problem: ChunkProblem
) -> None:
    """Halve the chunk's window of the level above (the cube for level 1) as the build did:
    block by block, in the blocks the build halved (`build_blocks`: halving a whole block
    at once decides how its empty windows' NaN come out), so the bytes are the same. An
    all-NaN result is no object (the build stores none)."""
    variable, level, _ = chunk_of(keys, problem.key)
    array_key = f"{keys.levels}/{level_name(level)}/{variable}"
    array = zarr.open_array(location.mapper(array_key), mode="r")
    cube = zarr.open_array(location.mapper(f"{keys.cube}/{variable}"), mode="r")
    above = keys.cube if level == 1 else f"{keys.levels}/{level_name(level - 1)}"
    upper = cube if level == 1 else zarr.open_array(location.mapper(f"{above}/{variable}"))
    record = read_record(location.fs.cat_file(location.path(keys.levels, ZLEVELS)))
    method = record["agg_methods"][variable]
    tile = array.chunks[-1]
    first = (cube.shards or cube.chunks)[-1]  # the writing pass's blocks (`write_zarr`)
    fed = build_blocks(cube.shape[-2:], first, tile, level)
    index = chunk_index(problem.key)
    rows, cols = (
        (i * tile, min((i + 1) * tile, n))
        for i, n in zip(index[-2:], array.shape[-2:], strict=True)
    )
    lead = tuple(slice(i, i + 1) for i in index[:-2])  # time: one step per chunk
    out = np.full((*(1 for _ in lead), rows[1] - rows[0], cols[1] - cols[0]), np.nan, "float32")
    for y0, y1 in _overlapping(fed[0], rows):
        for x0, x1 in _overlapping(fed[1], cols):
            half = halve(np.asarray(upper[(*lead, slice(y0, y1), slice(x0, x1))]), method)
            top, left = max(y0 // 2, rows[0]), max(x0 // 2, cols[0])
            bottom = min(y0 // 2 + half.shape[-2], rows[1])
            right = min(x0 // 2 + half.shape[-1], cols[1])
            out[..., top - rows[0] : bottom - rows[0], left - cols[0] : right - cols[0]] = half[
                ..., top - y0 // 2 : bottom - y0 // 2, left - x0 // 2 : right - x0 // 2
            ]
    where = location.child(array_key)
    if np.isnan(out).all():
        key = shard_key(index) if array.metadata.zarr_format == 3 else ".".join(map(str, index))
        if where.exists(key):
            where.fs.rm_file(where.path(key))
        return
    write_chunk(where, index, out, array.chunks, zarr_format=array.metadata.zarr_format)


def build_blocks(shape: tuple[int, int], first: int, tile: int, level: int) -> list[tuple]:
    """The (y, x) block sizes of the level above `level` as the writing pass halved them into
    `level` (`zarr_store._halved`): the cube in blocks of `first`, each level halved block by
    block, rechunked to `tile` where a block would split a 2 x 2 window or not hold whole
    tiles."""

    def regular(total: int, size: int) -> tuple[int, ...]:
        return tuple(min(size, total - start) for start in range(0, total, size))

    blocks = [regular(n, first) for n in shape]
    for _ in range(1, level):
        if any(size % 2 for axis in blocks for size in axis[:-1]):
            blocks = [regular(sum(axis), tile) for axis in blocks]
        blocks = [tuple(-(-size // 2) for size in axis) for axis in blocks]
        if not all(size % tile == 0 for axis in blocks for size in axis[:-1]):
            blocks = [regular(sum(axis), tile) for axis in blocks]
    if any(size % 2 for axis in blocks for size in axis[:-1]):
        blocks = [regular(sum(axis), tile) for axis in blocks]
    return blocks


def _overlapping(blocks: tuple[int, ...], span: tuple[int, int]) -> list[tuple[int, int]]:
    """The (start, end) of the `blocks` (sizes along an axis of the level above) whose halves
    overlap `span` (start, end along the level below)."""
    found, start = [], 0
    for size in blocks:
        end = start + size
        if start // 2 < span[1] and -(-end // 2) > span[0]:
            found.append((start, end))
        start = end
    return found
