"""netCDF on 1-D lat/lon axes (e.g. CryoSMOS on EASE-Grid 2.0 axes, latitude NOT uniform)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from polar_cube.sources.checks import check_netcdf
from polar_cube.sources.readers import SourceFormatError, SourceLayer

if TYPE_CHECKING:
    from polar_cube.location import StoreLocation

_LAT_NAMES = ("lat", "latitude")
_LON_NAMES = ("lon", "longitude")


def read_latlon_netcdf(
    path: Path, variable: str | None, crs: str, remote: StoreLocation | None = None
) -> SourceLayer:
    """`variable` on its real lat/lon axes, renamed to (y, x); read lazily, after checking
    that the file is complete. With `remote` (the file's copy in a bucket), windows are read
    from there through an fsspec file (netCDF-4 is HDF5: h5netcdf reads file objects)."""
    check_netcdf(path)
    try:
        if remote is None:
            dataset = xr.open_dataset(path, mask_and_scale=True, cache=False)
        else:
            remote_file = remote.fs.open(remote.path(), "rb")
            dataset = xr.open_dataset(
                remote_file, engine="h5netcdf", mask_and_scale=True, cache=False
            )
    except (OSError, ValueError) as error:
        raise SourceFormatError(f"{path}: cannot open as netCDF: {error}") from None
    if variable not in dataset.data_vars:
        raise SourceFormatError(
            f"{path}: no variable {variable!r} (has: {', '.join(map(str, dataset.data_vars))})"
        )
    data = dataset[variable]
    lat = next((d for d in data.dims if d in _LAT_NAMES), None)
    lon = next((d for d in data.dims if d in _LON_NAMES), None)
    if lat is None or lon is None or data.ndim != 2:
        raise SourceFormatError(f"{path}: {variable} must have dims (lat, lon), has {data.dims}")
    data = data.rename({lat: "y", lon: "x"}).transpose("y", "x")
    data.encoding["source"] = str(path) if remote is None else remote.root
    for axis in ("x", "y"):
        steps = np.diff(data[axis].values)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise SourceFormatError(f"{path}: {lat if axis == 'y' else lon} is not monotonic")
    spacing = np.diff(data["y"].values)
    uniform = np.ptp(spacing) < 1e-6 * np.abs(spacing).mean()
    return SourceLayer(
        data=data,
        crs=crs,
        description=f"Read netCDF variable '{variable}' on its lat/lon axes "
        f"({data.sizes['x']}x{data.sizes['y']}, latitude spacing "
        f"{'uniform' if uniform else 'non-uniform, used as is'})",
    )
