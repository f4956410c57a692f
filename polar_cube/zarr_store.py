"""Writing cubes as zarr (format 2, consolidated): CF grid mapping, chunked, atomic.

The writing pass computes each block of a cube once and, from that block, writes the cube's
chunk, collects its statistics (`polar_cube.stats`) and starts its overview levels
(`polar_cube.levels`): one dask computation for the cube, its `.levels` sibling and the
`polar_cube_stats` attribute of every variable.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import itertools
import json
import math
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.buffer import Buffer

from polar_cube import zarr3_shards
from polar_cube.blank import constant_value
from polar_cube.grid import TargetGrid
from polar_cube.keys import chunks_part_name
from polar_cube.levels import (
    FINGERPRINT_KEY,
    LINK,
    ZLEVELS,
    agg_method,
    encode_record,
    halve,
    level_chunk_size,
    level_coords,
    level_count,
    level_name,
    levels_name,
    levels_record,
    link_text,
    read_record,
)
from polar_cube.location import FILES_IN_FLIGHT, StoreLocation
from polar_cube.spec import zarr_layout
from polar_cube.stats import BLOCK_FIELDS, STATS_ATTR, block_stats, combine_block_stats, time_labels

GRID_MAPPING = "crs"
FINGERPRINT_ATTR = "polar_cube_inputs_sha256"
# The CF version the cubes follow, checked by the IOOS compliance checker's `cf:1.10`
# (tests/test_cf.py, and each build's metadata gate: `cube/compliance.py`); it must appear
# as a word of every cube's `Conventions`.
CF_CONVENTIONS = "CF-1.10"
# Every data variable is stored as float32 (`encoding_for`).
DATA_DTYPE = "float32"
# Attributes CF requires to have the data type of their variable (§2.5.1, §3.5, CF-1.7's
# actual_range). Zarr 2 attributes are JSON, which has no float32: they are written as
# floats, and NCZarr's type hints (`_nczarr_attr`) tell netCDF-C to read them as float32
# (without a hint it reads [0, 1] as int and [0.0, 1.0] as double). xarray hides `_nc*`
# attributes; GDAL and xcube ignore the hint.
VALUE_TYPED_ATTRS = (
    "valid_min",
    "valid_max",
    "valid_range",
    "actual_range",
    "missing_value",
    "flag_values",
    "flag_masks",
)
NCZARR_ATTR = "_nczarr_attr"
# ACDD 1.3 (ISO 19115-1 MD_CoverageContentTypeCode) for the coordinates
TIME_ATTRS = {
    "standard_name": "time",
    "long_name": "time",
    "axis": "T",
    "coverage_content_type": "coordinate",
}
# GDAL 3.6 reads blosc; lz4 encodes a chunk ~6x faster than zstd level 3 and decodes ~3x
# faster, for 3 % more bytes on smooth float fields (level 7: as fast as lz4's default 5)
_COMPRESSOR = Blosc(cname="lz4", clevel=7, shuffle=Blosc.SHUFFLE)


def grid_mapping_variable(grid: TargetGrid) -> xr.DataArray:
    """The CF grid-mapping variable every data variable points to."""
    attrs = grid.pyproj_crs.to_cf()
    if attrs.get("grid_mapping_name") == "polar_stereographic":
        # CF requires it (±90: which pole); pyproj leaves it out of the variant B projection
        pole = -90.0 if attrs.get("standard_parallel", -1.0) < 0 else 90.0
        attrs.setdefault("latitude_of_projection_origin", pole)
    attrs["spatial_ref"] = attrs["crs_wkt"]  # GDAL looks for either name
    attrs["coverage_content_type"] = "referenceInformation"
    attrs["GeoTransform"] = f"{grid.bbox[0]} {grid.resolution} 0 {grid.bbox[1]} 0 {grid.resolution}"
    return xr.DataArray(np.int32(0), attrs=attrs)


def add_grid_coords(dataset: xr.Dataset, grid: TargetGrid) -> xr.Dataset:
    """Attach CF attributes to x/y (and time, if there) and the `crs` grid mapping; point
    variables at it and give their value-typed attributes the stored type (`typed_attrs`)."""
    dataset = dataset.assign_coords(
        x=(
            "x",
            grid.x,
            {
                "standard_name": "projection_x_coordinate",
                "long_name": "x coordinate of projection",
                "units": "m",
                "axis": "X",
                "coverage_content_type": "coordinate",
            },
        ),
        y=(
            "y",
            grid.y,
            {
                "standard_name": "projection_y_coordinate",
                "long_name": "y coordinate of projection",
                "units": "m",
                "axis": "Y",
                "coverage_content_type": "coordinate",
            },
        ),
    )
    if "time" in dataset.coords:
        dataset["time"].attrs.update(TIME_ATTRS)
    dataset[GRID_MAPPING] = grid_mapping_variable(grid)
    gdal_crs = {"wkt": grid.pyproj_crs.to_wkt()}  # GDAL's Zarr driver reads `_CRS`, not CF
    for name in dataset.data_vars:
        if name != GRID_MAPPING:
            attrs = {**dataset[name].attrs, "grid_mapping": GRID_MAPPING, "_CRS": gdal_crs}
            dataset[name].attrs = typed_attrs(attrs)
    return dataset


def typed_attrs(attrs: dict, dtype: str = DATA_DTYPE) -> dict:
    """`attrs` with the `VALUE_TYPED_ATTRS` among them as `dtype` values (JSON numbers of
    that type's precision) and NCZarr type hints saying so (`_nczarr_attr`, kept with any
    hints already there); unchanged when it has none of them."""
    typed = {name: attrs[name] for name in VALUE_TYPED_ATTRS if name in attrs}
    if not typed:
        return dict(attrs)
    hints = dict(attrs.get(NCZARR_ATTR) or {})
    types = {**hints.get("types", {}), **dict.fromkeys(typed, np.dtype(dtype).str)}
    values = {name: np.asarray(value, dtype=dtype).tolist() for name, value in typed.items()}
    return {**attrs, **values, NCZARR_ATTR: {**hints, "types": types}}


def encoding_for(dataset: xr.Dataset, chunk_size: int) -> dict[str, dict]:
    """float32, NaN fill, chunks time=1 × chunk_size × chunk_size; time as int32 days."""
    encoding: dict[str, dict] = {}
    for name, variable in dataset.data_vars.items():
        if name == GRID_MAPPING:
            continue
        chunks = tuple(1 if dim == "time" else chunk_size for dim in variable.dims)
        encoding[name] = {
            "dtype": DATA_DTYPE,
            "chunks": chunks,
            "_FillValue": np.float32(np.nan),
            "compressors": [_COMPRESSOR],
        }
    if "time" in dataset.coords:  # int32: readers of CF before 1.9 know no int64
        encoding["time"] = {
            "units": "days since 1970-01-01",
            "calendar": "proleptic_gregorian",
            "dtype": "int32",
        }
    return encoding


def encoding_for_v3(
    dataset: xr.Dataset, chunk_size: int, shards: int | None = None
) -> dict[str, dict]:
    """`encoding_for` as zarr 3: the same float32, NaN fill, time and blosc (lz4, 7, byte
    shuffle: the same bytes per chunk); with `shards`, inner chunks 1 × `chunk_size` ×
    `chunk_size` in shards of `shards` × `shards` of them (`zarr3_shards`), else unsharded
    chunks (keys `c/i/j`)."""
    encoding = encoding_for(dataset, chunk_size)
    for name, entry in encoding.items():
        if name == "time":
            continue
        entry["compressors"] = [BloscCodec(**zarr3_shards._BLOSC)]
        if shards:
            entry["shards"] = (*entry["chunks"][:-2], *(c * shards for c in entry["chunks"][-2:]))
    return encoding


def rechunk_for_writing(dataset: xr.Dataset, chunk_size: int) -> xr.Dataset:
    chunks = {"y": chunk_size, "x": chunk_size}
    if "time" in dataset.dims:
        chunks["time"] = 1
    return dataset.chunk(chunks)


def levels_path(cube: Path) -> Path:
    """The `<stem>.levels` folder next to the cube `<stem>.zarr`."""
    cube = Path(cube)
    return cube.with_name(levels_name(cube.name))


def sibling_levels(cube: StoreLocation) -> StoreLocation:
    """`<stem>.levels` next to the cube `<stem>.zarr`, local or in a bucket."""
    parent, name = cube.root.rstrip("/").rsplit("/", 1)
    return StoreLocation(f"{parent}/{levels_name(name)}", cube.storage_options)


def write_zarr(
    dataset: xr.Dataset,
    cube: StoreLocation,
    levels: StoreLocation,
    chunk_size: int,
    cube_name: str | None = None,
    chunks: SplitTarget | None = None,
    shards: int | None = None,
    manifest: StoreLocation | None = None,
) -> dict[str, dict[str, list]]:
    """The writing pass, on the current dask scheduler (see `polar_cube.compute.dask_compute`):
    the cube at `cube` (zarr 2, consolidated, float32, NaN fill, empty chunks not stored) with
    each variable's statistics, and its overview levels at `levels`, whose `0.link` names
    `cube_name` (default: the cube's own name). Local folders or bucket prefixes: the dask
    workers write the chunks there themselves. The levels' `.zlevels` and then the cube's
    consolidated metadata are written last: they mark the two complete.

    With `chunks` the chunk objects go to `chunks.cube` and `chunks.levels` instead (a
    version's cube and levels, under the same keys), and `cube`/`levels` get only the
    metadata.

    With `shards`: zarr 3 instead, the cube's arrays in shards of `shards` × `shards` inner
    chunks (one dask block per shard, written by `zarr3_shards.write_shard`), the levels
    unsharded zarr 3 (tiles under `c/i/j`); consolidated into the root `zarr.json`.

    Returns the sha256 and size of every chunk object written, as they were written
    (`chunk_digests`); with `manifest` they are also stored there (JSON) before anything is
    marked complete."""
    zarr_format = 3 if shards else 2
    dataset = rechunk_for_writing(dataset, chunk_size * (shards or 1))
    layers = {
        name: dataset[name].data.astype("float32")
        for name, variable in dataset.data_vars.items()
        if name != GRID_MAPPING and variable.dims[-2:] == ("y", "x")
    }
    others = sorted(set(map(str, dataset.data_vars)) - set(layers) - {GRID_MAPPING})
    if others:  # only (…, y, x) layers are written block by block
        raise ValueError(f"{cube.root}: {', '.join(others)}: not a (y, x) or (time, y, x) layer")
    encoding = encoding_for_v3(dataset, chunk_size, shards) if shards else None
    cube_objects = _create_arrays(
        dataset,
        encoding or encoding_for(dataset, chunk_size),
        consolidated=False,
        zarr_format=zarr_format,
    )
    chunk_cube = chunks.cube if chunks else cube
    _make_array_folders(chunk_cube, layers)
    level_chunks = chunks.levels if chunks else levels
    with sending_in_background(chunk_cube) as sender:
        stats = {
            name: _store_blocks(
                data, chunk_cube.child(name), chunk_size, True, shards=shards, sender=sender
            )
            for name, data in layers.items()
        }
        level_writes, level_objects, record = _plan_levels(
            dataset, layers, chunk_size, level_chunks, zarr_format=zarr_format, sender=sender
        )
        # unoptimised: the graph has no linear chains worth fusing, and optimising it took
        # longer (on one thread, all workers idle) than the tasks it would save
        cube_results, level_results = dask.compute(stats, level_writes, optimize_graph=False)
    block_rows = {name: _stats_rows(results) for name, results in cube_results.items()}
    digests = {
        "cube": _chunk_digests(cube_results, with_stats=True),
        "levels": _chunk_digests(level_results, with_stats=False),
    }
    if manifest is not None:
        manifest.fs.pipe_file(manifest.path(), encode_digests(digests))
    completion = zarr3_shards.ZARR_JSON if zarr_format == 3 else ".zmetadata"
    for level, objects in level_objects.items():
        _put_metadata(levels.child(level), objects, last=completion)
    name = cube_name or cube.root.rstrip("/").rsplit("/", 1)[-1]
    levels.fs.pipe_file(levels.path(LINK), link_text(name).encode())
    levels.fs.pipe_file(levels.path(ZLEVELS), encode_record(record))
    _record_stats(cube_objects, dataset, block_rows, zarr_format=zarr_format)
    _put_metadata(cube, cube_objects, last=completion)
    return digests


def chunk_digest(data: bytes) -> list:
    """[sha256 hex digest, size] of a stored chunk object's bytes. sha256: hashlib's, which
    releases the GIL and hashes ~1-2 GB/s (an encoded chunk in well under a millisecond,
    next to its resampling and compression), the same digest the sources' provenance uses,
    and one no accidental (or deliberate) change goes unnoticed by."""
    return [hashlib.sha256(data).hexdigest(), len(data)]


def encode_digests(digests: dict[str, dict[str, list]]) -> bytes:
    """A source's chunk digests as stored next to its metadata (`keys.chunks_part_name`)."""
    record = {
        "algorithm": "sha256",
        **{part: dict(sorted(d.items())) for part, d in digests.items()},
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _stats_rows(results: np.ndarray) -> np.ndarray:
    """The statistics rows (block grid + fields) out of `_write_block`'s per-block results."""
    rows = np.empty((*results.shape, BLOCK_FIELDS), dtype="float64")
    for index in np.ndindex(results.shape):
        rows[index] = np.asarray(results[index]["stats"]).reshape(-1)
    return rows


def _chunk_digests(results: dict[str, np.ndarray], with_stats: bool) -> dict[str, list]:
    """{`<array>/<chunk key>`: [sha256, size]} of every chunk the blocks wrote."""
    found = {}
    for array, per_block in results.items():
        for index in np.ndindex(per_block.shape):
            written = per_block[index]["digests"] if with_stats else per_block[index]
            found.update({f"{array}/{key}": digest for key, digest in written.items()})
    return found


def _create_arrays(
    dataset: xr.Dataset,
    encoding: dict,
    consolidated: bool = True,
    zarr_format: int = 2,
) -> dict[str, Buffer]:
    """Metadata, coordinates and the grid mapping, rendered in memory: {key: bytes} of the
    objects a group of `dataset` starts with (the data arrays are filled block by block).
    Kept in memory until `_put_metadata` stores them, each once, with no probing requests."""
    objects: dict[str, Buffer] = {}
    with zarr3_consolidation():
        dataset.to_zarr(
            zarr.storage.MemoryStore(objects),
            mode="w",
            zarr_format=zarr_format,
            consolidated=consolidated,
            compute=False,
            encoding=encoding,
            write_empty_chunks=False,
        )
    return objects


def _put_metadata(where: StoreLocation, objects: dict[str, Buffer], last: str) -> None:
    """Store `objects` (from `_create_arrays`) at `where` (a new or cleared group, maybe
    holding its chunks already): all at once, concurrently, and then `last` (the marker
    that says the group is complete)."""
    first = {where.path(k): v.to_bytes() for k, v in objects.items() if k != last}
    where.fs.pipe(first)
    if last in objects:
        where.fs.pipe_file(where.path(last), objects[last].to_bytes())


@contextmanager
def zarr3_consolidation():
    """Quiet zarr's warning that consolidated metadata is not (yet) in the zarr 3 spec: the
    zarr 3 cubes consolidate it in the root `zarr.json` as zarr-python and xarray read it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        yield


def _store_blocks(
    data: da.Array,
    array: StoreLocation,
    chunk_size: int,
    with_stats: bool,
    *,
    shards: int | None = None,
    zarr_format: int = 2,
    sender: str | None = None,
) -> da.Array:
    """One task per block that writes it as the chunk of the zarr array at `array` (chunks
    1 × `chunk_size` × `chunk_size`, or without time) and returns, per block, its statistics
    and the digests of the chunk objects it wrote (`_write_block`), or the digests alone.
    Each block covers whole chunks (edge blocks may end short).

    With `shards` each block is one zarr 3 shard of `shards` × `shards` chunks (edge blocks
    may end short); with `zarr_format` 3 the chunks are zarr 3's (keys `c/i/j`)."""
    block_grid = tuple((1,) * len(chunks) for chunks in data.chunks)
    chunk_shape = (1,) * (data.ndim - 2) + (chunk_size, chunk_size)
    extra = {}
    if shards:
        shard = (1,) * (data.ndim - 2) + (chunk_size * shards, chunk_size * shards)
        extra = {"shard_shape": shard}
    elif zarr_format != 2:
        extra = {"zarr_format": zarr_format}
    # per block: (its statistics, the digests of its chunks), or the digests alone
    out = {"chunks": block_grid, "dtype": object, "meta": np.empty((0,) * data.ndim, object)}
    return da.map_blocks(
        _write_block,
        data,
        array=array,
        chunk_shape=chunk_shape,
        with_stats=with_stats,
        sender=sender,
        token="write-block-and-stats" if with_stats else "write-level-block",
        **extra,
        **out,
    )


def _write_block(
    block: np.ndarray,
    array: StoreLocation,
    chunk_shape: tuple,
    with_stats: bool,
    block_info=None,
    shard_shape: tuple | None = None,
    zarr_format: int = 2,
    sender: str | None = None,
) -> np.ndarray:
    """Store `block` as the chunk(s) of the array at `array` it covers (a level's block may
    span several tiles, starting on a tile edge), or as the zarr 3 shard it is (with
    `shard_shape`); return an object array of the block grid's shape (1, …) holding
    {"stats": its statistics, "digests": {chunk key: [sha256, size]} of the objects written
    (`chunk_digest`)}, or those digests alone."""
    start = [first for first, _ in block_info[0]["array-location"]]
    stats = block_stats(block) if with_stats else None
    digests: dict[str, list] = {}
    result = np.empty((1,) * block.ndim, dtype=object)
    # a dict, never a tuple: numpy and dask would take a sequence apart
    result[(0,) * block.ndim] = {"stats": stats, "digests": digests} if with_stats else digests
    value = constant_value(block)  # a block of one value (`polar_cube.blank`), or None
    if (value is not None and np.isnan(value)) or (stats is not None and not stats[..., 0].item()):
        return result  # like zarr's write_empty_chunks=False: no all-NaN chunk
    if shard_shape is not None:
        index = tuple(s // c for s, c in zip(start, shard_shape, strict=True))
        encoded = zarr3_shards.write_shard(
            array, index, block, inner_chunk_shape=chunk_shape, shard_shape=shard_shape
        )
        if encoded is not None:
            digests[zarr3_shards.shard_key(index)] = chunk_digest(encoded)
        return result
    steps = [range(0, size, chunk) for size, chunk in zip(block.shape, chunk_shape, strict=True)]
    for offset in itertools.product(*steps):
        part = block[tuple(slice(o, o + c) for o, c in zip(offset, chunk_shape, strict=True))]
        if stats is None and value is None and np.isnan(part).all():
            continue
        index = tuple((s + o) // c for s, o, c in zip(start, offset, chunk_shape, strict=True))
        key, digest = write_chunk(
            array, index, part, chunk_shape, zarr_format=zarr_format, sender=sender
        )
        digests[key] = digest
    return result


def write_chunk(
    array: StoreLocation | Path,
    index: tuple[int, ...],
    block: np.ndarray,
    chunk_shape,
    zarr_format: int = 2,
    sender: str | None = None,
) -> tuple[str, list]:
    """Store `block` as chunk `index` of the float32 zarr 2 array at `array` (created with
    `encoding_for`): padded to the chunk shape with the NaN fill, encoded with the cube's
    codec, in the file or object `i.j` (or `t.i.j`). Encoding it here, not through zarr,
    skips zarr's all-fill scan and its event loop: the block is already known to hold data.
    `zarr_format` 3: an unsharded zarr 3 chunk (the same bytes) in the object `c/i/j`.
    `sender`: the key `sending_in_background` gave the writing pass: into a bucket, this
    process's `ChunkSender` sends the chunk. Returns the chunk's key in the array and its
    `chunk_digest`."""
    block = np.asarray(block, dtype="float32")
    if block.shape != tuple(chunk_shape):
        padded = np.full(chunk_shape, np.nan, dtype="float32")
        padded[tuple(slice(0, size) for size in block.shape)] = block
        block = padded
    if zarr_format == 3:
        encoded = zarr3_shards._INNER_CODEC.encode(
            np.ascontiguousarray(block, dtype="<f4").view("u1").reshape(-1)
        )
        array = array if isinstance(array, StoreLocation) else StoreLocation.local(array)
        key = zarr3_shards.shard_key(index)
        array.fs.pipe_file(array.path(key), encoded)
        return key, chunk_digest(encoded)
    value = constant_value(block)
    if value is None:
        encoded = _COMPRESSOR.encode(np.ascontiguousarray(block))
    else:  # e.g. a background-only chunk of a polygon layer: encoded once
        encoded = _constant_chunk(np.float32(value).tobytes(), block.shape)
    key = ".".join(str(i) for i in index)
    digest = chunk_digest(encoded)
    if isinstance(array, Path) or array.is_local:
        # into the folder `_make_array_folders` made: a chunk still being written when a
        # failed pass removes its temporary folder fails, instead of making it again
        (Path(array.root if isinstance(array, StoreLocation) else array) / key).write_bytes(encoded)
    elif (chunk_sender := _SENDERS.get(sender)) is not None and chunk_sender.fs is array.fs:
        chunk_sender.put(array.path(key), encoded, digest[0])
    else:
        array.fs.pipe_file(array.path(key), encoded, **checked_put(array.fs, digest[0]))
    return key, digest


def checked_put(fs, sha256_hex: str) -> dict:
    """PUT arguments that make an S3 server check the body against the chunk's digest (the
    one the manifest records) and keep it as the object's checksum: `x-amz-checksum-sha256`
    (botocore then computes no CRC32 of its own). Nothing for other filesystems, nor when
    the client is configured to send checksums only where required (a server without them)."""
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return {}
    if (getattr(fs, "config_kwargs", None) or {}).get("request_checksum_calculation") == (
        "when_required"
    ):
        return {}
    return {"ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")}


@functools.lru_cache(maxsize=8)
def _constant_chunk(value: bytes, shape: tuple[int, ...]) -> bytes:
    """The encoded chunk of `shape` holding the float32 `value` (its bytes) everywhere."""
    return _COMPRESSOR.encode(np.full(shape, np.frombuffer(value, dtype="float32")[0]))


class ChunkSender:
    """PUTs encoded chunks on the filesystem's own event loop, `FILES_IN_FLIGHT` at a time,
    while the dask threads that handed them over go on computing: compute and upload
    overlap. `put` waits while `FILES_IN_FLIGHT` chunks are queued (bounded memory), and
    raises once a chunk could not be stored (the write stops, as a failed PUT stops it
    without the sender); `wait` returns once every chunk is stored, or raises the first
    failure."""

    def __init__(self, fs) -> None:
        self.fs = fs
        self._room = threading.BoundedSemaphore(FILES_IN_FLIGHT)
        self._sending: asyncio.Semaphore | None = None
        self._futures: list = []
        self._lock = threading.Lock()
        self._failure: BaseException | None = None

    def put(self, path: str, data: bytes, sha256_hex: str) -> None:
        if self._failure is not None:
            raise self._failure
        self._room.acquire()
        put = checked_put(self.fs, sha256_hex)
        future = asyncio.run_coroutine_threadsafe(self._send(path, data, put), self.fs.loop)
        with self._lock:
            self._futures.append(future)

    async def _send(self, path: str, data: bytes, put: dict) -> None:
        if self._sending is None:  # made on the loop that uses it
            self._sending = asyncio.Semaphore(FILES_IN_FLIGHT)
        try:
            if self._failure is not None:
                return  # the write failed: the rest is not sent
            async with self._sending:
                await self.fs._pipe_file(path, data, **put)
        except BaseException as error:
            if self._failure is None:
                self._failure = error
            raise
        finally:
            self._room.release()

    def wait(self) -> None:
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            with suppress(Exception):
                future.result()
        if self._failure is not None:
            raise self._failure


_SENDERS: dict[str, ChunkSender] = {}  # by writing pass, while its threads write into a bucket


@contextmanager
def sending_in_background(chunks: StoreLocation) -> Iterator[str | None]:
    """Yield the key of a `ChunkSender` (in `_SENDERS`) through which the chunks this
    process's threads write into a bucket are sent in the background (`write_chunk`'s
    `sender`); on leaving, every one is stored (or the first failure raised) before anything
    is marked complete. Each writing pass has its own: passes running side by side wait for
    and fail on their own chunks only. Local folders, and dask.distributed workers (other
    processes, which send their own), get None and write as before."""
    threads = isinstance(dask.config.get("scheduler", None), str | None)
    if chunks.is_local or not threads:
        yield None
        return
    key = uuid.uuid4().hex
    _SENDERS[key] = sender = ChunkSender(chunks.fs)
    try:
        yield key
    except BaseException:
        with suppress(Exception):  # the write failed already: wait, report that failure
            sender.wait()
        raise
    finally:
        _SENDERS.pop(key, None)
    sender.wait()


def _plan_levels(
    dataset: xr.Dataset,
    layers: dict[str, da.Array],
    chunk_size: int,
    level_chunks: StoreLocation,
    zarr_format: int = 2,
    sender: str | None = None,
) -> tuple[dict[str, da.Array], dict[str, dict[str, Buffer]], dict]:
    """The tasks that fill levels 1… (their chunks under `level_chunks`), each level halved
    from the blocks of the one above (level 1 from the cube's blocks), by
    `<k>.zarr/<variable>`; each level's metadata (`_create_arrays`) by `<k>.zarr`; and the
    `.zlevels` record. `zarr_format` 3: unsharded zarr 3 levels."""
    methods = {name: agg_method(dataset[name].attrs) for name in layers}
    count = level_count((dataset.sizes["y"], dataset.sizes["x"]))
    tile = level_chunk_size(chunk_size)
    writes, metadata, current = {}, {}, dict(layers)
    for level in range(1, count):
        current = {name: _halved(data, methods[name], tile) for name, data in current.items()}
        level_dataset = _level_dataset(dataset, current, level)
        if zarr_format == 3:
            encoding = encoding_for_v3(level_dataset, tile)
        else:
            encoding = encoding_for(level_dataset, tile)
        metadata[level_name(level)] = _create_arrays(
            level_dataset, encoding, zarr_format=zarr_format
        )
        chunks_at = level_chunks.child(level_name(level))
        _make_array_folders(chunks_at, current)
        for name, data in current.items():
            writes[f"{level_name(level)}/{name}"] = _store_blocks(
                data, chunks_at.child(name), tile, False, zarr_format=zarr_format, sender=sender
            )
    fingerprint = dataset.attrs.get(FINGERPRINT_ATTR)
    return writes, metadata, levels_record(count, methods, fingerprint)


def _make_array_folders(group: StoreLocation, names) -> None:
    """A local group's array folders, before its chunks (its metadata comes after them)."""
    if group.is_local:
        for name in names:
            Path(group.root, name).mkdir(parents=True, exist_ok=True)


def _halved(data: da.Array, method: str, tile: int) -> da.Array:
    """The next level of `data` (y, x last), block by block: blocks of whole `tile` × `tile`
    tiles (edge blocks may end short), rechunked to single tiles only when smaller."""
    y_axis, x_axis = data.ndim - 2, data.ndim - 1
    if any(size % 2 for axis in (y_axis, x_axis) for size in data.chunks[axis][:-1]):
        data = data.rechunk({y_axis: tile, x_axis: tile})  # windows must not straddle blocks
    chunks = (
        *data.chunks[:-2],
        tuple(math.ceil(size / 2) for size in data.chunks[y_axis]),
        tuple(math.ceil(size / 2) for size in data.chunks[x_axis]),
    )
    halved = data.map_blocks(halve, method=method, chunks=chunks, dtype="float32", token="halve")
    if all(size % tile == 0 for axis in (y_axis, x_axis) for size in chunks[axis][:-1]):
        return halved  # whole tiles per block: each is written by the block's task
    return halved.rechunk({y_axis: tile, x_axis: tile})


def _level_dataset(dataset: xr.Dataset, arrays: dict[str, da.Array], level: int) -> xr.Dataset:
    """Level `level` of `dataset` (variables without their statistics)."""
    crs = dataset[GRID_MAPPING] if GRID_MAPPING in dataset.variables else None
    level_dataset = level_coords(dataset["x"], dataset["y"], crs, level)
    if "time" in dataset.coords:
        level_dataset = level_dataset.assign_coords(time=dataset["time"])
    for name, data in arrays.items():
        attrs = {k: v for k, v in dataset[name].attrs.items() if k != STATS_ATTR}
        level_dataset[name] = xr.Variable(dataset[name].dims, data, attrs)
    level_dataset.attrs = dict(dataset.attrs)
    return level_dataset


def _record_stats(
    objects: dict[str, Buffer],
    dataset: xr.Dataset,
    block_rows: dict[str, np.ndarray],
    zarr_format: int = 2,
) -> None:
    """Each variable's statistics as its `polar_cube_stats` attribute, in the group's
    metadata held in memory (`_create_arrays`); then consolidate it there."""
    store = zarr.storage.MemoryStore(objects)
    group = zarr.open_group(store, mode="r+", zarr_format=zarr_format)
    for name, rows in block_rows.items():
        cells = dataset.sizes["y"] * dataset.sizes["x"]
        records = combine_block_stats(rows, time_labels(dataset[name]), cells)
        group[name].attrs.update({STATS_ATTR: records})
    with zarr3_consolidation():
        zarr.consolidate_metadata(store, zarr_format=zarr_format)


def write_zarr_atomically(dataset: xr.Dataset, target: Path, chunk_size: int) -> Path:
    """Write `dataset` and its levels into hidden temporary folders, then swap them in.

    Whoever opens `target` sees the old complete cube or the new complete cube, never a
    partial one; a crash leaves only `.tmp-*` folders, removed by the next write. The levels
    are swapped in first: a cube carrying the new fingerprint always has its levels.
    """
    target = Path(target)
    levels = levels_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    remove_stale_temporaries(levels)
    tag = uuid.uuid4().hex[:8]
    temporary = target.with_name(f".{target.name}.tmp-{tag}")
    temporary_levels = levels.with_name(f".{levels.name}.tmp-{tag}")
    try:
        write_zarr(
            dataset,
            StoreLocation.local(temporary),
            StoreLocation.local(temporary_levels),
            chunk_size,
            cube_name=target.name,
        )
        replace_directory(temporary_levels, levels)
        replace_directory(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(temporary_levels, ignore_errors=True)
    return target


@dataclass(frozen=True)
class SplitTarget:
    """Where the chunk objects of a per-dataset cube go when its metadata is kept apart:
    a cube version (`cube`) and its overview levels (`levels`), shared by every source."""

    cube: StoreLocation
    levels: StoreLocation


def write_zarr_split(
    dataset: xr.Dataset,
    metadata: StoreLocation,
    chunks: SplitTarget,
    chunk_size: int,
    shards: int | None = None,
) -> StoreLocation:
    """Write `dataset`'s chunks (and its levels' chunks) straight into a cube version and
    its metadata at `metadata` (a `<id>.zarr` prefix, its levels next to it): the dataset's
    metadata markers go first, then its variables' old chunks (an interrupted or outdated
    write), then everything is written, markers last. Other sources' variables in the same
    version are never touched. `shards`: zarr 3 (see `write_zarr`). The digests of the
    chunks written go to `<id>.chunks.json` (`chunks_part`) before the markers."""
    levels = sibling_levels(metadata)
    manifest = chunks_part(metadata)
    completion = metadata.child(zarr3_shards.ZARR_JSON if shards else ".zmetadata")
    for marker in (completion, levels.child(ZLEVELS), manifest):
        if marker.exists():
            marker.fs.rm_file(marker.path())
    old = [metadata, levels]
    names = [str(n) for n, v in dataset.data_vars.items() if v.dims[-2:] == ("y", "x")]
    for name in names:
        old.append(chunks.cube.child(name))
        old += [chunks.levels.child(level_name(k), name) for k in range(1, _level_count(dataset))]
    for where in old:
        if where.exists():
            where.fs.rm(where.path(), recursive=True)
    write_zarr(
        dataset, metadata, levels, chunk_size, chunks=chunks, shards=shards, manifest=manifest
    )
    return metadata


def chunks_part(metadata: StoreLocation) -> StoreLocation:
    """`<id>.chunks.json` next to a per-dataset cube's metadata `<id>.zarr`: the digests of
    the chunks its build wrote (`keys.chunks_part_name`)."""
    parent, name = metadata.root.rstrip("/").rsplit("/", 1)
    return StoreLocation(f"{parent}/{chunks_part_name(name)}", metadata.storage_options)


def _level_count(dataset: xr.Dataset) -> int:
    return level_count((dataset.sizes["y"], dataset.sizes["x"]))


def replace_directory(new: Path, target: Path) -> None:
    """Swap `new` in at `target` by renames; the old version is removed afterwards."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(target: Path) -> None:
    """Clear what an interrupted write left; restore the old cube if the swap was cut short."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.rename(target)


def stored_fingerprint(target: Path | StoreLocation) -> str | None:
    """The inputs fingerprint a complete cube at `target` was built from, if any (a zarr 3
    one, named so (`spec.zarr_layout`): from its root `zarr.json`'s consolidated metadata)."""
    root = target.root if isinstance(target, StoreLocation) else str(target)
    if zarr_layout(root)[0] == 3:
        return stored_attrs_v3(_read_if_there(target, zarr3_shards.ZARR_JSON)).get(FINGERPRINT_ATTR)
    return stored_attrs(_read_if_there(target, ".zmetadata")).get(FINGERPRINT_ATTR)


def stored_levels_fingerprint(levels: Path | StoreLocation) -> str | None:
    """The inputs fingerprint of complete levels at `levels` (their `.zlevels`), if any."""
    return read_record(_read_if_there(levels, ZLEVELS)).get(FINGERPRINT_KEY)


def _read_if_there(where: Path | StoreLocation, name: str) -> bytes | None:
    if isinstance(where, Path):
        where = StoreLocation.local(where)
    try:
        return where.fs.cat_file(where.path(name))
    except FileNotFoundError:
        return None


def stored_attrs(zmetadata: Path | bytes | None) -> dict:
    """Global attributes from consolidated metadata (a file, its bytes, or None: {})."""
    if isinstance(zmetadata, Path):
        zmetadata = zmetadata.read_bytes() if zmetadata.is_file() else None
    if not zmetadata:
        return {}
    return json.loads(zmetadata)["metadata"].get(".zattrs", {})


def stored_attrs_v3(zarr_json: bytes | None) -> dict:
    """Global attributes from a zarr 3 group's `zarr.json` (its bytes, or None: {}) when it
    holds consolidated metadata (what marks a complete cube), else {}."""
    if not zarr_json:
        return {}
    document = json.loads(zarr_json)
    if not document.get("consolidated_metadata"):
        return {}
    return document.get("attributes", {})
