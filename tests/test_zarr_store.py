"""Per-dataset cubes on disk: published layout, readable by GDAL, never half-written."""

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from osgeo import gdal

from polar_cube.grid import TargetGrid
from polar_cube.zarr_store import (
    add_grid_coords,
    stored_fingerprint,
    stored_levels_fingerprint,
    write_zarr_atomically,
)

gdal.UseExceptions()
GRID = TargetGrid("EPSG:3031", (-2_602_500, -1_626_000, -2_502_500, -1_546_000), 500, 64)


def dataset(value=1.0, fail=False):
    def block(block_info=None):
        if fail and block_info[None]["chunk-location"] == (1, 1):
            raise RuntimeError("boom in the middle of writing")
        shape = block_info[None]["chunk-shape"]
        return np.full(shape, value, dtype=np.float32)

    static = da.map_blocks(block, chunks=GRID.chunks(), dtype=np.float32)
    stepped = da.stack([static, static + 1])
    ds = xr.Dataset(
        {"static": (("y", "x"), static), "stepped": (("time", "y", "x"), stepped)},
        coords={"time": np.array(["2013-01-01", "2017-01-01"], dtype="datetime64[ns]")},
    )
    ds.attrs["polar_cube_inputs_sha256"] = f"fingerprint-{value}"
    return add_grid_coords(ds, GRID)


def test_layout_is_zarr2_consolidated_chunked_ascending(tmp_path):
    target = write_zarr_atomically(dataset(), tmp_path / "cube.zarr", GRID.chunk_size)
    assert (target / ".zmetadata").is_file() and (target / ".zgroup").is_file()
    zarray = json.loads((target / "stepped" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["dtype"] == "<f4"
    assert zarray["chunks"] == [1, 64, 64]
    opened = xr.open_zarr(target, consolidated=True)
    assert (np.diff(opened.x) > 0).all() and (np.diff(opened.y) > 0).all()
    assert opened.x[0] == GRID.bbox[0] + 250 and opened.y[0] == GRID.bbox[1] + 250
    assert opened.static.attrs["grid_mapping"] == "crs"
    assert "EPSG" in opened.crs.attrs["crs_wkt"] or "Polar" in opened.crs.attrs["crs_wkt"]
    assert stored_fingerprint(target) == "fingerprint-1.0"
    assert float(opened.stepped.isel(time=1).mean()) == 2.0


def test_gdal_reads_it_in_the_right_place(tmp_path):
    target = write_zarr_atomically(dataset(), tmp_path / "cube.zarr", GRID.chunk_size)
    raster = gdal.Open(f'ZARR:"{target}":/static')
    assert (raster.RasterXSize, raster.RasterYSize) == (GRID.width, GRID.height)
    x0, dx, _, y0, _, dy = raster.GetGeoTransform()
    assert x0 == GRID.bbox[0] and dx == GRID.resolution
    assert {y0, y0 + dy * raster.RasterYSize} == {GRID.bbox[1], GRID.bbox[3]}
    assert raster.GetSpatialRef().GetAuthorityCode(None) == "3031"


def test_a_failed_write_leaves_the_previous_cube_intact(tmp_path):
    target = tmp_path / "cube.zarr"
    write_zarr_atomically(dataset(1.0), target, GRID.chunk_size)
    with pytest.raises(RuntimeError, match="boom"):
        write_zarr_atomically(dataset(5.0, fail=True), target, GRID.chunk_size)
    assert float(xr.open_zarr(target).static.mean()) == 1.0
    assert stored_levels_fingerprint(tmp_path / "cube.levels") == "fingerprint-1.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.levels", "cube.zarr"]
    write_zarr_atomically(dataset(5.0), target, GRID.chunk_size)
    assert float(xr.open_zarr(target).static.mean()) == 5.0
    assert stored_levels_fingerprint(tmp_path / "cube.levels") == "fingerprint-5.0"


def test_chunks_still_being_written_when_a_pass_fails_leave_nothing_behind(tmp_path, monkeypatch):
    """A slow disk: chunk writes in flight when another block fails end after the failed
    pass removed its temporary folders, and must not make them again."""
    import threading
    import time

    from polar_cube import zarr_store

    write_chunk, late = zarr_store.write_chunk, threading.Event()

    def slow_write_chunk(array, index, *args, **kwargs):
        if index == (1, 1):  # half-way through another thread's write
            time.sleep(0.1)
            raise OSError("boom: the disk failed")
        time.sleep(0.3)
        try:
            return write_chunk(array, index, *args, **kwargs)
        finally:
            late.set()

    monkeypatch.setattr(zarr_store, "write_chunk", slow_write_chunk)
    target = tmp_path / "cube.zarr"
    with pytest.raises(OSError, match="boom"):
        write_zarr_atomically(dataset(5.0), target, GRID.chunk_size)
    assert late.wait(5)
    time.sleep(0.5)  # the writes in flight have ended
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_interrupted_swap_is_repaired(tmp_path):
    target = tmp_path / "cube.zarr"
    write_zarr_atomically(dataset(1.0), target, GRID.chunk_size)
    target.rename(tmp_path / ".cube.zarr.old-deadbeef")  # crash between the two renames
    (tmp_path / ".cube.zarr.tmp-cafebabe").mkdir()
    write_zarr_atomically(dataset(2.0), tmp_path / "other.zarr", GRID.chunk_size)
    from polar_cube.zarr_store import remove_stale_temporaries

    remove_stale_temporaries(target)
    assert float(xr.open_zarr(target).static.mean()) == 1.0
    assert not list(tmp_path.glob(".cube.zarr.*"))
