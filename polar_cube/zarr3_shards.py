"""Writing zarr format 3 arrays in shards ourselves (groundwork for `--zarr-format 3`).

A shard is one stored object holding `shards` × `shards` inner chunks of the cube's chunk
size, encoded per the zarr v3 `sharding_indexed` codec: each non-empty inner chunk as
little-endian float32 bytes compressed with the cube's blosc (lz4, level 7, byte shuffle,
typesize 4), one after the other in Morton order (as zarr-python 3 writes them), then the
index: an (offset, nbytes) pair of little-endian uint64 per inner chunk in C order
(2^64 - 1 twice for an all-NaN chunk, which is not stored) followed by its CRC32C.

As `polar_cube.zarr_store.write_chunk` does for zarr 2 chunks, `write_shard` encodes the
block it is given and stores it in one PUT, without zarr's event loop or its read of an
existing shard: the block covers the whole shard (cut at the array's edge).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import zarr
from numcodecs import Blosc
from numcodecs.checksum32 import CRC32C
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from polar_cube.location import StoreLocation

DATA_DTYPE = "float32"
ZARR_JSON = "zarr.json"
# both numbers of an empty inner chunk's index entry (the spec's 2^64 - 1)
EMPTY = 2**64 - 1
# zarr's BloscCodec hands numcodecs' Blosc the chunk's bytes with this configuration
# (zarr/codecs/blosc.py `_blosc_codec`): the same bytes as the zarr 2 cube's compressor
_BLOSC = {"cname": "lz4", "clevel": 7, "shuffle": "shuffle", "typesize": 4, "blocksize": 0}
_INNER_CODEC = Blosc(cname="lz4", clevel=7, shuffle=Blosc.SHUFFLE, blocksize=0, typesize=4)
_INDEX_CHECKSUM = CRC32C(location="end")  # 4 bytes, little-endian, after the index


def array_metadata(
    shape: tuple[int, ...],
    chunk_size: int,
    shards: int,
    dims: tuple[str, ...],
    attrs: dict,
    fill_value: float = math.nan,
) -> dict:
    """The `zarr.json` of a float32 zarr 3 array of `shape` (…, y, x) as zarr writes it:
    inner chunks 1 × … × `chunk_size` × `chunk_size`, shards of `shards` × `shards` of them
    (the chunk grid), the cube's blosc, `dims` as dimension names, `attrs` as attributes."""
    shape = tuple(int(size) for size in shape)
    if len(dims) != len(shape) or len(shape) < 2:
        raise ValueError(f"shape {shape} and dimension names {tuple(dims)} do not match")
    inner = (1,) * (len(shape) - 2) + (chunk_size, chunk_size)
    shard = inner[:-2] + (chunk_size * shards, chunk_size * shards)
    store: dict = {}
    zarr.create_array(
        store=MemoryStore(store),
        shape=shape,
        dtype=DATA_DTYPE,
        chunks=inner,
        shards=shard,
        compressors=BloscCodec(**_BLOSC),
        fill_value=fill_value,
        dimension_names=tuple(dims),
        attributes=dict(attrs),
        zarr_format=3,
    )
    return json.loads(store[ZARR_JSON].to_bytes())


def encode_shard(
    block: np.ndarray, inner_chunk_shape: tuple[int, ...], shard_shape: tuple[int, ...]
) -> bytes | None:
    """The bytes of the shard holding `block` (its first cells: the shard may be cut at the
    array's edge, the rest is NaN fill), or None when every inner chunk is all NaN."""
    block = np.asarray(block, dtype="<f4")
    inner, shard = tuple(inner_chunk_shape), tuple(shard_shape)
    if not (block.ndim == len(inner) == len(shard)):
        raise ValueError(f"block {block.shape}, inner chunks {inner}, shard {shard}: not one rank")
    if any(s % c for s, c in zip(shard, inner, strict=True)):
        raise ValueError(f"inner chunks {inner} do not divide the shard {shard}")
    if any(b > s for b, s in zip(block.shape, shard, strict=True)):
        raise ValueError(f"block {block.shape} exceeds the shard {shard}")
    counts = tuple(s // c for s, c in zip(shard, inner, strict=True))
    index = np.full((*counts, 2), EMPTY, dtype="<u8")
    parts, offset = [], 0
    for coords in _morton_order(counts):
        starts = [i * c for i, c in zip(coords, inner, strict=True)]
        if any(start >= size for start, size in zip(starts, block.shape, strict=True)):
            continue  # past the array's edge: fill
        part = block[tuple(slice(s, s + c) for s, c in zip(starts, inner, strict=True))]
        if np.isnan(part).all():
            continue
        if part.shape != inner:
            padded = np.full(inner, np.nan, dtype="<f4")
            padded[tuple(slice(0, size) for size in part.shape)] = part
            part = padded
        encoded = _INNER_CODEC.encode(np.ascontiguousarray(part).view("u1").reshape(-1))
        index[coords] = (offset, len(encoded))
        parts.append(encoded)
        offset += len(encoded)
    if not parts:
        return None
    parts.append(_INDEX_CHECKSUM.encode(index.view("u1").reshape(-1)).tobytes())
    return b"".join(parts)


def write_shard(
    array: StoreLocation,
    index: tuple[int, ...],
    block: np.ndarray,
    *,
    inner_chunk_shape: tuple[int, ...] | None = None,
    shard_shape: tuple[int, ...] | None = None,
) -> bytes | None:
    """Store `block` as shard `index` of the zarr 3 array at `array`, in the object
    `c/<i>/<j>…` (zarr 3's default chunk keys); nothing when it is all NaN. Without the
    inner chunk and shard shapes, they are read from the array's `zarr.json`. Returns the
    shard's bytes as stored (None: nothing stored)."""
    if inner_chunk_shape is None or shard_shape is None:
        inner_chunk_shape, shard_shape = shard_layout(
            json.loads(array.fs.cat_file(array.path(ZARR_JSON)))
        )
    encoded = encode_shard(block, inner_chunk_shape, shard_shape)
    if encoded is not None:  # local folders too: the location's filesystem makes `c/…`
        array.fs.pipe_file(array.path(shard_key(index)), encoded)
    return encoded


def shard_key(index: tuple[int, ...]) -> str:
    """The key of shard `index` under zarr 3's default chunk key encoding ("/")."""
    return "/".join(["c", *(str(int(i)) for i in index)])


def shard_layout(metadata: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) of a sharded array's `zarr.json`."""
    shard = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
    (codec,) = metadata["codecs"]
    if codec["name"] != "sharding_indexed":
        raise ValueError(f"not a sharded array: codec {codec['name']}")
    return tuple(codec["configuration"]["chunk_shape"]), shard


def _morton_order(counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The inner chunks of a shard in zarr's Morton order (zarr/core/indexing.py
    `decode_morton`: bits interleaved from the first axis on, axes that run out of bits
    dropped), so the shard's bytes are the ones zarr writes."""
    bits = [(count - 1).bit_length() for count in counts]

    def code(coords: tuple[int, ...]) -> int:
        z, out = 0, 0
        for bit in range(max(bits, default=0)):
            for axis, width in enumerate(bits):
                if bit < width:
                    z |= ((coords[axis] >> bit) & 1) << out
                    out += 1
        return z

    return sorted(itertools.product(*(range(count) for count in counts)), key=code)
