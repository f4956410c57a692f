"""Checking a published cube against the spec, and summarising it."""

import json
import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from polar_cube.cube.verify import (
    CubeCheckError,
    VariableStats,
    check_store_layout,
    find_problems,
    stats_markdown,
    stats_table_rows,
    stored_stats,
    variable_stats,
    verify_cube,
)
from polar_cube.grid import TargetGrid
from polar_cube.spec import load_spec
from polar_cube.zarr_store import add_grid_coords, write_zarr_atomically

SPEC = load_spec(Path(__file__).resolve().parents[1] / "cube.geojson")
RESOLUTION = 3000  # divides both bbox extents: 651 x 707 cells
CHUNK = 256  # 3 x 3 chunks
GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, RESOLUTION, CHUNK)
NAN_CORNER = (10, 20)  # the south-west 10 rows x 20 columns are NaN in every layer
TIMES = pd.DatetimeIndex(["2013-01-01", "2017-01-01"])


def field(name: str, step: int = 0, grid: TargetGrid = GRID) -> np.ndarray:
    """A deterministic float32 layer for variable `name`: a plane or classes, NaN corner."""
    ny, nx = grid.shape
    rows, columns = np.mgrid[0:ny, 0:nx]
    variable = next(v for v in SPEC.variables if v.name == name)
    if "flag_values" in variable.attrs:
        flags = variable.attrs["flag_values"]
        values = ((rows // 50 + columns // 70 + step) % len(flags)).astype("float32")
    elif name == "magnetic_anomaly":
        values = (columns - nx / 2) * 2.0 + rows * 0.1  # both signs
    elif name.startswith("curie"):
        values = -5.0 - rows * 0.01 - columns * 0.02  # negative km
    else:
        values = 10.0 + rows * 0.5 + columns * 0.25 + len(name)
    values = values.astype("float32")
    values[: NAN_CORNER[0], : NAN_CORNER[1]] = np.nan
    return values


def make_dataset(grid: TargetGrid = GRID, spec=SPEC) -> xr.Dataset:
    """An in-memory cube with every spec variable, attributes as the pipeline sets them."""
    variables = {}
    for variable in spec.variables:
        if variable.dims[0] == "time":
            data = np.stack([field(variable.name, step, grid) for step in range(len(TIMES))])
        else:
            data = field(variable.name, grid=grid)
        attrs = {"units": variable.units, "long_name": variable.long_name, **variable.attrs}
        variables[variable.name] = (variable.dims, data, attrs)
    return add_grid_coords(xr.Dataset(variables, coords={"time": TIMES}), grid)


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("verify") / "cube.zarr"
    return write_zarr_atomically(make_dataset(), target, CHUNK)


@pytest.fixture
def cube(cube_path):
    return xr.open_zarr(cube_path, consolidated=True)


def problems_of(cube):
    return find_problems(cube, SPEC, GRID)


def test_the_published_layout_passes(cube, cube_path):
    assert problems_of(cube) == []
    verify_cube(cube, SPEC, GRID, str(cube_path))
    check_store_layout(fsspec.get_mapper(str(cube_path)), str(cube_path))


def test_it_also_passes_with_crs_decoded_as_a_coordinate(cube_path):
    opened = xr.open_zarr(cube_path, consolidated=True, decode_coords="all")
    assert "crs" in opened.coords and problems_of(opened) == []


def test_wrong_units_are_named(cube):
    cube["ice_thickness"].attrs["units"] = "km"
    assert problems_of(cube) == ["ice_thickness: attribute units is 'km', expected 'm'"]


def test_a_missing_variable_is_named(cube):
    assert problems_of(cube.drop_vars("thw_70")) == ["thw_70: missing"]


def test_float64_is_named(cube):
    cube["magnetic_anomaly"] = cube["magnetic_anomaly"].astype("float64")
    [problem] = problems_of(cube)
    assert problem.startswith("magnetic_anomaly: dtype float64")


def test_descending_y_is_named(cube):
    problems = problems_of(cube.isel(y=slice(None, None, -1)))
    assert problems == ["y: coordinates are not ascending"]


def test_shifted_x_is_named(cube):
    problems = problems_of(cube.assign_coords(x=cube.x + RESOLUTION / 2))
    assert len(problems) == 1 and problems[0].startswith("x: coordinates are not the grid's")


def test_wrong_chunks_are_named(cube):
    cube["curie_depth_200km"].encoding["chunks"] = (128, 128)
    cube["thw_124"].encoding["chunks"] = (2, 256, 256)
    assert problems_of(cube) == [
        "curie_depth_200km: y chunk is 128, expected 256",
        "curie_depth_200km: x chunk is 128, expected 256",
        "thw_124: time chunk is 2, expected 1",
    ]


def test_wrong_chunks_written_to_disk_are_named(tmp_path):
    grid = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 21_000, 32)  # 101 x 93 cells
    path = write_zarr_atomically(make_dataset(grid), tmp_path / "cube.zarr", 16)
    problems = find_problems(xr.open_zarr(path), SPEC, grid)
    assert len(problems) == 2 * len(SPEC.variables)
    assert "ice_thickness: y chunk is 16, expected 32" in problems


def test_chunks_larger_than_a_small_grid_are_fine(tmp_path):
    grid = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 21_000, 2048)  # 101 x 93 cells
    path = write_zarr_atomically(make_dataset(grid), tmp_path / "cube.zarr", grid.chunk_size)
    assert find_problems(xr.open_zarr(path), SPEC, grid) == []


