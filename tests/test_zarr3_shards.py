"""Zarr 3 shards written by our own encoder: read back by zarr and xarray, and the very
objects zarr writes for the same data (issue 20's groundwork)."""

import itertools
import json
import math

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from numcodecs import Blosc
from numcodecs.checksum32 import CRC32C
from zarr.codecs import BloscCodec

from polar_cube.location import StoreLocation
from polar_cube.zarr3_shards import (
    EMPTY,
    ZARR_JSON,
    array_metadata,
    encode_shard,
    shard_key,
    shard_layout,
    write_shard,
)

NAME = "layer"
ATTRS = {"units": "m", "long_name": "ice thickness", "grid_mapping": "crs"}


def _field(shape, seed=0):
    """Random float32 values with scattered NaN cells (no inner chunk all NaN by chance)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype("float32")
    data[rng.random(shape) < 0.1] = np.nan
    return data


def _exact():
    return _field((16, 24)), ("y", "x"), 4, 2


def _edge():
    return _field((19, 13)), ("y", "x"), 4, 3


def _time_edge():
    return _field((2, 21, 10), seed=1), ("time", "y", "x"), 4, 2


def _nan_chunks():
    """Shards with some all-NaN inner chunks, one all-NaN shard, one only NaN past its
    last data row."""
    data = _field((2, 24, 24), seed=2)
    data[0, :4, :8] = np.nan  # inner chunks (0, 0) and (0, 1) of shard (0, 0, 0)
    data[0, 8:16, 16:] = np.nan  # shard (0, 1, 2): all NaN, not stored
    data[1, 12:, :4] = np.nan  # inner chunks 3…5 of column 0: in shards (1, 1, 0), (1, 2, 0)
    return data, ("time", "y", "x"), 4, 2


def _all_nan():
    return np.full((1, 9, 9), np.nan, dtype="float32"), ("time", "y", "x"), 4, 2


CASES = {
    "exact": _exact,
    "edge": _edge,
    "time-edge": _time_edge,
    "nan-chunks": _nan_chunks,
    "all-nan": _all_nan,
}


def _layout(data, dims, chunk_size, shards):
    """(inner chunk shape, shard shape, shard grid) of the cube layout."""
    inner = (1,) * (data.ndim - 2) + (chunk_size, chunk_size)
    shard = inner[:-2] + (chunk_size * shards, chunk_size * shards)
    grid = tuple(math.ceil(size / s) for size, s in zip(data.shape, shard, strict=True))
    return inner, shard, grid


def _regions(shape, grid, step):
    """{index: slices} of each cell of `grid` with cells of `step` over `shape`."""
    return {
        index: tuple(
            slice(i * s, min((i + 1) * s, size))
            for i, s, size in zip(index, step, shape, strict=True)
        )
        for index in itertools.product(*(range(n) for n in grid))
    }


def _write_ours(folder, data, dims, chunk_size, shards):
    """The array `NAME` in `folder`: our zarr.json, then shard by shard as dask blocks."""
    inner, shard, grid = _layout(data, dims, chunk_size, shards)
    array = StoreLocation.local(folder).child(NAME)
    metadata = array_metadata(data.shape, chunk_size, shards, dims, ATTRS)
    array.fs.pipe_file(array.path(ZARR_JSON), json.dumps(metadata, indent=2).encode())

    def store(block, block_info=None):
        index = tuple(block_info[0]["chunk-location"])
        write_shard(array, index, block, inner_chunk_shape=inner, shard_shape=shard)
        return np.zeros((1,) * block.ndim, dtype="int8")

    blocks = da.from_array(data, chunks=shard)  # one dask block per shard
    written = blocks.map_blocks(store, chunks=tuple((1,) * n for n in grid), dtype="int8")
    with dask.config.set(scheduler="threads"):
        written.compute()
    return array


def _write_group(folder, data, dims):
    """The group with x, y (and time) coordinates, for xarray."""
    coords = {
        dim: np.arange(size, dtype="float64") for dim, size in zip(dims, data.shape, strict=True)
    }
    xr.Dataset(coords=coords).to_zarr(folder, mode="w", zarr_format=3, consolidated=False)


def _objects(array_folder):
    return {
        str(path.relative_to(array_folder)): path.read_bytes()
        for path in sorted((array_folder / "c").rglob("*"))
        if path.is_file()
    }


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
@pytest.mark.parametrize("case", CASES)
def test_zarr_and_xarray_read_the_shards_we_write(tmp_path, case):
    data, dims, chunk_size, shards = CASES[case]()
    folder = tmp_path / "cube.zarr"
    _write_group(folder, data, dims)
    _write_ours(folder, data, dims, chunk_size, shards)
    zarr.consolidate_metadata(str(folder), zarr_format=3)

    array = zarr.open_array(str(folder / NAME), mode="r")
    assert array.metadata.zarr_format == 3 and array.dtype == np.float32
    np.testing.assert_array_equal(array[...], data)
    for consolidated in (True, False):  # zarr 3 has no consolidated metadata yet: both
        opened = xr.open_zarr(folder, zarr_format=3, consolidated=consolidated)
        assert opened[NAME].dims == dims
        assert opened[NAME].attrs["units"] == "m"
        np.testing.assert_array_equal(opened[NAME].values, data)


@pytest.mark.parametrize("case", CASES)
def test_our_shards_are_the_objects_zarr_writes(tmp_path, case):
    data, dims, chunk_size, shards = CASES[case]()
    inner, shard, grid = _layout(data, dims, chunk_size, shards)
    ours = tmp_path / "ours"
    _write_ours(ours, data, dims, chunk_size, shards)
    theirs = zarr.create_array(
        store=str(tmp_path / "theirs" / NAME),
        shape=data.shape,
        dtype="float32",
        chunks=inner,
        shards=shard,
        compressors=BloscCodec(cname="lz4", clevel=7, shuffle="shuffle", typesize=4),
        fill_value=np.nan,
        dimension_names=dims,
        attributes=ATTRS,
        zarr_format=3,
    )
    theirs[...] = data

    metadata = json.loads((ours / NAME / ZARR_JSON).read_text())
    assert metadata == json.loads((tmp_path / "theirs" / NAME / ZARR_JSON).read_text())
    np.testing.assert_array_equal(zarr.open_array(str(ours / NAME))[...], theirs[...])
    objects = _objects(ours / NAME)
    assert objects == _objects(tmp_path / "theirs" / NAME)  # same keys, same bytes

    # one object per shard holding data, instead of one per inner chunk holding data
    with_data = {
        shard_key(index)
        for index, where in _regions(data.shape, grid, shard).items()
        if not np.isnan(data[where]).all()
    }
    chunk_grid = tuple(math.ceil(n / c) for n, c in zip(data.shape, inner, strict=True))
    chunks = _regions(data.shape, chunk_grid, inner)
    chunk_count = sum(not np.isnan(data[where]).all() for where in chunks.values())
    assert set(objects) == with_data
    assert sum(_stored_chunks(shard_bytes, inner, shard) for shard_bytes in objects.values()) == (
        chunk_count
    )
    assert len(objects) < chunk_count or chunk_count == 0
    expected = {"exact": (6, 24), "edge": (4, 20), "time-edge": (12, 36)}
    expected |= {"nan-chunks": (17, 63), "all-nan": (0, 0)}
    assert (len(objects), chunk_count) == expected[case]


def _stored_chunks(shard_bytes, inner, shard):
    """The inner chunks a shard's index points to."""
    per_shard = math.prod(s // c for s, c in zip(shard, inner, strict=True))
    index = np.frombuffer(shard_bytes[-4 - 16 * per_shard : -4], "<u8").reshape(-1, 2)
    return int((index[:, 0] != EMPTY).sum())


def test_the_shard_bytes_follow_the_sharding_spec():
    """Inner chunks one after the other, then the (offset, nbytes) uint64 pairs in C order,
    2^64 - 1 for an empty inner chunk, then the index's little-endian CRC32C."""
    block = _field((1, 7, 8))  # a shard cut at the edge: 1 × 2 × 2 inner chunks of 1 × 4 × 4
    block[0, :4, 4:] = np.nan  # inner chunk (0, 0, 1): empty; (0, 1, *) pad rows 7..8 with NaN
    encoded = encode_shard(block, (1, 4, 4), (1, 8, 8))
    index_bytes, checksum = encoded[-4 - 4 * 16 : -4], encoded[-4:]
    assert CRC32C(location="end").encode(np.frombuffer(index_bytes, "u1")).tobytes()[-4:] == (
        checksum
    )
    index = np.frombuffer(index_bytes, "<u8").reshape(1, 2, 2, 2)
    assert tuple(index[0, 0, 1]) == (EMPTY, EMPTY)
    padded = np.full((1, 8, 8), np.nan, dtype="float32")
    padded[:, :7, :] = block
    codec = Blosc(cname="lz4", clevel=7, shuffle=Blosc.SHUFFLE, typesize=4)
    spans = []
    for y, x in [(0, 0), (1, 0), (1, 1)]:
        offset, nbytes = (int(v) for v in index[0, y, x])
        spans.append((offset, nbytes))
        chunk = np.frombuffer(codec.decode(encoded[offset : offset + nbytes]), "<f4")
        expected = padded[0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4]
        np.testing.assert_array_equal(chunk.reshape(4, 4), expected)
    assert sorted(spans)[0][0] == 0
    assert sum(nbytes for _, nbytes in spans) == len(encoded) - 4 - 4 * 16  # no gaps


def test_an_all_nan_shard_is_not_encoded_nor_stored(tmp_path):
    block = np.full((1, 8, 5), np.nan, dtype="float32")
    assert encode_shard(block, (1, 4, 4), (1, 8, 8)) is None
    array = StoreLocation.local(tmp_path / NAME)
    write_shard(array, (0, 0, 0), block, inner_chunk_shape=(1, 4, 4), shard_shape=(1, 8, 8))
    assert not (tmp_path / NAME).exists()


def test_array_metadata_is_the_sharded_cube_layout():
    metadata = array_metadata((3, 5000, 7000), 2048, 4, ("time", "y", "x"), ATTRS)
    assert metadata["zarr_format"] == 3 and metadata["node_type"] == "array"
    assert metadata["data_type"] == "float32" and metadata["fill_value"] == "NaN"
    assert metadata["chunk_grid"]["configuration"]["chunk_shape"] == [1, 8192, 8192]
    assert metadata["chunk_key_encoding"] == {
        "name": "default",
        "configuration": {"separator": "/"},
    }
    (codec,) = metadata["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"] == {
        "chunk_shape": [1, 2048, 2048],
        "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {
                "name": "blosc",
                "configuration": {
                    "typesize": 4,
                    "cname": "lz4",
                    "clevel": 7,
                    "shuffle": "shuffle",
                    "blocksize": 0,
                },
            },
        ],
        "index_codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "crc32c"},
        ],
        "index_location": "end",
    }
    assert metadata["dimension_names"] == ["time", "y", "x"] and metadata["attributes"] == ATTRS
    assert shard_layout(metadata) == ((1, 2048, 2048), (1, 8192, 8192))
    flat = array_metadata((100, 100), 16, 2, ("y", "x"), {})
    assert shard_layout(flat) == ((16, 16), (32, 32))


def test_write_shard_reads_the_layout_from_zarr_json(tmp_path):
    data = _field((10, 11))
    array = StoreLocation.local(tmp_path / NAME)
    metadata = array_metadata(data.shape, 4, 2, ("y", "x"), {})
    array.fs.pipe_file(array.path(ZARR_JSON), json.dumps(metadata).encode())
    for index, where in _regions(data.shape, (2, 2), (8, 8)).items():
        write_shard(array, index, data[where])
    assert sorted(_objects(tmp_path / NAME)) == ["c/0/0", "c/0/1", "c/1/0", "c/1/1"]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / NAME))[...], data)


def test_a_block_larger_than_its_shard_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        encode_shard(np.zeros((9, 8), dtype="float32"), (4, 4), (8, 8))
