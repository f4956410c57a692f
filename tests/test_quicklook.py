"""Quicklook PNGs: readable maps, one per variable and time step, never loading a layer."""

import io
import tracemalloc

import dask
import dask.array as da
import fsspec
import numpy as np
import pytest
import xarray as xr
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm
from matplotlib.image import imread
from PIL import Image

from polar_cube.cube.quicklook import (
    colour_scale,
    display_layer,
    quicklook_png,
    quicklook_thumbnails,
    thinned,
    thumbnail_png,
    write_quicklooks,
)
from polar_cube.cube.report import png_data_uri
from polar_cube.grid import TargetGrid
from tests.test_verify import SPEC, make_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 21_000, 32)  # 101 x 93 cells


def layer(ny, nx, attrs=None, values=None):
    """A (y, x) layer with ascending 1 km cell centres."""
    if values is None:
        values = np.add.outer(np.arange(ny), np.arange(nx)).astype("float32")
    coords = {"y": np.arange(ny) * 1000.0 + 500, "x": np.arange(nx) * 1000.0 + 500}
    return xr.DataArray(values, dims=("y", "x"), coords=coords, attrs=attrs or {})


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return imread(io.BytesIO(png), format="png")


def has_colour(image: np.ndarray, rgb, tolerance=0.02) -> bool:
    return bool((np.abs(image[..., :3] - np.asarray(rgb[:3])).max(axis=-1) < tolerance).any())


@pytest.mark.parametrize("shape", [(50, 200), (200, 50), (120, 100)])
def test_the_map_has_the_layer_aspect(shape):
    """All NaN: the map is the light-grey box; its aspect is the layer's (1 km cells)."""
    values = np.full(shape, np.nan, dtype="float32")
    image = decode(quicklook_png(layer(*shape, values=values), title="empty", units="m"))
    grey = np.abs(image[..., :3] - 0xD9 / 255).max(axis=-1) < 0.01
    rows = np.flatnonzero(grey.sum(axis=1) > grey.sum(axis=1).max() / 2)  # not text pixels
    columns = np.flatnonzero(grey.sum(axis=0) > grey.sum(axis=0).max() / 2)
    height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
    assert width / height == pytest.approx(shape[1] / shape[0], rel=0.03)
    assert max(width, height) > 500


def test_a_small_valid_area_is_zoomed_into():
    values = np.full((2000, 1500), np.nan, dtype="float32")
    values[1200:1240, 300:330] = 1.0  # 40 x 30 cells, invisible at every 10th cell
    data = layer(2000, 1500, values=values)
    zoomed = display_layer(data, max_pixels=200)
    assert zoomed.sizes["y"] < 100 and zoomed.sizes["x"] < 100
    assert zoomed.y.min() < 1200 * 1000 and zoomed.y.max() > 1240 * 1000
    assert np.isfinite(zoomed.values).sum() == 40 * 30  # full resolution inside
    assert display_layer(data, max_pixels=200, zoom_to_data=False).shape == (200, 150)
    assert display_layer(layer(2000, 1500), max_pixels=200).shape == (200, 150)


def test_write_quicklooks_writes_one_png_per_variable_and_time_step(tmp_path):
    folder = tmp_path / "nested" / "quicklooks"
    urls = write_quicklooks(make_dataset(SMALL), SPEC, str(folder), max_pixels=200)
    expected = []
    for variable in SPEC.variables:
        if variable.dims[0] == "time":
            expected += [f"{variable.name}_2013-01-01.png", f"{variable.name}_2017-01-01.png"]
        else:
            expected.append(f"{variable.name}.png")
    assert urls == [f"{folder}/{name}" for name in expected]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    image = imread(folder / "ice_thickness.png")
    assert image.shape[0] > 300 and image.shape[1] > 300


def test_write_quicklooks_goes_through_fsspec():
    cube = make_dataset(SMALL)[["magnetic_anomaly", "thw_70", "crs"]]
    urls = write_quicklooks(cube, SPEC, "memory://quicklooks/run-1/", max_pixels=100)
    assert urls == [
        "memory://quicklooks/run-1/magnetic_anomaly.png",
        "memory://quicklooks/run-1/thw_70_2013-01-01.png",
        "memory://quicklooks/run-1/thw_70_2017-01-01.png",
    ]
    with fsspec.open(urls[1], "rb") as stream:
        assert stream.read().startswith(PNG_SIGNATURE)