def test_a_missing_crs_is_named(cube):
    assert problems_of(cube.drop_vars("crs")) == ["crs: grid-mapping variable missing"]


def test_a_wrong_crs_is_named(cube):
    from pyproj import CRS

    cube["crs"].attrs["crs_wkt"] = CRS.from_epsg(3413).to_wkt()
    [problem] = problems_of(cube)
    assert problem.startswith("crs: crs_wkt describes") and "EPSG:3031" in problem


def test_a_leftover_spatial_ref_is_named(cube):
    with_leftover = cube.assign_coords(spatial_ref=np.int64(0))
    assert problems_of(with_leftover) == [
        "spatial_ref: leftover variable (the grid mapping is `crs`)"
    ]


def test_wrong_times_are_named_for_every_time_variable(cube):
    shifted = cube.assign_coords(time=pd.DatetimeIndex(["2013-01-01", "2018-01-01"]))
    problems = problems_of(shifted)
    lake_variables = [v.name for v in SPEC.variables if v.dims[0] == "time"]
    assert [p.split(":")[0] for p in problems] == lake_variables
    assert "['2013-01-01', '2018-01-01'], expected ['2013-01-01', '2017-01-01']" in problems[0]


def test_a_missing_time_coordinate_is_named(cube):
    problems = problems_of(cube.drop_vars("time"))
    assert problems == [
        f"{v.name}: time coordinate missing" for v in SPEC.variables if v.dims[0] == "time"
    ]


def test_a_missing_grid_mapping_and_extra_variable_are_named(cube):
    del cube["geothermal_heat_flow_200km"].attrs["grid_mapping"]
    cube["extra"] = cube["ice_thickness"]
    assert problems_of(cube) == [
        "extra: unexpected data variable (not in the spec)",
        "geothermal_heat_flow_200km: grid_mapping is None, expected 'crs'",
    ]


def test_every_problem_is_listed_with_where_it_is(cube):
    cube["ice_thickness"].attrs["units"] = "km"
    cube["magnetic_anomaly"] = cube["magnetic_anomaly"].astype("float64")
    broken = cube.drop_vars(["crs", "thw_70"]).assign_coords(spatial_ref=0)
    where = "s3://bucket/polar.zarr"
    with pytest.raises(CubeCheckError) as caught:
        verify_cube(broken, SPEC, GRID, where)
    lines = str(caught.value).splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{where}: ") for line in lines)
    for culprit in ("ice_thickness", "magnetic_anomaly", "crs", "thw_70", "spatial_ref"):
        assert any(line.startswith(f"{where}: {culprit}:") for line in lines), culprit


def test_a_subset_of_variables_can_be_checked(cube):
    lakes = cube[["thw_124", "thw_142", "thw_170", "thw_70", "crs"]]
    names = ["thw_124", "thw_142", "thw_170", "thw_70"]
    assert find_problems(lakes, SPEC, GRID, variables=names) == []
    assert find_problems(lakes, SPEC, GRID, variables=["ice_thickness"]) == [
        f"{name}: unexpected data variable (not in the spec)" for name in names
    ] + ["ice_thickness: missing"]


def test_store_layout_rejects_zarr3_and_unconsolidated(cube_path, tmp_path):
    v3 = tmp_path / "v3.zarr"
    make_dataset().isel(y=slice(0, 10), x=slice(0, 10)).to_zarr(
        v3, zarr_format=3, consolidated=False
    )
    with pytest.raises(CubeCheckError) as caught:
        check_store_layout(fsspec.get_mapper(str(v3)), "v3.zarr")
    assert "v3.zarr: .zgroup: missing, not a zarr format 2 group (found zarr.json" in str(
        caught.value
    )
    assert "v3.zarr: .zmetadata: missing" in str(caught.value)

    loose = tmp_path / "loose.zarr"
    make_dataset().isel(y=slice(0, 10), x=slice(0, 10)).to_zarr(
        loose, zarr_format=2, consolidated=False
    )
    with pytest.raises(CubeCheckError, match=r"^loose.zarr: .zmetadata: missing, metadata not"):
        check_store_layout(fsspec.get_mapper(str(loose)), "loose.zarr")


def test_store_layout_reads_the_consolidated_format(cube_path):
    mapper = dict(fsspec.get_mapper(str(cube_path)).items())
    mapper[".zmetadata"] = json.dumps({"zarr_consolidated_format": 2, "metadata": {}}).encode()
    with pytest.raises(CubeCheckError, match="zarr_consolidated_format is 2, expected 1"):
        check_store_layout(mapper, "cube")


