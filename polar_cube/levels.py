"""Multi-level overviews in xcube's layout, next to a cube `<name>.zarr`:

    <name>.levels/0.link     `../<name>.zarr`: level 0 is the full cube itself, not a copy
    <name>.levels/1.zarr …   each level half the previous level's resolution (zarr 2,
                             consolidated, same dtype, codec and NaN fill as the cube)
    <name>.levels/.zlevels   xcube's level record plus the inputs fingerprint; written last,
                             it marks the levels complete

xcube's `FsMultiLevelDataset` (`new_data_store("file").open_data(…, data_type="mldataset")`)
opens this folder. Levels are added until the coarsest fits in one `TILE_SIZE` tile, so a map
viewer drawing the whole area reads one small array. A level cell is made from the 2 × 2
cells under it: continuous variables take the mean of the valid ones, class variables
(`flag_values`) the most frequent valid value (on a tie, the larger code: a lake or a channel
outweighs "no lake"). Odd edges are padded with NaN, so level k has ceil(n / 2**k) cells.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import xarray as xr

from polar_cube.blank import constant, constant_value

TILE_SIZE = 512
LEVELS_FORMAT_VERSION = "1.0"  # xcube's `.zlevels` version
ZLEVELS = ".zlevels"
LINK = "0.link"
FINGERPRINT_KEY = "polar_cube_inputs_sha256"
MEAN, MODE = "mean", "mode"


def levels_name(cube_name: str) -> str:
    """`<stem>.levels` for the cube `<stem>.zarr`."""
    return f"{cube_name.removesuffix('.zarr')}.levels"


def level_name(level: int) -> str:
    return f"{level}.zarr"


def link_text(cube_name: str) -> str:
    """What `0.link` holds: the cube's path relative to the levels folder."""
    return f"../{cube_name}"


def level_count(shape: tuple[int, ...], tile_size: int = TILE_SIZE) -> int:
    """Levels (the full cube included) until the coarsest fits in one tile."""
    size, count = max(shape[-2:]), 1
    while size > tile_size:
        size, count = math.ceil(size / 2), count + 1
    return count


