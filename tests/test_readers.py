"""Each reader on generated files: orientation, registration, clear errors."""

import contextlib
import os
import shutil
import subprocess
import zipfile

import dask
import netCDF4
import numpy as np
import pytest
import rasterio
from distributed import Client, LocalCluster
from rasterio.transform import from_origin

from polar_cube.dataset import FetchedSource, convert_source
from polar_cube.grid import TargetGrid
from polar_cube.rasterize import read_polygons
from polar_cube.resample import resample_layer
from polar_cube.sources.readers import SourceFormatError, open_source
from polar_cube.sources.standins import write_gmt_grid
from polar_cube.spec import load_spec


def field(x, y):
    """Rises to the east and (faster) to the north."""
    return x / 1000.0 + 2 * y / 1000.0


def value_at(layer, x, y):
    return float(layer.data.sel(x=x, y=y).values)


@pytest.mark.parametrize("node_offset", [0, 1])
def test_gmt_grid_orientation_and_registration(tmp_path, node_offset):
    dx = 10_000.0
    x0, x1, y0, y1 = -2_000_000.0, -1_900_000.0, -500_000.0, -420_000.0
    if node_offset == 0:
        xs, ys = np.arange(x0, x1 + dx / 2, dx), np.arange(y0, y1 + dx / 2, dx)
    else:
        xs, ys = np.arange(x0 + dx / 2, x1, dx), np.arange(y0 + dx / 2, y1, dx)
    north_first = field(xs[np.newaxis, :], ys[::-1, np.newaxis])
    path = tmp_path / "grid.nc"
    write_gmt_grid(
        path,
        north_first,
        x_range=(x0, x1),
        y_range=(y0, y1),
        spacing=(dx, dx),
        node_offset=node_offset,
    )
    layer = open_source(path, "gmt_netcdf", "z", "EPSG:3031")
    assert np.all(np.diff(layer.data.y) > 0) and np.all(np.diff(layer.data.x) > 0)
    np.testing.assert_allclose(layer.data.x, xs)
    np.testing.assert_allclose(layer.data.y, ys)
    # south-west, north-west and north-east corners hold the field's values there
    for x, y in [(xs[0], ys[0]), (xs[0], ys[-1]), (xs[-1], ys[-1]), (xs[3], ys[2])]:
        assert value_at(layer, x, y) == pytest.approx(field(x, y), rel=1e-6)
    assert ("gridline" if node_offset == 0 else "pixel") in layer.description


@pytest.mark.skipif(shutil.which("gmt") is None, reason="GMT is installed by bin/setup")
@pytest.mark.parametrize("registration", ["", "-r"])
def test_grids_written_by_gmt_come_out_where_gmt_says(tmp_path, registration):
    path = tmp_path / "gmt.nc"
    region = "-R-2000000/-1900000/-500000/-420000"
    command = ["gmt", "grdmath", region, "-I20000", *([registration] if registration else [])]
    command += ["X", "1000", "DIV", "Y", "500", "DIV", "ADD", "=", f"{path}=cf"]
    subprocess.run(command, check=True, cwd=tmp_path)
    nodes = subprocess.run(
        ["gmt", "grd2xyz", str(path)], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    xyz = np.loadtxt(nodes.splitlines())
    layer = open_source(path, "gmt_netcdf", "z", "EPSG:3031")
    assert layer.data.size == len(xyz)
    for x, y, z in xyz:
        assert value_at(layer, x, y) == pytest.approx(z, rel=1e-6)


def test_gmt_inconsistent_ranges_are_named(tmp_path):
    path = tmp_path / "bad.nc"
    write_gmt_grid(
        path, np.zeros((3, 4)), x_range=(0, 30), y_range=(0, 20), spacing=(10, 10), node_offset=0
    )
    with netCDF4.Dataset(path, "a") as dataset:
        dataset["spacing"][:] = [7.0, 10.0]
    with pytest.raises(SourceFormatError, match=r"bad.nc: spacing 7 disagrees"):
        open_source(path, "gmt_netcdf", "z", "EPSG:3031")


def test_not_a_gmt_grid(tmp_path):
    path = tmp_path / "plain.nc"
    with netCDF4.Dataset(path, "w") as dataset:
        dataset.createDimension("x", 2)
        dataset.createVariable("a", "f4", ("x",))
    with pytest.raises(SourceFormatError, match=r"plain.nc: not a GMT classic netCDF grid"):
        open_source(path, "gmt_netcdf", "z", "EPSG:3031")
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"<html>404</html>")
    with pytest.raises(SourceFormatError, match=r"garbage.nc: cannot open as netCDF"):
        open_source(garbage, "gmt_netcdf", "z", "EPSG:3031")


