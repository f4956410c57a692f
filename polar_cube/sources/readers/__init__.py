"""One reader per source format. Each turns a file into a `SourceLayer` in its own CRS.

Polygons are not read into a source grid: they are rasterized straight onto the target
grid (`polar_cube.rasterize`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xarray as xr

from polar_cube.sources.checks import SourceFormatError

__all__ = ["SourceFormatError", "SourceLayer", "open_source"]

if TYPE_CHECKING:
    from polar_cube.location import StoreLocation


@dataclass(frozen=True)
class SourceLayer:
    """A 2-D layer in its source CRS.

    `data` has dims (y, x) with 1-D monotonic coordinates (cell centres, ascending or
    descending, not necessarily uniform) and may be lazily indexed: the resampler reads
    only the window each target chunk needs. `data.encoding["source"]` is the file's path
    (or its URL in the bucket).
    """

    data: xr.DataArray
    crs: str
    description: str


# (local file, variable, CRS, the file's copy in a bucket or None) -> layer. The local file
# is checked and described; with a copy in a bucket, the lazy data reads from that copy, so
# dask workers that cannot see this machine's disk can compute the chunks.
Reader = Callable[[Path, "str | None", str, "StoreLocation | None"], SourceLayer]


def reader_for(source_format: str) -> Reader:
    from polar_cube.sources.readers.geotiff import read_geotiff
    from polar_cube.sources.readers.gmt_netcdf import read_gmt_netcdf
    from polar_cube.sources.readers.latlon_netcdf import read_latlon_netcdf

    readers: dict[str, Reader] = {
        "gmt_netcdf": read_gmt_netcdf,
        "geotiff": read_geotiff,
        "latlon_netcdf": read_latlon_netcdf,
    }
    return readers[source_format]


def open_source(
    path: Path, fmt: str, variable: str | None, crs: str, remote: StoreLocation | None = None
) -> SourceLayer:
    """Read `variable` of `path` with the reader for `fmt` (lazily from `remote`, if given)."""
    if not path.exists():
        raise SourceFormatError(f"{path}: source file not found")
    return reader_for(fmt)(path, variable, crs, remote)
