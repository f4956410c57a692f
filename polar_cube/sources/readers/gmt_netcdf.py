"""GMT classic ('cf') netCDF grids: 1-D `z` stored north row first, ranges plus registration."""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from polar_cube.sources.checks import NETCDF_LOCK, check_fits_in_memory, check_netcdf
from polar_cube.sources.readers import SourceFormatError, SourceLayer

_REQUIRED = ("x_range", "y_range", "spacing", "dimension", "z")


def read_gmt_netcdf(
    path: Path, variable: str | None, crs: str, remote: object = None
) -> SourceLayer:
    """Read a GMT classic grid. Rows are flipped so y ascends; node coordinates honour
    `node_offset` (0: gridline, ranges are the outer nodes; 1: pixel, ranges are cell edges).

    The grids are small (window-centre results), so `z` is read whole, after checking that
    the file holds all the data its header declares (workers get the values, so a copy in
    a bucket, `remote`, is not needed).
    """
    name = variable or "z"
    check_netcdf(path)
    with NETCDF_LOCK:
        return _read_locked(path, name, crs)


def _read_locked(path: Path, name: str, crs: str) -> SourceLayer:
    try:
        dataset = netCDF4.Dataset(path)
    except OSError as error:
        raise SourceFormatError(f"{path}: cannot open as netCDF: {error}") from None
    with dataset:
        missing = [v for v in (*_REQUIRED[:-1], name) if v not in dataset.variables]
        if missing:
            raise SourceFormatError(
                f"{path}: not a GMT classic netCDF grid (missing variable(s) {', '.join(missing)})"
            )
        z_var = dataset.variables[name]
        node_offset = int(getattr(z_var, "node_offset", 1))  # GDAL's default when absent
        nx, ny = (int(n) for n in dataset.variables["dimension"][:])
        x = _node_coordinates(path, "x", dataset.variables["x_range"][:], nx, node_offset)
        y = _node_coordinates(path, "y", dataset.variables["y_range"][:], ny, node_offset)
        _check_spacing(path, dataset.variables["spacing"][:], x, y)
        if z_var.size != nx * ny:
            raise SourceFormatError(
                f"{path}: {name} has {z_var.size} values, dimension says {nx}x{ny}"
            )
        check_fits_in_memory(path, f"{name} ({nx}x{ny} values)", nx * ny * 8)
        z = np.ma.filled(z_var[:].astype(np.float64), np.nan)
        units = getattr(z_var, "units", "")
    values = z.reshape(ny, nx)[::-1]  # first stored row is the north one
    registration = "gridline" if node_offset == 0 else "pixel"
    data = xr.DataArray(values, dims=("y", "x"), coords={"y": y, "x": x}, name=name)
    data.attrs["units"] = units
    data.encoding["source"] = str(path)
    return SourceLayer(
        data=data,
        crs=crs,
        description=f"Read GMT classic netCDF grid '{name}' ({registration} registration, "
        f"{nx}x{ny} nodes, north row first)",
    )


def _node_coordinates(
    path: Path, axis: str, value_range: np.ndarray, count: int, node_offset: int
) -> np.ndarray:
    first, last = (float(v) for v in value_range)
    intervals = count - 1 if node_offset == 0 else count
    if count < 1 or intervals < 1 or not last > first:
        raise SourceFormatError(
            f"{path}: {axis}_range {first:g}..{last:g} does not fit {count} nodes "
            f"(node_offset={node_offset})"
        )
    step = (last - first) / intervals
    start = first if node_offset == 0 else first + step / 2
    return start + step * np.arange(count)


def _check_spacing(path: Path, spacing: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    for axis, coords, given in (("x", x, spacing[0]), ("y", y, spacing[1])):
        if len(coords) > 1 and not np.isclose(coords[1] - coords[0], float(given), rtol=1e-6):
            raise SourceFormatError(
                f"{path}: spacing {float(given):g} disagrees with {axis}_range and dimension "
                f"(implied {coords[1] - coords[0]:g}); check node_offset"
            )