def test_missing_or_broken_writing_pass_stats_are_named(cube):
    del cube["thw_70"].attrs["polar_cube_stats"]
    cube["ice_thickness"].attrs["polar_cube_stats"] = [{"time": None}]
    assert problems_of(cube) == [
        "ice_thickness: polar_cube_stats does not hold one record per time step",
        "thw_70: no polar_cube_stats attribute (statistics of the writing pass)",
    ]
    with pytest.raises(CubeCheckError) as caught:
        stored_stats(cube, SPEC, "s3://bucket/polar.zarr")
    assert str(caught.value) == (
        "s3://bucket/polar.zarr: ice_thickness: no valid polar_cube_stats attribute (statistics "
        "of the writing pass); rebuild its per-dataset cube"
    )


# --- stats ---------------------------------------------------------------------------------

NAN_CELLS = NAN_CORNER[0] * NAN_CORNER[1]
CELLS = GRID.height * GRID.width


def test_stats_are_as_constructed(cube):
    stats = {(s.name, s.time): s for s in variable_stats(cube, SPEC)}
    static = [v.name for v in SPEC.variables if v.dims[0] != "time"]
    lakes = [v.name for v in SPEC.variables if v.dims[0] == "time"]
    assert set(stats) == {(n, None) for n in static} | {
        (n, t) for n in lakes for t in ("2013-01-01", "2017-01-01")
    }
    for (name, time), s in stats.items():
        expected = field(name, 0 if time in (None, "2013-01-01") else 1)
        assert s.valid_fraction == pytest.approx(1 - NAN_CELLS / CELLS, abs=1e-12)
        assert s.minimum == float(np.nanmin(expected)), name
        assert s.maximum == float(np.nanmax(expected)), name
        assert s.mean == pytest.approx(np.nanmean(expected.astype("float64")), rel=1e-9)
        assert s.units == next(v.units for v in SPEC.variables if v.name == name)
    assert stats[("thw_124", "2013-01-01")].minimum == 0.0
    assert stats[("thw_124", "2013-01-01")].maximum == 1.0
    assert stats[("supraglacial_lakes", None)].maximum == 2.0


def test_an_all_nan_layer_has_no_min_max_mean(cube):
    cube["ice_thickness"] = cube["ice_thickness"] * np.nan
    [empty] = [s for s in variable_stats(cube, SPEC) if s.name == "ice_thickness"]
    assert empty == VariableStats("ice_thickness", "m", None, 0.0, None, None, None)


def test_stats_are_reduced_chunk_by_chunk_without_loading_a_layer():
    """A 4000 x 4000 float32 layer is 64 MB (128 MB as float64); the reduction peaks far lower."""

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rows, columns = np.mgrid[y0:y1, x0:x1]
        values = (rows - columns).astype("float32")
        values[(rows + columns) % 7 == 0] = np.nan
        return values

    lazy = da.map_blocks(block, chunks=((500,) * 8, (500,) * 8), dtype="float32")
    layer = xr.DataArray(lazy, dims=("y", "x"), attrs={"units": "nT"})
    cube = xr.Dataset({"magnetic_anomaly": layer})
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            [stats] = variable_stats(cube, SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30e6, f"peak {peak / 1e6:.0f} MB"
    values = lazy.compute()
    assert stats.valid_fraction == pytest.approx(np.isfinite(values).mean(), abs=1e-12)
    assert stats.minimum == float(np.nanmin(values))
    assert stats.maximum == float(np.nanmax(values))
    assert stats.mean == pytest.approx(np.nanmean(values.astype("float64")), abs=1e-6)


def test_table_rows_and_markdown():
    stats = [
        VariableStats("ice_thickness", "m", None, 0.987654, 1.234567, 3456.789, 1717.2567),
        VariableStats("thw_124", "1", "2013-01-01", 0.5, 0.0, 1.0, 0.123456),
        VariableStats("curie_depth_200km", "km", None, 0.0, None, None, None),
    ]
    rows = stats_table_rows(stats)
    assert rows[0] == {
        "variable": "ice_thickness",
        "time": "",
        "units": "m",
        "valid %": 98.77,
        "min": 1.235,
        "max": 3457.0,
        "mean": 1717.0,
    }
    assert rows[1]["time"] == "2013-01-01" and rows[1]["mean"] == 0.1235
    assert rows[2]["min"] is None and rows[2]["valid %"] == 0.0
    text = stats_markdown(
        stats, title="Polar cube", cube_url="s3://bucket/cube.zarr", extra_lines=["13 variables"]
    )
    lines = text.splitlines()
    assert lines[0] == "# Polar cube" and "`s3://bucket/cube.zarr`" in text
    assert "13 variables" in lines
    assert "| variable | time | units | valid % | min | max | mean |" in lines
    assert "| ice_thickness | – | m | 98.77 | 1.235 | 3457 | 1717 |" in lines
    assert "| curie_depth_200km | – | km | 0 | – | – | – |" in lines


def test_markdown_of_the_cube_names_every_variable(cube):
    text = stats_markdown(variable_stats(cube, SPEC), title="Cube", cube_url="/tmp/cube.zarr")
    for variable in SPEC.variables:
        assert f"| {variable.name} |" in text
    assert text.count("| thw_124 |") == 2
