"""GeoTIFFs (rioxarray), opened lazily so only the windows a target chunk needs are read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import rasterio
import rioxarray
from pyproj import CRS

from polar_cube.sources.checks import check_geotiff
from polar_cube.sources.readers import SourceFormatError, SourceLayer

if TYPE_CHECKING:
    from polar_cube.location import StoreLocation


def read_geotiff(
    path: Path, variable: str | None, crs: str, remote: StoreLocation | None = None
) -> SourceLayer:
    """Band 1 (or band `variable`, a 1-based number) with nodata as NaN; refuses a file
    whose strips/tiles do not all lie inside it. With `remote` (the file's copy in a
    bucket), windows are read from there through fsspec (rasterio's `opener`)."""
    band = int(variable) if variable else 1
    check_geotiff(path)
    where = {"filename": path} if remote is None else {"filename": remote.root, "opener": remote.fs}
    try:
        data = rioxarray.open_rasterio(**where, masked=True, cache=False)
    except rasterio.errors.RasterioIOError as error:
        raise SourceFormatError(f"{path}: cannot open as GeoTIFF: {error}") from None
    if band > data.sizes["band"]:
        raise SourceFormatError(f"{path}: has {data.sizes['band']} band(s), spec asks for {band}")
    file_crs = data.rio.crs
    if file_crs is None:  # a GeoTIFF says where it is; one that does not is not the source
        raise SourceFormatError(
            f"{path}: has no CRS (the spec says {crs}): not georeferenced, refusing to guess"
        )
    if not CRS.from_user_input(file_crs).equals(CRS(crs), ignore_axis_order=True):
        raise SourceFormatError(f"{path}: file CRS {file_crs} differs from the spec's {crs}")
    if data.rio.transform().b != 0 or data.rio.transform().d != 0:
        raise SourceFormatError(f"{path}: rotated GeoTIFFs are not supported")
    layer = data.isel(band=band - 1, drop=True).drop_vars("spatial_ref", errors="ignore")
    layer.encoding["source"] = str(where["filename"])
    if remote is not None:  # reopened where the windows are read; not left open through exit
        data.close()
    height, width = layer.shape
    return SourceLayer(
        data=layer,
        crs=crs,
        description=f"Read GeoTIFF band {band} ({width}x{height} px, "
        f"{abs(data.rio.resolution()[0]):g} m), nodata as NaN",
    )