def write_tif(path, values, west, north, res, crs="EPSG:3031", nodata=np.nan):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=values.shape[1],
        height=values.shape[0],
        count=1,
        dtype=values.dtype,
        crs=crs,
        transform=from_origin(west, north, res, res),
        nodata=nodata,
    ) as dst:
        dst.write(values, 1)


def test_geotiff_orientation_and_nodata(tmp_path):
    res, west, north = 250.0, -2_000_000.0, -400_000.0
    xs = west + res * (np.arange(8) + 0.5)
    ys = north - res * (np.arange(6) + 0.5)  # north-up rows
    values = field(xs[np.newaxis, :], ys[:, np.newaxis]).astype(np.float32)
    values[0, 0] = np.nan
    path = tmp_path / "a.tif"
    write_tif(path, values, west, north, res)
    layer = open_source(path, "geotiff", None, "EPSG:3031")
    assert value_at(layer, xs[5], ys[4]) == pytest.approx(field(xs[5], ys[4]), rel=1e-6)
    assert value_at(layer, xs[-1], ys[0]) == pytest.approx(field(xs[-1], ys[0]), rel=1e-6)
    assert np.isnan(value_at(layer, xs[0], ys[0]))


def test_geotiff_crs_must_match_spec(tmp_path):
    path = tmp_path / "ll.tif"
    write_tif(path, np.zeros((2, 2), np.float32), 0, 1, 0.5, crs="EPSG:4326")
    with pytest.raises(SourceFormatError, match=r"ll.tif: file CRS EPSG:4326 differs"):
        open_source(path, "geotiff", None, "EPSG:3031")
    garbage = tmp_path / "garbage.tif"
    garbage.write_text("not a tiff")
    with pytest.raises(SourceFormatError, match=r"garbage.tif: cannot open as GeoTIFF"):
        open_source(garbage, "geotiff", None, "EPSG:3031")


def test_a_geotiff_without_crs_is_refused(tmp_path):
    path = tmp_path / "nowhere.tif"
    write_tif(path, np.zeros((2, 2), np.float32), 0, 1, 0.5, crs=None)
    with pytest.raises(SourceFormatError, match=r"nowhere.tif: has no CRS \(the spec says EPSG"):
        open_source(path, "geotiff", None, "EPSG:3031")


def test_a_gmt_grid_too_large_for_memory_is_refused_with_its_need(tmp_path, monkeypatch):
    path = tmp_path / "grid.nc"
    write_gmt_grid(
        path,
        np.zeros((8, 10)),
        x_range=(0.0, 100.0),
        y_range=(0.0, 80.0),
        spacing=(10.0, 10.0),
        node_offset=1,
    )
    assert open_source(path, "gmt_netcdf", "z", "EPSG:3031").data.shape == (8, 10)
    monkeypatch.setenv("POLAR_CUBE_MAX_SOURCE_MEMORY_BYTES", "600")
    with pytest.raises(
        SourceFormatError,
        match=r"grid.nc: z \(10x8 values\) would need 640 bytes of memory to read, more than "
        r"the 600 bytes allowed \(POLAR_CUBE_MAX_SOURCE_MEMORY_BYTES\)",
    ):
        open_source(path, "gmt_netcdf", "z", "EPSG:3031")


def test_latlon_netcdf_keeps_its_non_uniform_axis(tmp_path):
    lat = np.array([-89.0, -80.0, -74.0, -70.0, -68.0])
    lon = np.linspace(-180, 180, 9)[:-1] + 22.5
    path = tmp_path / "ll.nc"
    with netCDF4.Dataset(path, "w") as dataset:
        dataset.createDimension("lat", lat.size)
        dataset.createDimension("lon", lon.size)
        dataset.createVariable("lat", "f8", ("lat",))[:] = lat
        dataset.createVariable("lon", "f8", ("lon",))[:] = lon
        dataset.createVariable("mrg", "f4", ("lat", "lon"))[:] = lat[:, None] + 0 * lon
    layer = open_source(path, "latlon_netcdf", "mrg", "EPSG:4326")
    np.testing.assert_array_equal(layer.data.y, lat)
    assert value_at(layer, lon[2], -74.0) == -74.0
    assert "non-uniform" in layer.description
    with pytest.raises(SourceFormatError, match=r"ll.nc: no variable 'est'"):
        open_source(path, "latlon_netcdf", "est", "EPSG:4326")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SourceFormatError, match="nope.tif: source file not found"):
        open_source(tmp_path / "nope.tif", "geotiff", None, "EPSG:3031")


