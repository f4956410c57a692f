"""Deterministic stand-ins for the Polar Data Cube's source downloads.

The real files cannot be downloaded here, so :func:`make_standins` writes files with the real
names, formats and archive layouts and with plausible values (see /work/shared/SOURCES.md).
Every value is a deterministic function of seed constants and of (x, y), and archives carry
fixed timestamps, so each run writes the same bytes. Scales: ``small`` (seconds, for tests)
and ``full`` (real sizes).

A source whose spec entry has a ``standin`` description (`polar_cube.spec.GridStandin`,
`PolygonStandin`) gets a generic stand-in of its format (:func:`write_described_standin`):
the files its variables read, inside the spec's archive type, under the download's name.
No code is needed for a new source. The ten real sources keep their hand-made writers
(`make.REALISTIC_WRITERS`, by download file name), flat in ``out_dir``.

One module per source format, each with its real sources' writers (its docstring describes
their files) and its generic writer of described stand-ins:

- `gmt_netcdf`: the six Dziadek et al. GMT grids (Curie depth, heat flow, uncertainty);
- `geotiff`: the ASE magnetic compilation and the Thwaites lake masks (a tar of GeoTIFFs);
- `polygons`: the WAIS lakes and channels (a zip of shapefile, GeoJSON and KMZ);
- `latlon_netcdf`: CryoSMOS ice thickness on EASE-Grid 2.0 lat/lon axes.

Below them `common` (smooth random fields, described grids) and `packing` (deterministic tar
and zip); above them `make`, which picks the writer of each source. A new format is one module
here and one line in `make.DESCRIBED_WRITERS`.
"""

from polar_cube.sources.standins.common import CUBE_BBOX, smooth_field
from polar_cube.sources.standins.gmt_netcdf import write_gmt_grid
from polar_cube.sources.standins.make import (
    DESCRIBED_WRITERS,
    REALISTIC_WRITERS,
    make_standins,
    write_described_standin,
)

__all__ = [
    "CUBE_BBOX",
    "DESCRIBED_WRITERS",
    "REALISTIC_WRITERS",
    "make_standins",
    "smooth_field",
    "write_described_standin",
    "write_gmt_grid",
]