def level_shape(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """The shape at `level` of an array of `shape` (leading dims, then y, x)."""
    *leading, height, width = shape
    step = 2**level
    return (*leading, math.ceil(height / step), math.ceil(width / step))


def level_chunk_size(chunk_size: int) -> int:
    """Chunk edge of levels 1 and up: the cube's, at most a tile, even (2 × 2 windows never
    straddle two chunks)."""
    return max(2, min(chunk_size, TILE_SIZE) // 2 * 2)


def agg_method(attrs: dict) -> str:
    return MODE if "flag_values" in attrs else MEAN


def level_axis(centres: np.ndarray, level: int) -> np.ndarray:
    """Cell centres at `level` of a regular axis given by its full-resolution centres."""
    centres = np.asarray(centres, dtype="float64")
    count = math.ceil(centres.size / 2**level)
    if centres.size < 2:
        return centres[:count]
    step = (centres[-1] - centres[0]) / (centres.size - 1)
    edge = centres[0] - step / 2
    return edge + step * 2**level * (np.arange(count) + 0.5)


def level_coords(
    x: xr.DataArray, y: xr.DataArray, crs: xr.DataArray | None, level: int
) -> xr.Dataset:
    """Coordinates (CF attributes kept) and grid-mapping variable of `level` of a cube with
    these x, y and `crs`: GDAL and xarray place each level on its own."""
    level_x, level_y = level_axis(x.values, level), level_axis(y.values, level)
    coords = {"x": ("x", level_x, dict(x.attrs)), "y": ("y", level_y, dict(y.attrs))}
    if crs is None:
        return xr.Dataset(coords=coords)
    attrs = dict(crs.attrs)
    if "GeoTransform" in attrs and level_x.size > 1 and level_y.size > 1:
        dx, dy = level_x[1] - level_x[0], level_y[1] - level_y[0]
        attrs["GeoTransform"] = (
            f"{level_x[0] - dx / 2:.12g} {dx:.12g} 0 {level_y[0] - dy / 2:.12g} 0 {dy:.12g}"
        )
    return xr.Dataset({crs.name: xr.DataArray(crs.values, attrs=attrs)}, coords=coords)


def halve(block: np.ndarray, method: str) -> np.ndarray:
    """One level down: each 2 × 2 window of the last two axes becomes one float32 cell.

    `mean`: the mean of its valid (non-NaN) cells; `mode`: its most frequent valid value, the
    larger on a tie. NaN where the window has no valid cell.
    """
    height, width = block.shape[-2:]
    value = constant_value(block)
    if value is not None:  # one value throughout: so is every window's mean and mode
        return constant((*block.shape[:-2], -(-height // 2), -(-width // 2)), value)
    if height % 2 or width % 2:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, height % 2), (0, width % 2)]
        block = np.pad(block, pad, constant_values=np.nan)
    cells = [block[..., row::2, column::2] for row in (0, 1) for column in (0, 1)]
    if method != MODE:
        return _mean(cells, block)
    if np.isnan(block.flat[0]) and np.isnan(block).all():  # e.g. outside a lake survey
        return np.full(cells[0].shape, np.nan, dtype="float32")
    return _mode(cells)


def _mean(cells: list[np.ndarray], block: np.ndarray) -> np.ndarray:
    """The float64 sum of the four cells, NaN wherever one is; only the windows with some
    but not all cells NaN (a layer's edges, its holes) are then averaged over their valid
    cells, gathered: a block's NaN outside its coverage costs one scan of `block`."""
    total = cells[0].astype("float64")
    for cell in cells[1:]:
        total += cell
    total *= 0.25
    missing = np.isnan(total)
    if missing.any():
        nan = np.isnan(block).view(np.uint8)
        nan_cells = nan[..., 0::2, 0::2] + nan[..., 0::2, 1::2]
        nan_cells += nan[..., 1::2, 0::2]
        nan_cells += nan[..., 1::2, 1::2]
        partial = np.nonzero(missing & (nan_cells < 4))
        if partial[0].size:
            values = np.stack([cell[partial] for cell in cells]).astype("float64")
            valid = ~np.isnan(values)
            total[partial] = np.where(valid, values, 0.0).sum(axis=0) / valid.sum(axis=0)
    return total.astype("float32")


def _mode(cells: list[np.ndarray]) -> np.ndarray:
    """Windows whose four cells are equal (or all NaN) are that value, as most windows of a
    class layer are; the others are counted (`_mode_of_mixed`)."""
    uniform = (cells[0] == cells[1]) & (cells[1] == cells[2]) & (cells[2] == cells[3])
    uniform |= np.isnan(cells[0]) & np.isnan(cells[1]) & np.isnan(cells[2]) & np.isnan(cells[3])
    result = cells[0].astype("float32")  # a copy: the uniform windows' value
    mixed = ~uniform
    if mixed.any():
        result[mixed] = _mode_of_mixed([cell[mixed] for cell in cells])
    return result


def _mode_of_mixed(cells: list[np.ndarray]) -> np.ndarray:
    counts = [(~np.isnan(cell)).astype("uint8") for cell in cells]  # NaN counts nowhere
    for first, second in itertools.combinations(range(len(cells)), 2):
        same = cells[first] == cells[second]  # never true for NaN
        counts[first] += same
        counts[second] += same
    best = np.maximum.reduce(counts)
    result = np.full(cells[0].shape, np.nan, dtype="float32")
    for cell, count in zip(cells, counts, strict=True):
        result = np.fmax(result, np.where((count == best) & (count > 0), cell, np.nan))
    return result


def levels_record(num_levels: int, agg_methods: dict[str, str], fingerprint: str | None) -> dict:
    """The `.zlevels` document: xcube's fields plus our inputs fingerprint."""
    record: dict = {
        "version": LEVELS_FORMAT_VERSION,
        "num_levels": num_levels,
        "agg_methods": dict(sorted(agg_methods.items())),
    }
    if fingerprint:
        record[FINGERPRINT_KEY] = fingerprint
    return record


def encode_record(record: dict) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()


def read_record(raw: bytes | None) -> dict:
    """A `.zlevels` document from its bytes ({} when missing or not a JSON object)."""
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
