"""The resampler against analytic fields, at cell centres, and against GDAL's warper."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from osgeo import gdal
from pyproj import Transformer
from rasterio.transform import from_origin

from polar_cube.blank import is_blank
from polar_cube.grid import TargetGrid
from polar_cube.resample import BlockResampler, fractional_index, resample_layer
from polar_cube.sources.readers import SourceLayer, open_source
from polar_cube.spec import ValidCondition

gdal.UseExceptions()


def layer_of(values, xs, ys, crs="EPSG:3031"):
    data = xr.DataArray(values, dims=("y", "x"), coords={"y": ys, "x": xs})
    return SourceLayer(data=data, crs=crs, description="test layer")


def test_fractional_index_on_uniform_descending_and_non_uniform_axes():
    axis = np.array([0.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(
        fractional_index(axis, np.array([0, 5, 30, -5, 34.9])), [0, 0.5, 3, -0.5, 3.49]
    )
    assert np.isnan(fractional_index(axis, np.array([-5.1, 35.0, np.nan]))).all()
    np.testing.assert_allclose(fractional_index(axis[::-1], np.array([30.0, 25.0])), [0, 0.5])
    uneven = np.array([0.0, 1.0, 4.0])
    np.testing.assert_allclose(fractional_index(uneven, np.array([0.5, 2.5, 4.0])), [0.5, 1.5, 2])


@pytest.mark.parametrize("descending_y", [False, True])
def test_bilinear_reproduces_a_plane_exactly(descending_y):
    xs = np.arange(-2_000_000.0, -1_900_000.0, 5_000.0)
    ys = np.arange(-500_000.0, -420_000.0, 5_000.0)
    if descending_y:
        ys = ys[::-1]
    plane = 3.0 * xs[np.newaxis, :] / 1000 - 2.0 * ys[:, np.newaxis] / 1000 + 7.0
    grid = TargetGrid("EPSG:3031", (-2_000_000, -500_000, -1_905_000, -425_000), 1000, 32)
    out = resample_layer(layer_of(plane, xs, ys), grid, "linear").values
    gx, gy = np.meshgrid(grid.x, grid.y)
    expected = 3.0 * gx / 1000 - 2.0 * gy / 1000 + 7.0
    within_centres = (gx >= xs.min()) & (gx <= xs.max()) & (gy >= ys.min()) & (gy <= ys.max())
    assert within_centres.sum() > 1000
    np.testing.assert_allclose(out[within_centres], expected[within_centres], rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == grid.shape


def test_values_land_on_cell_centres():
    """A coarse source sampled at its own cell centres gives back its own values."""
    xs = -2_000_000 + 500 + 1000 * np.arange(10)
    ys = -500_000 + 500 + 1000 * np.arange(8)
    values = np.arange(80, dtype=float).reshape(8, 10) ** 1.5
    grid = TargetGrid("EPSG:3031", (-2_000_000, -500_000, -1_990_000, -492_000), 1000)
    for method in ("linear", "nearest"):
        out = resample_layer(layer_of(values, xs, ys), grid, method).values
        np.testing.assert_allclose(out, values, rtol=1e-6)


def test_nearest_picks_the_cell_containing_the_centre():
    xs = np.array([500.0, 1500.0])  # cells [0,1000) and [1000,2000)
    ys = np.array([500.0, 1500.0])
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    grid = TargetGrid("EPSG:3031", (0, 0, 2000, 2000), 100)
    out = resample_layer(layer_of(values, xs, ys), grid, "nearest").values
    assert out[0, 0] == 1 and out[0, 9] == 1 and out[0, 10] == 2 and out[19, 19] == 4
    assert out[9, 0] == 1 and out[10, 0] == 3


def test_masking_and_outside_are_nan():
    xs = np.array([500.0, 1500.0, 2500.0])
    ys = np.array([500.0, 1500.0])
    values = np.array([[1.0, -5.0, 3.0], [1.0, 2.0, 3.0]])
    grid = TargetGrid("EPSG:3031", (0, 0, 4000, 2000), 500)
    block = BlockResampler(
        layer_of(values, xs, ys), grid, "nearest", (ValidCondition.parse("> 0"),)
    )
    out = block.resample_block(slice(0, 4), slice(0, 8))
    assert np.isnan(out[0, 2]) and np.isnan(out[1, 3])  # masked cell
    assert out[0, 0] == 1 and out[3, 5] == 3
    assert np.isnan(out[:, 6:]).all()  # beyond the source's east edge
    for method in ("nearest", "linear"):  # a chunk the source does not reach: a blank
        resampler = BlockResampler(layer_of(values, xs, ys), grid, method)
        assert is_blank(resampler.resample_block(slice(0, 4), slice(7, 8)))
        assert not is_blank(resampler.resample_block(slice(0, 4), slice(5, 8)))
        # a chunk over a part of the source without data (a sea-ice source over land)
        empty = BlockResampler(layer_of(np.full_like(values, np.nan), xs, ys), grid, method)
        assert is_blank(empty.resample_block(slice(0, 4), slice(0, 8)))
    lat, lon = np.linspace(-89, -60, 30), np.linspace(-179.5, 179.5, 360)
    latlon = layer_of(np.full((lat.size, lon.size), np.nan), lon, lat, crs="EPSG:4326")
    latlon_grid = TargetGrid("EPSG:3031", (-2_602_500, -1_626_000, -649_500, 495_000), 1000)
    for method in ("nearest", "linear"):  # across CRSs too
        empty = BlockResampler(latlon, latlon_grid, method)
        assert is_blank(empty.resample_block(slice(0, 40), slice(0, 40)))


def test_latlon_source_uses_its_real_non_uniform_latitudes():
    """Latitude itself, on a non-uniform axis, must come out as each cell's true latitude."""
    lat = np.sort(np.concatenate([np.linspace(-89, -60, 15), [-61.3, -75.2, -80.7]]))
    lon = np.linspace(-179.5, 179.5, 360)
    field = np.repeat(lat[:, np.newaxis], lon.size, axis=1)
    grid = TargetGrid("EPSG:3031", (-2_602_500, -1_626_000, -649_500, 495_000), 3000)
    out = resample_layer(layer_of(field, lon, lat, crs="EPSG:4326"), grid, "linear").values
    to_lonlat = Transformer.from_crs("EPSG:3031", "EPSG:4326", always_xy=True)
    _, true_lat = to_lonlat.transform(*np.meshgrid(grid.x, grid.y))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, true_lat, atol=1e-4)


