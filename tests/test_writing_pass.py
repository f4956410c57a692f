"""The writing pass: each block of a per-dataset cube is computed once and yields the cube's
chunk, its statistics and its overview levels. The statistics equal a full recomputation; the
levels halve the resolution (2 x 2 mean of valid cells; classes: the most frequent) until one
512 x 512 tile."""

import json
import math
import threading
import tracemalloc
import warnings
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from numcodecs import Blosc

from polar_cube.cube.verify import stored_stats, variable_stats
from polar_cube.grid import TargetGrid
from polar_cube.levels import halve, level_axis
from polar_cube.spec import load_spec
from polar_cube.stats import STATS_ATTR
from polar_cube.zarr_store import add_grid_coords, write_zarr_atomically
from tests.conftest import REPO

SPEC = load_spec(REPO / "cube.geojson")
GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 1000, 2048)  # 2121 x 1953: 1 x 2 blocks
TIMES = pd.DatetimeIndex(["2013-01-01", "2017-01-01"])
NAMES = {"magnetic_anomaly": (), "ice_thickness": (), "supraglacial_lakes": (), "thw_70": TIMES}
CALLS: Counter = Counter()
LOCK = threading.Lock()


def values(name: str, step: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """A deterministic float32 field per variable, with NaN regions; classes for the masks."""
    if name == "magnetic_anomaly":
        field = (columns - 1000) * 2.0 + rows * 0.1
        field[((rows + 2 * columns) % 11 == 0) | ((rows < 100) & (columns < 300))] = np.nan
    elif name == "ice_thickness":
        field = np.full(rows.shape, np.nan)  # an all-NaN layer: no chunk, no min/max/mean
    elif name == "supraglacial_lakes":
        field = ((rows // 3 + columns // 5) % 3).astype("float64")
        field[columns < 400] = np.nan
    else:  # thw_70: 0/1, unmapped (NaN) in the north
        field = ((rows // 37 + columns // 53 + step) % 2).astype("float64")
        field[rows > 1500] = np.nan
    return field.astype("float32")


def lazy_layer(name: str, step: int = 0) -> da.Array:
    """The field as dask blocks on the grid, counting how often each block is computed."""

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        with LOCK:
            CALLS[(name, step, block_info[None]["chunk-location"])] += 1
        rows, columns = np.mgrid[y0:y1, x0:x1]
        return values(name, step, rows, columns)

    return da.map_blocks(block, chunks=GRID.chunks(), dtype="float32")


def full_layer(name: str, step: int = 0) -> np.ndarray:
    return values(name, step, *np.mgrid[0 : GRID.height, 0 : GRID.width])


def synthetic_dataset() -> xr.Dataset:
    variables = {}
    for name, times in NAMES.items():
        spec_variable = next(v for v in SPEC.variables if v.name == name)
        attrs = {"units": spec_variable.units, "long_name": spec_variable.long_name}
        attrs.update(spec_variable.attrs)
        if len(times):
            data = da.stack([lazy_layer(name, step) for step in range(len(times))])
            variables[name] = (("time", "y", "x"), data, attrs)
        else:
            variables[name] = (("y", "x"), lazy_layer(name), attrs)
    dataset = xr.Dataset(variables, coords={"time": TIMES})
    dataset.attrs["polar_cube_inputs_sha256"] = "synthetic-fingerprint"
    return add_grid_coords(dataset, GRID)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    CALLS.clear()
    target = tmp_path_factory.mktemp("writing-pass") / "synthetic.zarr"
    with dask.config.set(scheduler="threads"):
        write_zarr_atomically(synthetic_dataset(), target, GRID.chunk_size)
    return target, Counter(CALLS)


def test_each_block_is_computed_once(written):
    _, calls = written
    blocks = len(GRID.chunks()[0]) * len(GRID.chunks()[1])
    expected = {(name, step) for name, times in NAMES.items() for step in range(max(1, len(times)))}
    assert {(name, step) for name, step, _ in calls} == expected
    assert len(calls) == len(expected) * blocks
    assert set(calls.values()) == {1}


def test_stats_from_the_writing_pass_equal_a_full_recomputation(written):
    target, _ = written
    cube = xr.open_zarr(target, consolidated=True)
    stored = stored_stats(cube, SPEC, str(target))
    recomputed = variable_stats(cube, SPEC)
    assert [(s.name, s.time) for s in stored] == [(s.name, s.time) for s in recomputed]
    assert len(stored) == 5  # thw_70 twice
    for mine, full in zip(stored, recomputed, strict=True):
        assert (mine.units, mine.valid_fraction) == (full.units, full.valid_fraction), mine
        assert (mine.minimum, mine.maximum) == (full.minimum, full.maximum), mine
        assert mine.mean == (full.mean and pytest.approx(full.mean, rel=1e-12)), mine
    empty = next(s for s in stored if s.name == "ice_thickness")
    assert (empty.valid_fraction, empty.minimum, empty.maximum, empty.mean) == (0, None, None, None)
    lakes = next(s for s in stored if s.name == "supraglacial_lakes")
    assert (lakes.minimum, lakes.maximum) == (0.0, 2.0)
    records = cube["thw_70"].attrs[STATS_ATTR]
    assert [r["time"] for r in records] == ["2013-01-01", "2017-01-01"]
    assert records[0]["cells"] == GRID.width * GRID.height
    json.dumps(records, allow_nan=False)  # NaN-free JSON


def test_levels_halve_until_one_tile_in_xcube_layout(written):
    target, _ = written
    levels = target.with_name("synthetic.levels")
    assert (levels / "0.link").read_text() == "../synthetic.zarr"
    record = json.loads((levels / ".zlevels").read_text())
    assert record == {
        "version": "1.0",
        "num_levels": 4,  # 2121 -> 1061 -> 531 -> 266 columns: the last fits 512
        "agg_methods": {
            "ice_thickness": "mean",
            "magnetic_anomaly": "mean",
            "supraglacial_lakes": "mode",
            "thw_70": "mode",
        },
        "polar_cube_inputs_sha256": "synthetic-fingerprint",
    }
    assert sorted(p.name for p in levels.iterdir()) == [
        ".zlevels",
        "0.link",
        *map("{}.zarr".format, (1, 2, 3)),
    ]
    for level in (1, 2, 3):
        opened = xr.open_zarr(levels / f"{level}.zarr", consolidated=True)
        height, width = math.ceil(GRID.height / 2**level), math.ceil(GRID.width / 2**level)
        assert (opened.sizes["y"], opened.sizes["x"]) == (height, width)
        np.testing.assert_allclose(opened.x.values, level_axis(GRID.x, level))
        assert opened.x.values[1] - opened.x.values[0] == GRID.resolution * 2**level
        assert opened.x.values[0] == GRID.bbox[0] + GRID.resolution * 2 ** (level - 1)
        zarray = json.loads((levels / f"{level}.zarr" / "thw_70" / ".zarray").read_text())
        assert zarray["chunks"] == [1, 512, 512] and zarray["dtype"] == "<f4"
        assert zarray["fill_value"] == "NaN"
        assert zarray["compressor"] == Blosc(cname="lz4", clevel=7, shuffle=1).get_config()
        assert opened.thw_70.attrs["flag_values"] == [0, 1]
        assert STATS_ATTR not in opened.thw_70.attrs
        transform = opened.crs.attrs["GeoTransform"].split()
        assert float(transform[0]) == GRID.bbox[0] and float(transform[1]) == 1000 * 2**level
    assert not list((levels / "1.zarr" / "ice_thickness").glob("0.*"))  # empty chunks not stored


def reference_halving(layer: np.ndarray, categorical: bool) -> np.ndarray:
    """2 x 2 windows, written independently of `halve`: xarray's padded coarsen mean, or
    the class with the most cells (ties: the larger class)."""
    array = xr.DataArray(layer.astype("float64"), dims=("y", "x"))
    if not categorical:
        return array.coarsen(y=2, x=2, boundary="pad").mean().values
    counts = [(array == code).coarsen(y=2, x=2, boundary="pad").sum().values for code in (0, 1, 2)]
    best = np.full(counts[0].shape, np.nan)
    most = np.zeros(counts[0].shape)
    for code, count in enumerate(counts):
        better = (count >= most) & (count > 0)
        best[better], most[better] = code, count[better]
    return best


@pytest.mark.parametrize("name", ["magnetic_anomaly", "supraglacial_lakes", "thw_70"])
def test_each_level_is_the_2x2_coarsening_of_the_one_above(written, name):
    target, _ = written
    levels = target.with_name("synthetic.levels")
    categorical = name != "magnetic_anomaly"
    above = full_layer(name, step=1) if name == "thw_70" else full_layer(name)
    for level in (1, 2, 3):
        stored = xr.open_zarr(levels / f"{level}.zarr", consolidated=True)[name]
        layer = stored.isel(time=1).values if name == "thw_70" else stored.values
        expected = reference_halving(above, categorical)
        np.testing.assert_allclose(layer, expected, rtol=1e-6, equal_nan=True)
        assert np.isfinite(layer).any()
        above = layer


def test_halving_edges_ties_and_gaps():
    block = np.array(
        [[1, 3, 0, 0, 7], [np.nan, np.nan, 1, 1, 9], [2, 4, np.nan, np.nan, np.nan]],
        dtype="float32",
    )
    np.testing.assert_array_equal(
        halve(block, "mean"), np.array([[2, 0.5, 8], [3, np.nan, np.nan]], dtype="float32")
    )
    np.testing.assert_array_equal(
        halve(block, "mode"), np.array([[3, 1, 9], [4, np.nan, np.nan]], dtype="float32")
    )
    stack = np.stack([block, block + 1])
    assert halve(stack, "mean").shape == (2, 2, 3)
    assert halve(stack, "mode")[1, 0, 1] == 2


def _stored(root) -> dict[str, bytes]:
    """Every chunk and level object of the cube at `root` (not its clock-stamped metadata)."""
    files = {}
    for path in sorted(root.parent.glob(root.stem + ".*/**/*")):
        if path.is_file() and path.name not in {".zattrs", ".zmetadata", "0.link"}:
            files[str(path.relative_to(root.parent)).split("/", 1)[1]] = path.read_bytes()
    return files


def _written_with_ice_thickness(folder, make_block) -> tuple[dict[str, bytes], dict]:
    """The synthetic cube written with ice_thickness's blocks from `make_block(shape)`."""

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return make_block((y1 - y0, x1 - x0))

    dataset = synthetic_dataset()
    lazy = da.map_blocks(block, chunks=GRID.chunks(), dtype="float32")
    dataset["ice_thickness"] = dataset["ice_thickness"].copy(data=lazy)
    target = folder / "synthetic.zarr"
    with dask.config.set(scheduler="threads"):
        write_zarr_atomically(dataset, target, GRID.chunk_size)
    return _stored(target), xr.open_zarr(target)["ice_thickness"].attrs


def test_blocks_of_one_value_are_written_as_full_ones_are_without_being_filled(written, tmp_path):
    """The resampler's `blank` for a chunk its source does not reach, the rasteriser's
    background-only `constant`: the same statistics, levels and chunks as full-size blocks
    of the same values, and the halving and statistics never make one full-size."""
    from polar_cube.blank import blank, constant, constant_value, is_blank
    from polar_cube.stats import block_stats

    for value in (np.nan, 2.5):
        odd = constant((2, 2047, 5), value)
        full = np.full(odd.shape, value, dtype="float32")
        assert constant_value(odd) == value or np.isnan(value) and is_blank(odd)
        assert constant_value(full) is None and not is_blank(full)
        for method in ("mean", "mode"):
            halved = halve(odd, method)
            assert constant_value(halved) is not None and halved.shape == (2, 1024, 3)
            np.testing.assert_array_equal(halved, halve(full, method))
        np.testing.assert_array_equal(block_stats(odd), block_stats(full))

    blank_cube = _written_with_ice_thickness(tmp_path / "blank", blank)
    assert len(blank_cube[0]) > 10
    assert blank_cube == (_stored(written[0]), xr.open_zarr(written[0])["ice_thickness"].attrs)

    def full_of_two(shape):
        return np.full(shape, 2.0, dtype="float32")

    constant_cube = _written_with_ice_thickness(
        tmp_path / "constant", lambda shape: constant(shape, 2.0)
    )
    assert constant_cube == _written_with_ice_thickness(tmp_path / "full", full_of_two)
    assert constant_cube[1]["polar_cube_stats"][0]["valid_cells"] == GRID.height * GRID.width


def test_halving_means_equal_nanmean_on_random_blocks():
    """Edges, holes, odd sizes, a time axis, magnitudes from 1e-3 to 1e3: bit for bit."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 40, size=rng.integers(2, 4)))
        block = (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)).astype("float32")
        block[rng.random(shape) < rng.random()] = np.nan
        padded = np.pad(
            block,
            [(0, 0)] * (block.ndim - 2) + [(0, shape[-2] % 2), (0, shape[-1] % 2)],
            constant_values=np.nan,
        )
        cells = [padded[..., r::2, c::2].astype("float64") for r in (0, 1) for c in (0, 1)]
        with warnings.catch_warnings():  # "Mean of empty slice": an all-NaN window
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmean(np.stack(cells), axis=0).astype("float32")
        np.testing.assert_array_equal(halve(block, "mean"), expected)


def test_the_writing_pass_never_holds_a_layer(tmp_path):
    """A 4096 x 4096 float32 layer is 64 MB; cube, levels and statistics are written block by
    block (1024 x 1024, 4 MB) far below that."""
    grid = TargetGrid("EPSG:3031", (0, 0, 4096 * 100, 4096 * 100), 100, 1024)

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rows, columns = np.mgrid[y0:y1, x0:x1]
        layer = (rows - columns).astype("float32")
        layer[(rows + columns) % 7 == 0] = np.nan
        return layer

    layer = da.map_blocks(block, chunks=grid.chunks(), dtype="float32")
    dataset = add_grid_coords(xr.Dataset({"magnetic_anomaly": (("y", "x"), layer)}), grid)
    # a small write first: modules and caches the writing pass loads once are not its data
    # (without it the peak below varied by ~10 MB with what the process had run before)
    small = dataset.isel(x=slice(0, 2048), y=slice(0, 2048))
    with dask.config.set(scheduler="synchronous"):
        write_zarr_atomically(small, tmp_path / "small.zarr", grid.chunk_size)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            write_zarr_atomically(dataset, tmp_path / "big.zarr", grid.chunk_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"
    levels = sorted(p.name for p in (tmp_path / "big.levels").glob("*.zarr"))
    assert levels == ["1.zarr", "2.zarr", "3.zarr"]
    [stats] = stored_stats(xr.open_zarr(tmp_path / "big.zarr"), SPEC, "big.zarr")
    assert (stats.minimum, stats.maximum) == (-4094.0, 4094.0)  # the corners are NaN
