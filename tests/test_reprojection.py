"""The approximate reprojection lattice against the exact transform, and the resampler's two
bilinear paths (separable same-CRS, point by point across CRSs) against each other."""

import tracemalloc

import numpy as np
import pytest
import xarray as xr
from pyproj import Transformer

from polar_cube.grid import TargetGrid
from polar_cube.resample import (
    MAX_TRANSFORM_ERROR,
    BlockResampler,
    _Window,
    fractional_index,
    lattice_transform,
)
from polar_cube.sources.readers import SourceLayer
from polar_cube.spec import ValidCondition, load_spec

# EPSG:3031 with the false easting moved by 1 mm: a different CRS, so the lattice path runs.
SHIFTED_3031 = (
    "+proj=stere +lat_0=-90 +lat_ts=-71 +lon_0=0 +x_0=0.001 +y_0=0 +datum=WGS84 +units=m +no_defs"
)


def cube_grid_and_latlon_crs(spec_path) -> tuple[TargetGrid, str]:
    spec = load_spec(spec_path)
    latlon = next(s for s in spec.sources if s.source_format == "latlon_netcdf")
    return TargetGrid.from_spec(spec), latlon.source_crs


def chunks_to_check(grid: TargetGrid) -> dict[str, tuple[int, int]]:
    """Corner chunks and the one nearest the pole, where lon/lat bend most (curvature ~ 1/r)."""
    starts_y = np.cumsum((0,) + grid.chunks()[0][:-1])
    starts_x = np.cumsum((0,) + grid.chunks()[1][:-1])
    size = grid.chunk_size

    def distance_to_pole(row: int, col: int) -> float:
        x = np.clip(0.0, grid.x[col], grid.x[min(col + size, grid.width) - 1])
        y = np.clip(0.0, grid.y[row], grid.y[min(row + size, grid.height) - 1])
        return float(np.hypot(x, y))

    nearest = min(
        ((r, c) for r in starts_y for c in starts_x), key=lambda rc: distance_to_pole(*rc)
    )
    return {
        "south-west": (starts_y[0], starts_x[0]),
        "south-east": (starts_y[0], starts_x[-1]),
        "north-west": (starts_y[-1], starts_x[0]),
        "north-east": (starts_y[-1], starts_x[-1]),
        "nearest the pole": nearest,
    }


def error_in_cells(transformer, source_x, source_y, xs, ys, resolution) -> np.ndarray:
    """How far each approximated source point lands from its cell centre, in target cells."""
    back_x, back_y = transformer.transform(source_x, source_y, direction="INVERSE")
    return np.hypot(back_x - xs[np.newaxis, :], back_y - ys[:, np.newaxis]) / resolution


@pytest.mark.parametrize(
    "chunk", ["south-west", "south-east", "north-west", "north-east", "nearest the pole"]
)
def test_lattice_stays_within_a_hundredth_of_a_cell_on_cube_chunks(repo_spec_path, chunk):
    grid, source_crs = cube_grid_and_latlon_crs(repo_spec_path)
    assert grid.resolution == 100.0
    row, col = chunks_to_check(grid)[chunk]
    xs, ys = grid.x[col : col + grid.chunk_size], grid.y[row : row + grid.chunk_size]
    transformer = Transformer.from_crs(grid.crs, source_crs, always_xy=True)
    lon, lat = lattice_transform(transformer, xs, ys)
    assert lon.shape == (ys.size, xs.size)
    error = error_in_cells(transformer, lon, lat, xs, ys, grid.resolution)
    assert np.isfinite(error).all()
    assert error.max() <= MAX_TRANSFORM_ERROR
    # interpolated, not transformed point by point: a sample differs from the exact transform
    sample = np.s_[::15, ::15]
    exact_lon, exact_lat = transformer.transform(*np.meshgrid(xs[sample[1]], ys[sample[0]]))
    assert (lon[sample] != exact_lon).mean() > 0.9
    np.testing.assert_allclose(lat[sample], exact_lat, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 250.0], ids=["centres-around-pole", "node-on-pole"])
def test_lattice_across_the_antimeridian_and_round_the_pole(offset):
    """A grid centred on the pole: the ±180° meridian runs down from it (x = 0, y < 0)."""
    grid = TargetGrid(
        "EPSG:3031", (-150_000 - offset, -150_000 - offset, 150_000 - offset, 150_000 - offset), 500
    )
    transformer = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = lattice_transform(transformer, grid.x, grid.y)
    error = error_in_cells(transformer, lon, lat, grid.x, grid.y, grid.resolution)
    assert error.max() <= MAX_TRANSFORM_ERROR
    across = (np.abs(grid.x) < 1000)[np.newaxis, :] & (grid.y < 0)[:, np.newaxis]
    assert lon[across].min() < -179 and lon[across].max() > 179  # both sides of the wrap