def test_thumbnails_are_small_palette_pngs_named_like_the_quicklooks():
    cube = make_dataset(SMALL)
    thumbnails = quicklook_thumbnails(cube, SPEC)
    full = write_quicklooks(cube, SPEC, "memory://quicklooks/thumbs/", max_pixels=200)
    assert list(thumbnails) == [url.rsplit("/", 1)[1] for url in full]
    for png in thumbnails.values():
        image = decode(png)
        assert 150 < image.shape[1] < 400 and 100 < image.shape[0] < 400
        assert len(png) < 40_000
    with Image.open(io.BytesIO(thumbnails["ice_thickness.png"])) as opened:
        assert opened.mode == "P" and len(opened.getcolors()) <= 64
    uri = png_data_uri(thumbnails["ice_thickness.png"])
    assert uri.startswith("data:image/png;base64,iVBORw0KGgo")  # the PNG signature


def test_a_thumbnail_keeps_the_map_colours():
    values = np.linspace(0, 1, 60 * 90, dtype="float32").reshape(60, 90)
    image = decode(thumbnail_png(layer(60, 90, values=values), title="ramp", units="m"))
    viridis = colormaps["viridis"]
    for level in (0.1, 0.5, 0.9):
        assert has_colour(image, viridis(level), tolerance=0.06)