# --- incomplete files ---------------------------------------------------------------------------


def _cut(source, folder, fraction=0.5):
    path = folder / source.name
    shutil.copyfile(source, path)
    os.truncate(path, int(path.stat().st_size * fraction))
    return path


@pytest.mark.parametrize(
    ("name", "fmt", "variable", "crs"),
    [
        ("200km_GHF_windowCenters.nc", "gmt_netcdf", "z", "EPSG:3031"),
        ("SMOS_IceThickness_2015_300.nc", "latlon_netcdf", "mrg", "EPSG:4326"),
        ("ASE_MagneticCompilation_Dziadeketal_250m.tif", "geotiff", None, "EPSG:3031"),
    ],
)
def test_truncated_file_is_refused_by_its_reader(
    small_standins, tmp_path, name, fmt, variable, crs
):
    """No reader turns missing bytes into numbers (libnetcdf reads a cut classic file as 0s)."""
    path = _cut(small_standins / name, tmp_path)
    with pytest.raises(SourceFormatError, match=rf"^{path} is truncated: its header declares"):
        open_source(path, fmt, variable, crs)


def test_truncated_shapefile_is_refused_by_read_polygons(small_standins, tmp_path):
    with zipfile.ZipFile(small_standins / "WAIS_Max_Extent.zip") as archive:
        archive.extractall(tmp_path)
    shp = tmp_path / "WAIS_Max_Extent" / "WAIS_Jan_2017_Polygons.shp"
    os.truncate(shp, shp.stat().st_size // 2)
    with pytest.raises(SourceFormatError, match=rf"^{shp} is truncated: its header declares"):
        read_polygons(shp, "Feature_Cl", {"Lake": 1, "Channel": 2}, 0, "EPSG:3031")


def test_convert_source_names_the_source_url_and_file(small_standins, tmp_path, repo_spec_path):
    spec = load_spec(repo_spec_path)
    source = spec.source("geothermal_heat_flow_200km")
    path = _cut(small_standins / "200km_GHF_windowCenters.nc", tmp_path)
    fetched = FetchedSource(source=source, folder=tmp_path, url=source.download_url, sha256="0")
    with pytest.raises(SourceFormatError) as info:
        convert_source(spec, fetched)
    assert str(info.value).startswith(
        f"geothermal_heat_flow_200km ({source.download_url}): {path} is truncated: "
    )


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_failing_lazy_read_reaches_the_caller_as_source_format_error(tmp_path, scheduler):
    """A GeoTIFF cut after it was opened: the window read fails inside a dask task. The
    threaded scheduler re-raises the task's own exception; dask.distributed pickles it, and
    falls back to a bare Exception when that fails (e.g. with GDAL's error as its context)."""
    path = tmp_path / "late.tif"
    values = np.ones((400, 400), np.float32)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=400,
        height=400,
        count=1,
        dtype="float32",
        crs="EPSG:3031",
        transform=from_origin(0, 40_000, 100, 100),
        tiled=True,
        blockxsize=128,
        blockysize=128,
    ) as dst:
        dst.write(values, 1)
    layer = open_source(path, "geotiff", None, "EPSG:3031")
    os.truncate(path, path.stat().st_size // 3)
    grid = TargetGrid("EPSG:3031", (0, 0, 40_000, 40_000), 500, chunk_size=40)
    resampled = resample_layer(layer, grid, "linear")
    with contextlib.ExitStack() as stack:
        if scheduler == "distributed":
            cluster = stack.enter_context(
                LocalCluster(n_workers=1, processes=False, dashboard_address=None)
            )
            client = stack.enter_context(Client(cluster, set_as_default=False))
            stack.enter_context(dask.config.set(scheduler=client))
        else:
            stack.enter_context(dask.config.set(scheduler=scheduler))
        with pytest.raises(SourceFormatError) as info:
            resampled.compute()
    assert str(info.value).startswith(f"{path}: cannot read rows ")
    assert "(truncated or damaged?)" in str(info.value)