def test_resampled_field_is_continuous_across_the_antimeridian_and_the_pole():
    """(lat + 90) * cos(lon) is smooth on the polar grid; lon interpolated across the wrap
    (179 and -179 averaged to 0) would flip its sign there."""
    lat = np.arange(-89.75, -60, 0.5)
    lon = np.arange(-179.5, 180, 1.0)
    field = (lat[:, np.newaxis] + 90) * np.cos(np.radians(lon))[np.newaxis, :]
    data = xr.DataArray(field, dims=("y", "x"), coords={"y": lat, "x": lon})
    layer = SourceLayer(data=data, crs="EPSG:4326", description="test lat/lon layer")
    grid = TargetGrid("EPSG:3031", (-150_000, -150_000, 150_000, 150_000), 500, chunk_size=256)
    out = BlockResampler(layer, grid, "linear").resample_block(slice(0, 600), slice(0, 600))
    true_lon, true_lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(
        *np.meshgrid(grid.x, grid.y)
    )
    expected = (true_lat + 90) * np.cos(np.radians(true_lon))
    beyond_first_row = true_lat > lat[0]  # nearer the pole the outer half cell is flat
    across = (np.abs(grid.x) < 2000)[np.newaxis, :] & (grid.y < -20_000)[:, np.newaxis]
    assert np.isfinite(out).all() and (beyond_first_row & across).sum() > 100
    np.testing.assert_allclose(out[beyond_first_row], expected[beyond_first_row], atol=1e-3)


def layer_in(crs: str, x_shift: float, values: np.ndarray, xs, ys) -> SourceLayer:
    data = xr.DataArray(values, dims=("y", "x"), coords={"y": ys, "x": xs + x_shift})
    return SourceLayer(data=data, crs=crs, description=f"test layer in {crs}")


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_separable_and_point_by_point_paths_agree(method):
    """The same 250 m source (NaN holes, masked values, edges inside the target) through the
    same-CRS path and, declared in a 1 mm shifted CRS, through the lattice path."""
    rng = np.random.default_rng(11)
    height, width, res = 50, 60, 250.0
    west, north = -1_500_037.0, -400_019.0  # no target centre within 10 m of a source edge
    xs = west + res * (np.arange(width) + 0.5)
    ys = north - res * (np.arange(height) + 0.5)  # north-up, descending
    values = rng.normal(size=(height, width)).cumsum(0).cumsum(1) * 10
    values[5:12, 8:15] = np.nan
    values[30:33, :] = np.nan
    grid = TargetGrid("EPSG:3031", (west - 963, north - 13_581, west + 15_537, north + 1_019), 100)
    valid_if = (ValidCondition.parse("> -40"),)
    results = []
    for crs, shift in (("EPSG:3031", 0.0), (SHIFTED_3031, 0.001)):
        block = BlockResampler(layer_in(crs, shift, values, xs, ys), grid, method, valid_if)
        assert block.same_crs == (crs == "EPSG:3031")
        results.append(block.resample_block(slice(0, grid.height), slice(0, grid.width)))
    separable, point_by_point = results
    assert separable.dtype == point_by_point.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(separable), np.isnan(point_by_point))
    finite = np.isfinite(separable)
    assert 0.3 < finite.mean() < 0.95  # holes, masked values and margins all present
    np.testing.assert_allclose(separable[finite], point_by_point[finite], rtol=1e-6, atol=1e-4)


def test_same_crs_chunk_builds_no_chunk_sized_float64_arrays():
    """A 2048 x 2048 bilinear chunk from a 250 m float32 source peaks well below one
    chunk-sized float64 array (32 MiB) on top of its float32 result (16 MiB)."""
    n = 900
    xs = -1_000_000 + 250.0 * (np.arange(n) + 0.5)
    ys = -1_000_000 + 250.0 * (np.arange(n) + 0.5)
    values = np.random.default_rng(3).normal(size=(n, n)).astype(np.float32)
    values[100:200, 300:400] = np.nan
    grid = TargetGrid("EPSG:3031", (-1_000_000, -1_000_000, -795_200, -795_200), 100)
    block = BlockResampler(layer_in("EPSG:3031", 0.0, values, xs, ys), grid, "linear")
    tracemalloc.start()
    try:
        out = block.resample_block(slice(0, 2048), slice(0, 2048))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (2048, 2048) and np.isfinite(out).mean() > 0.9
    assert peak < out.nbytes + 24 * 2**20


@pytest.mark.parametrize("x_shift", [0.0, 37.0, -2_000.0])
def test_complete_window_shortcut_equals_the_general_renormalised_path(x_shift):
    """Without missing source cells the separable path uses per-axis weights; it must give
    what the general path (values and weights summed, renormalised, containing-cell rule)
    gives, at the source's edges and beyond them too."""
    n = 40
    xs = -1_000_000 + 250.0 * (np.arange(n) + 0.5) + x_shift
    ys = -1_000_000 + 250.0 * (np.arange(n) + 0.5)
    values = np.random.default_rng(5).normal(size=(n, n)).cumsum(0).cumsum(1)
    grid = TargetGrid("EPSG:3031", (-1_001_500, -1_001_500, -988_500, -988_500), 100)
    fx, fy = fractional_index(xs, grid.x), fractional_index(ys, grid.y)
    window = _Window(values, 0, 0)
    assert window.complete
    shortcut = window.bilinear_separable(fx, fy)
    window.complete = False
    general = window.bilinear_separable(fx, fy)
    np.testing.assert_array_equal(np.isnan(shortcut), np.isnan(general))
    assert 0.2 < np.isfinite(shortcut).mean() < 0.9  # edges inside the grid
    np.testing.assert_allclose(shortcut, general, rtol=1e-6, equal_nan=True)