def test_a_flag_variable_gets_one_colour_per_class():
    attrs = {"flag_values": [0, 1, 2], "flag_meanings": "none lake channel"}
    values = (np.arange(60 * 90).reshape(60, 90) // 5 % 3).astype("float32")
    values[:10, :10] = np.nan
    cmap, norm, ticks, labels = colour_scale(values, attrs)
    assert isinstance(norm, BoundaryNorm) and cmap.N == 3
    assert ticks == [0, 1, 2] and labels == ["none", "lake", "channel"]
    assert len({tuple(cmap(norm(v))) for v in (0, 1, 2)}) == 3
    image = decode(quicklook_png(layer(60, 90, attrs, values), title="Lakes", units="1"))
    for class_colour in colormaps["tab10"].colors[:3]:
        assert has_colour(image, class_colour)


def test_a_flag_variable_uses_its_color_bar_name():
    attrs = {"flag_values": [0, 1], "flag_meanings": "no_lake lake", "color_bar_name": "GnBu"}
    cmap, norm, _, _ = colour_scale(np.array([0.0, 1.0]), attrs)
    gnbu = colormaps["GnBu"]
    assert np.allclose(cmap(norm(0.0)), gnbu(0.15)) and np.allclose(cmap(norm(1.0)), gnbu(0.9))


def test_signed_data_is_diverging_and_centred_on_zero():
    values = np.linspace(-300, 100, 60 * 90, dtype="float32").reshape(60, 90)
    cmap, norm, ticks, _ = colour_scale(values, {})
    assert cmap.name.startswith("RdBu_r") and ticks is None
    assert norm.vmin == -norm.vmax and norm(0.0) == 0.5
    image = decode(quicklook_png(layer(60, 90, values=values), title="Anomaly", units="nT"))
    assert has_colour(image, colormaps["RdBu_r"](0.0))


def test_positive_data_is_sequential_and_color_bar_name_wins():
    values = np.linspace(1, 100, 100, dtype="float32").reshape(10, 10)
    cmap, norm, _, _ = colour_scale(values, {})
    assert cmap.name.startswith("viridis") and 1 <= norm.vmin < norm.vmax <= 100
    assert colour_scale(values, {"color_bar_name": "magma"})[0].name.startswith("magma")
    assert colour_scale(values, {"color_bar_name": "no-such-map"})[0].name.startswith("viridis")


def test_nan_is_transparent_over_a_light_grey_background():
    values = np.full((40, 40), 5.0, dtype="float32")
    values[:20] = np.nan
    cmap, _, _, _ = colour_scale(values, {})
    assert cmap(np.nan)[3] == 0
    image = decode(quicklook_png(layer(40, 40, values=values), title="Half", units="m"))
    assert has_colour(image, (0xD9 / 255,) * 3)


def test_descending_y_is_drawn_north_up():
    values = np.zeros((40, 40), dtype="float32")
    values[-10:] = 1.0  # the northern rows (largest y)
    north_first = layer(40, 40, values=values).isel(y=slice(None, None, -1))
    a = decode(quicklook_png(layer(40, 40, values=values), title="t", units="m"))
    b = decode(quicklook_png(north_first, title="t", units="m"))
    assert np.array_equal(a, b)


def test_thinning_keeps_it_lazy_and_bounded():
    lazy = xr.DataArray(da.zeros((21210, 19530), chunks=2048, dtype="float32"), dims=("y", "x"))
    small = thinned(lazy, 1200)
    assert isinstance(small.data, da.Array)
    assert max(small.shape) <= 1200 and small.shape == (1179, 1085)  # every 18th cell
    assert thinned(layer(30, 40), 1200).shape == (30, 40)


def test_a_big_layer_is_never_loaded_whole():
    """An 8000 x 8000 float32 layer is 256 MB; the quicklook reads it chunk by chunk.

    (Without thinning, max_pixels=8000, the same call peaks above 1 GB.)
    """

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        x = np.arange(x0, x1, dtype="float32") - 4000
        return np.add.outer(np.arange(y0, y1, dtype="float32"), x)

    lazy = da.map_blocks(block, chunks=((1000,) * 8, (1000,) * 8), dtype="float32")
    coords = {"y": np.arange(8000) * 100.0, "x": np.arange(8000) * 100.0}
    data = xr.DataArray(lazy, dims=("y", "x"), coords=coords)
    quicklook_png(layer(10, 10), title="warm-up", units="m")  # fonts, caches
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            png = quicklook_png(data, title="Big", units="nT", max_pixels=400)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"  # ~5 MB thinned data, ~45 MB drawing
    assert decode(png).shape[2] == 4


def test_a_time_stack_needs_one_step():
    stack = xr.concat([layer(10, 10), layer(10, 10)], dim="time")
    with pytest.raises(ValueError, match="one \\(y, x\\) layer"):
        quicklook_png(stack, title="t", units="m")
    assert decode(quicklook_png(stack.isel(time=[0]), title="t", units="m")).ndim == 3


def coarsened(data: xr.DataArray, times: int) -> xr.DataArray:
    for _ in range(times):
        data = data.coarsen(y=2, x=2, boundary="pad").mean()
    return data


def test_the_finest_overview_level_that_fits_is_drawn():
    full = layer(2000, 1500)
    resolutions = [coarsened(full, level) for level in (1, 2, 3)]  # 1000, 500, 250 rows
    drawn = display_layer(resolutions, max_pixels=600)
    assert drawn.shape == (500, 375)  # level 2, whole: nothing thinned
    np.testing.assert_array_equal(drawn.values, resolutions[1].values)
    assert display_layer(resolutions, max_pixels=200).shape == (125, 94)  # level 3, thinned


def test_a_small_valid_area_is_zoomed_into_from_a_finer_level():
    values = np.full((2000, 1500), np.nan, dtype="float32")
    values[1200:1280, 300:360] = 1.0
    resolutions = [coarsened(layer(2000, 1500, values=values), level) for level in (1, 2, 3)]
    zoomed = display_layer(resolutions, max_pixels=200)
    assert np.isfinite(zoomed.values).sum() == 40 * 30  # level 1 around the area
    assert zoomed.x[1] - zoomed.x[0] == 2000
    assert zoomed.y.min() < 1200 * 1000 and zoomed.y.max() > 1280 * 1000


def test_with_overviews_the_cube_data_is_never_read(tmp_path):
    cube = make_dataset(SMALL)[["magnetic_anomaly", "thw_70", "crs"]]
    overview = cube.coarsen(y=2, x=2, boundary="pad").mean().load()

    def unreadable(block_info=None):
        raise AssertionError("the full-resolution cube was read")

    for name in ("magnetic_anomaly", "thw_70"):
        data = cube[name]
        chunks = tuple((size,) for size in data.shape)
        lazy = da.map_blocks(unreadable, chunks=chunks, dtype="float32")
        cube[name] = data.copy(data=lazy)
    urls = write_quicklooks(cube, SPEC, str(tmp_path), max_pixels=100, overviews=[overview])
    assert [url.rsplit("/", 1)[-1] for url in urls] == [
        "magnetic_anomaly.png",
        "thw_70_2013-01-01.png",
        "thw_70_2017-01-01.png",
    ]
    assert all(decode((tmp_path / url.rsplit("/", 1)[-1]).read_bytes()).ndim == 3 for url in urls)
    with pytest.raises(AssertionError, match="was read"):  # the guard is live
        write_quicklooks(cube, SPEC, str(tmp_path), max_pixels=100)
