"""Writing cubes as zarr (format 2, consolidated): CF grid mapping, chunked, atomic."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np
import xarray as xr
from numcodecs import Blosc

from polar_cube.grid import TargetGrid

GRID_MAPPING = "crs"
FINGERPRINT_ATTR = "polar_cube_inputs_sha256"
_COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)  # GDAL 3.6 reads blosc


def grid_mapping_variable(grid: TargetGrid) -> xr.DataArray:
    """The CF grid-mapping variable every data variable points to."""
    attrs = grid.pyproj_crs.to_cf()
    attrs["spatial_ref"] = attrs["crs_wkt"]  # GDAL looks for either name
    attrs["GeoTransform"] = f"{grid.bbox[0]} {grid.resolution} 0 {grid.bbox[1]} 0 {grid.resolution}"
    return xr.DataArray(np.int32(0), attrs=attrs)


def add_grid_coords(dataset: xr.Dataset, grid: TargetGrid) -> xr.Dataset:
    """Attach CF attributes to x/y and the `crs` grid mapping; point variables at it."""
    dataset = dataset.assign_coords(
        x=(
            "x",
            grid.x,
            {
                "standard_name": "projection_x_coordinate",
                "long_name": "x coordinate of projection",
                "units": "m",
            },
        ),
        y=(
            "y",
            grid.y,
            {
                "standard_name": "projection_y_coordinate",
                "long_name": "y coordinate of projection",
                "units": "m",
            },
        ),
    )
    dataset[GRID_MAPPING] = grid_mapping_variable(grid)
    gdal_crs = {"wkt": grid.pyproj_crs.to_wkt()}  # GDAL's Zarr driver reads `_CRS`, not CF
    for name in dataset.data_vars:
        if name != GRID_MAPPING:
            dataset[name].attrs.update(grid_mapping=GRID_MAPPING, _CRS=gdal_crs)
    return dataset


def encoding_for(dataset: xr.Dataset, chunk_size: int) -> dict[str, dict]:
    """float32, NaN fill, chunks time=1 × chunk_size × chunk_size."""
    encoding: dict[str, dict] = {}
    for name, variable in dataset.data_vars.items():
        if name == GRID_MAPPING:
            continue
        chunks = tuple(1 if dim == "time" else chunk_size for dim in variable.dims)
        encoding[name] = {
            "dtype": "float32",
            "chunks": chunks,
            "_FillValue": np.float32(np.nan),
            "compressors": [_COMPRESSOR],
        }
    if "time" in dataset.coords:
        encoding["time"] = {"units": "days since 1970-01-01", "calendar": "proleptic_gregorian"}
    return encoding


def rechunk_for_writing(dataset: xr.Dataset, chunk_size: int) -> xr.Dataset:
    chunks = {"y": chunk_size, "x": chunk_size}
    if "time" in dataset.dims:
        chunks["time"] = 1
    return dataset.chunk(chunks)


def write_zarr(dataset: xr.Dataset, store: str | Path | MutableMapping, chunk_size: int) -> None:
    """Write chunk by chunk as zarr format 2 with consolidated metadata, on the current dask
    scheduler (see `polar_cube.compute.dask_compute`)."""
    dataset = rechunk_for_writing(dataset, chunk_size)
    dataset.to_zarr(
        store,
        mode="w",
        zarr_format=2,
        consolidated=True,
        encoding=encoding_for(dataset, chunk_size),
        write_empty_chunks=False,
    )


def write_zarr_atomically(dataset: xr.Dataset, target: Path, chunk_size: int) -> Path:
    """Write `dataset` into a hidden temp folder, then swap it in.

    Whoever opens `target` sees the old complete cube or the new complete cube, never a
    partial one; a crash leaves only a `.tmp-*` folder, removed by the next write.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_zarr(dataset, temporary, chunk_size)
        replace_directory(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def replace_directory(new: Path, target: Path) -> None:
    """Swap `new` in at `target` by renames; the old version is removed afterwards."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(target: Path) -> None:
    """Clear what an interrupted write left; restore the old cube if the swap was cut short."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.rename(target)


def stored_fingerprint(target: Path) -> str | None:
    """The inputs fingerprint a complete cube at `target` was built from, if any."""
    return stored_attrs(Path(target) / ".zmetadata").get(FINGERPRINT_ATTR)


def stored_attrs(zmetadata: Path | bytes | None) -> dict:
    """Global attributes from consolidated metadata (a file, its bytes, or None: {})."""
    if isinstance(zmetadata, Path):
        zmetadata = zmetadata.read_bytes() if zmetadata.is_file() else None
    if not zmetadata:
        return {}
    return json.loads(zmetadata)["metadata"].get(".zattrs", {})