def write_tif(path, values, west, north, res):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=values.shape[1],
        height=values.shape[0],
        count=1,
        dtype="float32",
        crs="EPSG:3031",
        transform=from_origin(west, north, res, res),
        nodata=np.nan,
    ) as dst:
        dst.write(values, 1)


@pytest.mark.parametrize(("method", "gdal_method"), [("linear", "bilinear"), ("nearest", "near")])
def test_geotiff_agrees_with_gdal_warp(tmp_path, method, gdal_method):
    """250 m source with NaN holes and margins -> 100 m, as in the cube."""
    rng = np.random.default_rng(7)
    width, height, res, west, north = 48, 40, 250.0, -1_500_000.0, -400_000.0
    values = rng.normal(size=(height, width)).cumsum(0).cumsum(1).astype(np.float32) * 50
    values[:7, :11] = np.nan
    values[20:25, 15:19] = np.nan
    values[-3:, :] = np.nan
    path = tmp_path / "magnetic.tif"
    write_tif(path, values, west, north, res)
    bbox = (west - 1000, north - height * res - 1000, west + width * res + 1000, north + 1000)
    grid = TargetGrid("EPSG:3031", bbox, 100.0, chunk_size=64)  # several chunks
    ours = resample_layer(open_source(Path(path), "geotiff", None, "EPSG:3031"), grid, method)
    ours = ours.values[::-1]  # GDAL writes north-up rows
    theirs = gdal.Warp(
        "",
        str(path),
        format="MEM",
        outputBounds=bbox,
        xRes=100.0,
        yRes=100.0,
        resampleAlg=gdal_method,
        dstSRS="EPSG:3031",
        dstNodata=np.nan,
    ).ReadAsArray()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    assert np.isfinite(ours).sum() > 10_000
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3, equal_nan=True)
