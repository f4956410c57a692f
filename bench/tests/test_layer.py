import sys

import numpy as np
import pytest
import rasterio
import xarray as xr

from bench.layer import METHODS, layer_command, output_name
from bench.measure import measure_command
from polar_cube.sources.standins import make_standins

REPO_SPEC = "cube.geojson"


@pytest.fixture(scope="module")
def on_grid(tmp_path_factory):
    """The small magnetic stand-in (3000 m) put on a 1500 m grid by each method."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sources = tmp_path_factory.mktemp("sources")
    make_standins(sources, "small")
    out = tmp_path_factory.mktemp("out")
    layers = {}
    for method in METHODS:
        target = out / output_name(method)
        command = layer_command(method, sys.executable, sources, target, repo / REPO_SPEC, 1500)
        measured = measure_command(command, out / f"{method}.log", what=method, cwd=repo)
        assert measured.wall_seconds > 0 and measured.peak_rss_bytes > 10 * 2**20
        layers[method] = _read(target)
    return layers


def _read(path) -> np.ndarray:
    """(y ascending, x ascending) float32 values of a method's output."""
    if path.suffix == ".tif":
        with rasterio.open(path) as tif:
            assert tif.profile["tiled"] and tif.profile["compress"] == "zstd"
            return tif.read(1)[::-1]  # north-up rows
    return xr.open_zarr(path)["magnetic_anomaly"].values


def test_every_method_writes_the_same_grid(on_grid):
    shapes = {method: values.shape for method, values in on_grid.items()}
    assert set(shapes.values()) == {(1414, 1302)}, shapes


def test_the_methods_agree_where_each_has_a_value(on_grid):
    ours = on_grid["ours"]
    for method in ("gdalwarp", "original"):
        theirs = on_grid[method]
        both = np.isfinite(ours) & np.isfinite(theirs)
        assert both.sum() > 0.5 * np.isfinite(ours).sum(), method
        np.testing.assert_allclose(ours[both], theirs[both], atol=1e-2, err_msg=method)
    # gdal's bilinear rule is ours: the same cells have values
    assert np.array_equal(np.isfinite(ours), np.isfinite(on_grid["gdalwarp"]))
