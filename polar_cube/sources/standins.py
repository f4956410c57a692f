"""Deterministic stand-ins for the Polar Data Cube's source downloads.

The real files cannot be downloaded here, so :func:`make_standins` writes files with the real
names, formats and archive layouts and with plausible values (see /work/shared/SOURCES.md).
Every value is a deterministic function of the seed constants below and of (x, y), so each
run writes the same bytes. Scales: ``small`` (seconds, for tests) and ``full`` (real sizes).

A source whose spec entry has a ``standin`` description (`polar_cube.spec.GridStandin`,
`PolygonStandin`) gets a generic stand-in of its format (:func:`write_described_standin`):
the files its variables read, inside the spec's archive type, under the download's name.
No code is needed for a new source. The ten real sources keep their hand-made writers
(:data:`REALISTIC_WRITERS`, by download file name).

Files of the ten real sources (flat in ``out_dir``):

- ``{200,300}km_Dziadek_etal_CurieDepth_Results.nc``, ``{200,300}km_GHF_windowCenters.nc``,
  ``{200,300}km_GHF_uncertainty.nc``: GMT classic ("cf") netCDF grids, NETCDF3_CLASSIC, first
  row of ``z`` = north row, no CRS (EPSG:3031 metres). 200 km: x -2470000..-810000,
  y -1480000..380000, gridline registered (node_offset=0, ranges = first/last node); 300 km:
  inset 50 km each side, pixel registered (node_offset=1, ranges = outer cell edges).
  Spacing 10 km (full) / 20 km (small; 40 km does not divide the 200 km spans).
  Curie depth negative km (-25..-6.5), heat flow mW m-2 (50..235, from 1/depth),
  uncertainty mW m-2 (3..73); no holes; the 300 km fields are smoothed 200 km fields.
- ``ASE_MagneticCompilation_Dziadeketal_250m.tif``: GeoTIFF EPSG:3031 float32, bounds = cube
  bbox (-2602500, -1626000, -649500, 495000), 250 m (7812 x 8484, uncompressed, 512x512 tiles,
  written block by block) or 3000 m (651 x 707); nT within +-2100, NaN outside a wobbly
  footprint covering ~2/3 of the bbox.
- ``Malczyk_etal_2020_data_v2.tar``: top-level ``Thw{70,124,142,170}_{2013,2017}_mask.tif``,
  EPSG:3031, 500 m, uint8 0/1 without nodata, small grids within x -1.47e6..-1.37e6,
  y -0.47e6..-0.38e6; both years of a lake share a grid, the lake blob differs.
- ``WAIS_Max_Extent.zip``: ``WAIS_Max_Extent/WAIS_Jan_2017_Polygons.{shp,shx,dbf,prj,cpg}``
  (ESRI WKT polar stereographic, standard parallel -71, no EPSG code), ``.geojson`` (lon/lat)
  and ``.kmz`` (doc.kml, lon/lat). Fields ID, Feature_Cl (Lake/Channel), POLY_AREA (m2),
  Location (Ice Shelf/Grounded Ice/Crosses GL). full: 10478 polygons (10223 Lake, 255
  Channel); small: 500 (488 Lake, 12 Channel). Lakes clustered on coastal ice shelves.
- ``SMOS_IceThickness_2015_300.nc``: netCDF4, ascending 1-D ``lat`` (584, non-uniform) and
  ``lon`` (1388) = cell centres of the EASE-Grid 2.0 global 25 km grid (EPSG:6933);
  ``est``/``mrg`` float32 m (0..~4100), ``index`` int8 (0 ocean, 1 East Antarctic estimate,
  2 BEDMAP2 merge). ``mrg`` = 0 off the ice sheet, ``est`` = -999 where not estimated.
  The coastline wobbles around -64 deg and dips to ~-73.5 deg in the Amundsen/Bellingshausen
  sector, so the cube area holds both ice and ocean. Same at both scales.

Archives carry fixed timestamps (and the .dbf a fixed date), so they are byte-identical too.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import geopandas as gpd
import netCDF4
import numpy as np
import rasterio
import shapely
from pyproj import Transformer
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window
from scipy import ndimage

from polar_cube.sources.mirror import served_file_name
from polar_cube.spec import (
    SCALES,
    CubeSpec,
    GridStandin,
    PolygonStandin,
    Scale,
    SourceSpec,
    SpecError,
    VariableSpec,
)

CUBE_BBOX = (-2602500.0, -1626000.0, -649500.0, 495000.0)  # xmin, ymin, xmax, ymax
EPSG_3031 = "EPSG:3031"
FIXED_TIME = (2022, 1, 10, 0, 0, 0)  # timestamp stamped into every archive member
FIXED_MTIME = 1641772800  # the same, as a tar member's mtime
GMT_SPACING = {"full": 10000.0, "small": 20000.0}
MAG_PIXEL = {"full": 250.0, "small": 3000.0}
MAG_BLOCK_ROWS = 512
WAIS_COUNTS = {"full": (10223, 255), "small": (488, 12)}  # (lakes, channels)
WAIS_PRJ = (
    'PROJCS["Polar_Stereographic_South_71",GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",'
    'SPHEROID["WGS_1984",6378137.0,298.257223563]],PRIMEM["Greenwich",0.0],'
    'UNIT["Degree",0.0174532925199433]],PROJECTION["Stereographic_South_Pole"],'
    'PARAMETER["False_Easting",0.0],PARAMETER["False_Northing",0.0],'
    'PARAMETER["Central_Meridian",0.0],PARAMETER["Standard_Parallel_1",-71.0],'
    'UNIT["Meter",1.0]]'
)
WAIS_CRS = "+proj=stere +lat_0=-90 +lat_ts=-71 +lon_0=0 +x_0=0 +y_0=0 +datum=WGS84 +units=m"
# Thwaites lakes: grid (xmin, ymin, xmax, ymax) in EPSG:3031 metres, all on 500 m pixels.
THW_GRIDS = {
    70: (-1468000.0, -470000.0, -1444000.0, -446000.0),
    124: (-1424500.0, -456000.0, -1404500.0, -408000.0),
    142: (-1401000.0, -442000.0, -1381000.0, -414000.0),
    170: (-1396000.0, -410000.0, -1370000.0, -380000.0),
}
# Supraglacial lake clusters (x, y, along-coast spread m, across spread m, weight).
LAKE_CLUSTERS = (
    (-1387700.0, -971700.0, 90000.0, 25000.0, 0.30),  # Getz
    (-1914600.0, -66900.0, 80000.0, 25000.0, 0.20),  # Abbot
    (-1774500.0, -328900.0, 40000.0, 15000.0, 0.10),  # Cosgrove
    (-1569600.0, -666200.0, 50000.0, 20000.0, 0.15),  # Dotson / Crosson
    (-1603000.0, -282700.0, 30000.0, 12000.0, 0.10),  # Pine Island
    (-740000.0, -1228300.0, 30000.0, 20000.0, 0.15),  # Sulzberger
)
EASE2_CELL = 25025.26  # EASE-Grid 2.0 global 25 km: 1388 x 584 cells
EASE2_SHAPE = (584, 1388)


# --------------------------------------------------------------------------- shared helpers
def smooth_field(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    wavelengths: tuple[float, float],
    n_waves: int = 64,
    slope: float = 1.0,
    smooth: float = 0.0,
    x_period: float | None = None,
) -> np.ndarray:
    """Random plane-wave field on the grid ``(len(y), len(x))`` with about unit std.

    Sum of ``n_waves`` waves ``sin(kx*x + ky*y + phase)`` with log-uniform wavelengths,
    amplitude ``wavelength**slope``. A pure function of (x, y), so any window of a larger
    grid gets exactly the same values. ``smooth`` applies a Gaussian blur of that sigma
    analytically; ``x_period`` makes the field periodic in x (e.g. 360 for longitude).
    Evaluated as one matrix product, hence cheap even for large blocks.
    """
    rng = np.random.default_rng(seed)
    lam = np.exp(rng.uniform(np.log(wavelengths[0]), np.log(wavelengths[1]), n_waves))
    theta, phase = rng.uniform(0.0, 2 * np.pi, (2, n_waves))
    amp = lam**slope
    amp /= np.sqrt(np.sum(amp**2) / 2)
    kx, ky = 2 * np.pi / lam * np.cos(theta), 2 * np.pi / lam * np.sin(theta)
    if x_period is not None:
        kx = np.round(kx * x_period / (2 * np.pi)) * 2 * np.pi / x_period
    amp *= np.exp(-0.5 * (kx**2 + ky**2) * smooth**2)
    ax = np.outer(np.asarray(x, float), kx) + phase
    ay = np.outer(np.asarray(y, float), ky)
    # sin(ax + ay) = cos(ay) sin(ax) + sin(ay) cos(ax)
    left = np.hstack([np.cos(ay) * amp, np.sin(ay) * amp])
    right = np.vstack([np.sin(ax).T, np.cos(ax).T])
    return left @ right


def _rescale(a: np.ndarray, lo: float, hi: float, ref: np.ndarray | None = None) -> np.ndarray:
    """Map ``a`` linearly so that ``ref`` (default ``a``) spans exactly lo..hi."""
    ref = a if ref is None else ref
    return lo + (a - ref.min()) * (hi - lo) / (ref.max() - ref.min())


def _zip_bytes(members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    """A deterministic zip (fixed timestamps) of ``members``, preceded by ``dirs`` entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for d in dirs:
            info = zipfile.ZipInfo(d, FIXED_TIME)
            info.external_attr = 0o40755 << 16 | 0x10
            zf.writestr(info, b"")
        for name, data in members.items():
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


# --------------------------------------------------------------------------- GMT grids
def write_gmt_grid(
    path: Path,
    z_north_first: np.ndarray,
    *,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    spacing: tuple[float, float],
    node_offset: int,
    title: str = "",
    z_units: str = "",
) -> None:
    """Write a GMT classic ('cf') netCDF grid (NETCDF3_CLASSIC).

    ``z_north_first`` has shape (ny, nx) with row 0 the NORTH (y max) row, columns
    west->east. NaN = no data. Ranges are first/last node for ``node_offset=0`` and outer
    cell edges for ``node_offset=1``.
    """
    if node_offset not in (0, 1):
        raise ValueError(f"node_offset must be 0 or 1, not {node_offset!r}")
    z = np.asarray(z_north_first, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (ny, nx), got shape {z.shape}")
    expected = []
    for (lo, hi), d in ((y_range, spacing[1]), (x_range, spacing[0])):
        n = (hi - lo) / d + (1 - node_offset)
        if d <= 0 or hi <= lo or abs(n - round(n)) > 1e-6:
            raise ValueError(f"range {(lo, hi)} is not a whole number of spacings {d}")
        expected.append(round(n))
    if z.shape != tuple(expected):
        raise ValueError(f"z shape {z.shape} != (ny, nx) {tuple(expected)} implied by ranges")
    with netCDF4.Dataset(path, "w", format="NETCDF3_CLASSIC") as ds:
        ds.title = title
        ds.source = "polar_cube.sources.standins (synthetic stand-in)"
        ds.createDimension("side", 2)
        ds.createDimension("xysize", z.size)
        for name, values in (
            ("x_range", x_range),
            ("y_range", y_range),
            ("z_range", (np.nanmin(z), np.nanmax(z))),
            ("spacing", spacing),
        ):
            ds.createVariable(name, "f8", ("side",))[:] = np.asarray(values, float)
        ds["x_range"].units = "x"
        ds["y_range"].units = "y"
        ds["z_range"].units = z_units
        ds.createVariable("dimension", "i4", ("side",))[:] = [z.shape[1], z.shape[0]]
        var = ds.createVariable("z", "f4", ("xysize",), fill_value=np.float32(np.nan))
        var.set_auto_maskandscale(False)
        var.scale_factor = 1.0
        var.add_offset = 0.0
        var.node_offset = np.int32(node_offset)
        var[:] = z.ravel()


def _gmt_axes(window_km: int, scale: Scale) -> dict:
    """Ranges, spacing, registration and north-first node/centre axes of one GMT grid."""
    inset = 0.0 if window_km == 200 else 50000.0
    x_range = (-2470000.0 + inset, -810000.0 - inset)
    y_range = (-1480000.0 + inset, 380000.0 - inset)
    d = GMT_SPACING[scale]
    node_offset = 0 if window_km == 200 else 1
    half = d / 2 * node_offset
    x = np.arange(x_range[0] + half, x_range[1] - half + d / 2, d)
    y = np.arange(y_range[1] - half, y_range[0] + half - d / 2, -d)
    return dict(x_range=x_range, y_range=y_range, spacing=(d, d), node_offset=node_offset, x=x, y=y)


def _curie_raw(x: np.ndarray, y: np.ndarray, smooth: float) -> np.ndarray:
    """Unscaled Curie-depth-like field (higher = shallower) with a gentle SW-NE trend."""
    field = smooth_field(x, y, seed=200, wavelengths=(80e3, 1200e3), n_waves=48, smooth=smooth)
    detail = smooth_field(x, y, seed=201, wavelengths=(60e3, 250e3), n_waves=32, smooth=smooth)
    trend = 0.3 * (x[None, :] + 1.64e6) / 0.83e6 - 0.2 * (y[:, None] + 0.55e6) / 0.93e6
    return field + 0.3 * detail + trend


def _heat_flow(curie_km: np.ndarray) -> np.ndarray:
    """Heat flow (mW m-2) from Curie depth: conductive q = k * 580 degC / depth with
    k = 2.5 W/m/K, stretched linearly so that depths -25..-6.5 km give 50..235."""
    q = 2.5 * 580.0 / -curie_km
    return _rescale(q, 50.0, 235.0, ref=2.5 * 580.0 / np.array([25.0, 6.5]))


def write_ghf_grids(out_dir: Path, scale: Scale) -> list[Path]:
    """The six Dziadek et al. GMT grids: Curie depth, heat flow, uncertainty at 200/300 km."""
    paths, raw200 = [], None
    for km, smooth in ((200, 0.0), (300, 30e3)):  # 300 km windows: a blurred 200 km field
        ax = _gmt_axes(km, scale)
        raw = _curie_raw(ax["x"], ax["y"], smooth=smooth)
        raw200 = raw if raw200 is None else raw200
        # Same mapping for both windows, so the smoother 300 km field spans a narrower range.
        curie = np.clip(_rescale(raw, -25.0, -6.5, ref=raw200), -25.0, -6.5)
        ghf = _heat_flow(curie)
        noise = smooth_field(ax["x"], ax["y"], seed=202, wavelengths=(50e3, 300e3), smooth=smooth)
        wiggle = 0.5 + 0.5 * np.tanh(noise)  # 0..1
        unc = np.clip(3.0 + 9.0 * wiggle + 61.0 * ((ghf - 50.0) / 185.0) ** 1.2, 3.0, 73.0)
        grid_kw = {k: ax[k] for k in ("x_range", "y_range", "spacing", "node_offset")}
        for name, z, title, units in (
            ("Dziadek_etal_CurieDepth_Results", curie, "Curie depth", "km"),
            ("GHF_windowCenters", ghf, "Geothermal heat flow", "mW m-2"),
            ("GHF_uncertainty", unc, "Geothermal heat flow uncertainty", "mW m-2"),
        ):
            path = out_dir / f"{km}km_{name}.nc"
            write_gmt_grid(path, z, title=f"{title}, {km} km windows", z_units=units, **grid_kw)
            paths.append(path)
    return paths


# --------------------------------------------------------------------------- magnetic GeoTIFF
def _magnetic_block(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Magnetic anomaly (nT, float32) at pixel centres x (cols), y (rows); NaN off footprint."""
    broad = smooth_field(x, y, seed=300, wavelengths=(15e3, 400e3), n_waves=96)
    fine = smooth_field(x, y, seed=301, wavelengths=(1.5e3, 25e3), n_waves=160, slope=0.7)
    activity = smooth_field(x, y, seed=302, wavelengths=(60e3, 500e3), n_waves=32)
    envelope = 1.0 / (1.0 + np.exp(-4.0 * (activity - 1.3)))  # a few "busy" provinces
    raw = 150.0 * broad + (30.0 + 330.0 * envelope) * fine * (1.0 + 0.3 * fine**2)
    values = 2090.0 * np.tanh(raw / 2090.0)
    # Footprint: super-ellipse radius wobbled by a smooth field, ~70 % of the bbox.
    xmin, ymin, xmax, ymax = CUBE_BBOX
    u = (x[None, :] - (xmin + xmax) / 2) / ((xmax - xmin) / 2)
    v = (y[:, None] - (ymin + ymax) / 2) / ((ymax - ymin) / 2)
    rho = (np.abs(u) ** 3 + np.abs(v) ** 3) ** (1 / 3)
    wobble = smooth_field(x, y, seed=303, wavelengths=(150e3, 800e3), n_waves=32)
    values[rho + 0.05 * np.clip(wobble, -2.0, 2.0) > 0.87] = np.nan  # rho >= 1 stays NaN
    return values.astype(np.float32)


def write_magnetic_tif(path: Path, scale: Scale) -> Path:
    """The ASE magnetic compilation GeoTIFF, written in full-width row blocks."""
    xmin, ymin, xmax, ymax = CUBE_BBOX
    res = MAG_PIXEL[scale]
    width, height = round((xmax - xmin) / res), round((ymax - ymin) / res)
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=1,
        dtype="float32",
        crs=EPSG_3031,
        transform=Affine(res, 0.0, xmin, 0.0, -res, ymax),
        nodata=np.nan,
        tiled=True,
        blockxsize=512,
        blockysize=512,
    )  # uncompressed
    x = xmin + res / 2 + res * np.arange(width)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, height, MAG_BLOCK_ROWS):
            rows = min(MAG_BLOCK_ROWS, height - row)
            y = ymax - res / 2 - res * np.arange(row, row + rows)
            dst.write(_magnetic_block(x, y), 1, window=Window(0, row, width, rows))
    return path


# --------------------------------------------------------------------------- Thwaites lakes
def _lake_mask(bounds: tuple, seed: int, size: float, shift: tuple[float, float]) -> np.ndarray:
    """uint8 0/1 mask (north-up, 500 m) of one irregular lake blob inside ``bounds``."""
    xmin, ymin, xmax, ymax = bounds
    x = np.arange(xmin + 250.0, xmax, 500.0)
    y = np.arange(ymax - 250.0, ymin, -500.0)
    u = (x[None, :] - (xmin + xmax) / 2 - shift[0]) / ((xmax - xmin) / 2)
    v = (y[:, None] - (ymin + ymax) / 2 - shift[1]) / ((ymax - ymin) / 2)
    wobble = smooth_field(x, y, seed=seed, wavelengths=(4e3, 25e3), n_waves=24)
    blob = np.hypot(u, v) + 0.18 * wobble < size
    labels, n = ndimage.label(blob)
    if n > 1:  # keep the largest connected piece
        blob = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return blob.astype(np.uint8)


def _mask_tif_bytes(mask: np.ndarray, bounds: tuple) -> bytes:
    """A GeoTIFF (EPSG:3031, 500 m, uint8, no nodata) of ``mask`` as bytes."""
    profile = dict(
        driver="GTiff",
        width=mask.shape[1],
        height=mask.shape[0],
        count=1,
        dtype="uint8",
        crs=EPSG_3031,
        transform=Affine(500.0, 0.0, bounds[0], 0.0, -500.0, bounds[3]),
    )
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(mask, 1)
        return bytes(mem.getbuffer())


def write_thwaites_tar(path: Path) -> Path:
    """Malczyk et al. (2020) tar: 8 lake masks at the archive's top level."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (lake, bounds) in enumerate(THW_GRIDS.items()):
            # 2013 and 2017: the lake drained/filled, so size and centre move.
            for year, size, shift in ((2013, 0.78, (0.0, 0.0)), (2017, 0.62, (1500.0, -2000.0))):
                data = _mask_tif_bytes(_lake_mask(bounds, 400 + 10 * i, size, shift), bounds)
                info = tarfile.TarInfo(f"Thw{lake}_{year}_mask.tif")
                info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- WAIS polygons
def _cluster_point(rng: np.random.Generator, cluster: tuple) -> tuple[float, float]:
    """A random point of a lake cluster, spread along the coast (normal to the pole
    direction) and across it; truncated at 2.5 sigma so it stays inside the cube bbox."""
    cx, cy, along, across, _ = cluster
    a, b = np.clip(rng.normal(0.0, 1.0, 2), -2.5, 2.5) * (along, across)
    rho = np.hypot(cx, cy)
    return cx + (-a * cy - b * cx) / rho, cy + (a * cx - b * cy) / rho


def _lake_polygons(rng: np.random.Generator, n: int) -> list[shapely.Polygon]:
    """Irregular star-shaped blobs 50 m .. 3 km across, clustered on coastal ice shelves."""
    weights = np.array([c[4] for c in LAKE_CLUSTERS])
    which = rng.choice(len(LAKE_CLUSTERS), size=n, p=weights / weights.sum())
    polygons = []
    for k in which:
        x0, y0 = _cluster_point(rng, LAKE_CLUSTERS[k])
        diameter = np.exp(rng.uniform(np.log(50.0), np.log(3000.0)))
        polygons.append(_blob(rng, x0, y0, diameter))
    return polygons


def _blob(rng: np.random.Generator, x0: float, y0: float, diameter: float) -> shapely.Polygon:
    """An irregular star-shaped (hence valid) polygon of `diameter` centred on (x0, y0)."""
    n_vert = int(np.clip(diameter / 40.0, 8, 40))
    t = np.linspace(0.0, 2 * np.pi, n_vert, endpoint=False)
    r = (1.0 + 0.6 * rng.uniform() * np.cos(t) ** 2) * rng.uniform(0.9, 1.1, n_vert)
    for harmonic in range(2, 6):  # radius stays > 0
        r += rng.uniform(0.0, 0.3 / harmonic) * np.cos(harmonic * t + rng.uniform(0, 7))
    r *= diameter / 2 / r.max()
    turn = rng.uniform(0, np.pi)
    return shapely.Polygon(np.c_[x0 + r * np.cos(t + turn), y0 + r * np.sin(t + turn)])


def _channel_polygons(rng: np.random.Generator, n: int) -> list[shapely.Polygon]:
    """Buffered meandering lines 1..20 km long and 50..300 m wide, near the lake clusters."""
    polygons = []
    for _ in range(n):
        x0, y0 = _cluster_point(rng, LAKE_CLUSTERS[rng.integers(len(LAKE_CLUSTERS))])
        length = rng.uniform(1e3, 20e3)
        steps = max(8, int(length / 250.0))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.15, steps))
        step = length / steps
        x = x0 + np.cumsum(step * np.cos(heading))
        y = y0 + np.cumsum(step * np.sin(heading))
        line = shapely.LineString(np.c_[x, y]).simplify(step / 10)
        polygons.append(line.buffer(rng.uniform(25.0, 150.0), quad_segs=2))
    return polygons


def _wais_frame(scale: Scale) -> gpd.GeoDataFrame:
    """The supraglacial lake/channel polygons with the real attribute fields."""
    rng = np.random.default_rng(500)
    n_lake, n_channel = WAIS_COUNTS[scale]
    geoms = _lake_polygons(rng, n_lake) + _channel_polygons(rng, n_channel)
    order = rng.permutation(len(geoms))
    geoms = [geoms[i] for i in order]
    kinds = np.array(["Lake"] * n_lake + ["Channel"] * n_channel)[order]
    location = rng.choice(
        ["Ice Shelf", "Grounded Ice", "Crosses GL"], len(geoms), p=[0.7, 0.2, 0.1]
    )
    return gpd.GeoDataFrame(
        {
            "ID": np.arange(1, len(geoms) + 1, dtype=np.int32),
            "Feature_Cl": kinds,
            "POLY_AREA": shapely.area(geoms),
            "Location": location,
        },
        geometry=geoms,
        crs=WAIS_CRS,
    )


def _kml(frame: gpd.GeoDataFrame) -> str:
    """A minimal KML document of ``frame`` (exterior rings only) in lon/lat."""
    lonlat = frame.to_crs("EPSG:4326")
    marks = []
    for row in lonlat.itertuples():
        coords = " ".join(f"{x:.7f},{y:.7f}" for x, y in row.geometry.exterior.coords)
        marks.append(
            f"<Placemark><name>{row.ID}</name><description>{row.Feature_Cl}; {row.Location}; "
            f"{row.POLY_AREA:.1f} m2</description><Polygon><outerBoundaryIs><LinearRing>"
            f"<coordinates>{coords}</coordinates></LinearRing></outerBoundaryIs></Polygon>"
            "</Placemark>"
        )
    body = "\n".join(marks)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<kml xmlns="http://www.opengis.net/kml/2.2">'
        f"<Document><name>WAIS_Jan_2017_Polygons</name>\n{body}\n</Document></kml>\n"
    )


def _fixed_date_dbf(dbf: Path) -> bytes:
    """The .dbf's bytes with its "last update" date set to FIXED_TIME's (it is today's)."""
    data = bytearray(dbf.read_bytes())
    data[1:4] = bytes([FIXED_TIME[0] - 1900, FIXED_TIME[1], FIXED_TIME[2]])
    return bytes(data)


def write_wais_zip(path: Path, scale: Scale) -> Path:
    """Corr et al. (2022) zip: shapefile set, GeoJSON and KMZ under ``WAIS_Max_Extent/``."""
    frame = _wais_frame(scale)
    stem = "WAIS_Jan_2017_Polygons"
    with tempfile.TemporaryDirectory() as tmp:
        shp = Path(tmp) / f"{stem}.shp"
        frame.to_file(shp, driver="ESRI Shapefile", engine="pyogrio", encoding="UTF-8")
        members = {f"{stem}{ext}": shp.with_suffix(ext).read_bytes() for ext in (".shp", ".shx")}
        members[f"{stem}.dbf"] = _fixed_date_dbf(shp.with_suffix(".dbf"))
        members[f"{stem}.prj"] = WAIS_PRJ.encode()
        members[f"{stem}.cpg"] = b"UTF-8"
        geojson = Path(tmp) / f"{stem}.geojson"
        frame.to_crs("EPSG:4326").to_file(geojson, driver="GeoJSON", engine="pyogrio")
        members[f"{stem}.geojson"] = geojson.read_bytes()
    members[f"{stem}.kmz"] = _zip_bytes({"doc.kml": _kml(frame).encode()})
    prefixed = {f"WAIS_Max_Extent/{name}": data for name, data in members.items()}
    path.write_bytes(_zip_bytes(prefixed, dirs=("WAIS_Max_Extent/",)))
    return path


# --------------------------------------------------------------------------- SMOS thickness
def ease2_axes() -> tuple[np.ndarray, np.ndarray]:
    """Ascending cell-centre latitudes (584) and longitudes (1388) of EASE-Grid 2.0 25 km."""
    ny, nx = EASE2_SHAPE
    x = (np.arange(nx) + 0.5 - nx / 2) * EASE2_CELL
    y = (ny / 2 - 0.5 - np.arange(ny)) * EASE2_CELL
    to_lonlat = Transformer.from_crs("EPSG:6933", "EPSG:4326", always_xy=True)
    lon, _ = to_lonlat.transform(x, np.zeros(nx))
    _, lat = to_lonlat.transform(np.zeros(ny), y)
    return lat[::-1].copy(), lon


def _smos_fields(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, ...]:
    """est, mrg (m, float32) and index (int8) on the (lat, lon) grid."""
    wobble = smooth_field(lon, [0.0], seed=600, wavelengths=(8.0, 90.0), x_period=360.0)[0]
    amundsen = np.exp(-0.5 * ((lon + 110.0) / 30.0) ** 2)  # West Antarctic coast ~ -73
    coast = -64.0 + 1.0 * wobble - 9.0 * amundsen
    inland = np.clip((coast[None, :] - lat[:, None]) / (coast[None, :] + 90.0), 0.0, None)
    ice = inland > 0
    east = ((lon > -30.0) & (lon < 165.0))[None, :] & ice
    texture = smooth_field(lon, lat, seed=601, wavelengths=(3.0, 40.0), x_period=360.0)
    dome = 3300.0 + 700.0 * np.cos(np.radians(lon - 75.0))[None, :]  # thicker in the East
    thick = np.clip(dome * np.sqrt(inland) * (1.0 + 0.08 * texture) + 80.0, 0.0, 4100.0)
    est_noise = smooth_field(lon, lat, seed=602, wavelengths=(1.0, 6.0), x_period=360.0)
    est = np.where(east, np.clip(thick * (1.0 + 0.04 * est_noise), 0.0, 4100.0), -999.0)
    mrg = np.where(east, est, np.where(ice, thick, 0.0))
    index = np.where(east, 1, np.where(ice, 2, 0)).astype(np.int8)
    return est.astype(np.float32), mrg.astype(np.float32), index


def write_smos_nc(path: Path) -> Path:
    """CryoSMOS ice thickness netCDF4 on the EASE-Grid 2.0 25 km lat/lon axes."""
    lat, lon = ease2_axes()
    est, mrg, index = _smos_fields(lat, lon)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.title = "CryoSMOS Antarctic ice thickness 2015 (synthetic stand-in)"
        ds.Conventions = "CF-1.6"
        ds.createDimension("lat", lat.size)
        ds.createDimension("lon", lon.size)
        for name, values, units in (("lat", lat, "degrees_north"), ("lon", lon, "degrees_east")):
            var = ds.createVariable(name, "f8", (name,))
            var.units, var.standard_name = units, "latitude" if name == "lat" else "longitude"
            var[:] = values
        for name, values, long_name in (
            ("est", est, "ice thickness estimated from SMOS (East Antarctica)"),
            ("mrg", mrg, "ice thickness merged with BEDMAP2"),
        ):
            var = ds.createVariable(name, "f4", ("lat", "lon"))
            var.units, var.long_name = "m", long_name
            var[:] = values
        var = ds.createVariable("index", "i1", ("lat", "lon"))
        var.long_name = "source index"
        var.flag_values = np.array([0, 1, 2], dtype=np.int8)
        var.flag_meanings = "ocean east_antarctic_estimate bedmap2_merge"
        var[:] = index
    return path


# --------------------------------------------------------------------------- described stand-ins
GRID_BLOCK_ROWS = 512  # GeoTIFF stand-ins are computed and written in blocks of rows


def files_read(spec: CubeSpec, source: SourceSpec) -> dict[str, list[VariableSpec]]:
    """{file inside the download: the variables reading it}, in file-name order."""
    readers: dict[str, list[VariableSpec]] = {}
    for variable in spec.variables_of(source.id):
        for name in variable.files_by_time.values():
            readers.setdefault(name, []).append(variable)
    return dict(sorted(readers.items()))


def described_field(
    x: np.ndarray, y: np.ndarray, standin: GridStandin, seed: int, mask_seed: int
) -> np.ndarray:
    """float32 values within ``standin.values`` at cell centres x (columns), y (rows), NaN
    outside a smooth footprint covering about ``standin.valid_fraction`` of the cells."""
    low, high = standin.values
    field = smooth_field(x, y, seed=seed, wavelengths=standin.wavelengths)
    values = low + (high - low) * (0.5 + 0.5 * np.tanh(field))
    if standin.valid_fraction < 1:
        longest = standin.wavelengths[1]
        footprint = smooth_field(x, y, seed=mask_seed, wavelengths=(longest / 2, 2 * longest))
        values[footprint > NormalDist().inv_cdf(standin.valid_fraction)] = np.nan
    return values.astype(np.float32)


def _grid_axes(
    standin: GridStandin, scale: Scale, gridline: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """x (west to east) and y (north to south) of the cell centres, or of the nodes on the
    bounds for a gridline-registered grid; and the cell size."""
    xmin, ymin, xmax, ymax = standin.bounds
    size = standin.pixel_size[scale]
    inset = 0.0 if gridline else size / 2
    nx = round((xmax - xmin) / size) + gridline
    ny = round((ymax - ymin) / size) + gridline
    return xmin + inset + size * np.arange(nx), ymax - inset - size * np.arange(ny), size


def _write_described_geotiff(
    path: Path, standin: GridStandin, scale: Scale, crs: str, seeds: list[int], mask_seed: int
) -> None:
    """A tiled float32 GeoTIFF, one band per seed, NaN as nodata, written in row blocks."""
    x, y, size = _grid_axes(standin, scale)
    profile = dict(
        driver="GTiff",
        width=x.size,
        height=y.size,
        count=len(seeds),
        dtype="float32",
        crs=crs,
        transform=Affine(size, 0.0, standin.bounds[0], 0.0, -size, standin.bounds[3]),
        nodata=np.nan,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, y.size, GRID_BLOCK_ROWS):
            rows = y[row : row + GRID_BLOCK_ROWS]
            window = Window(0, row, x.size, rows.size)
            for band, seed in enumerate(seeds, start=1):
                dst.write(described_field(x, rows, standin, seed, mask_seed), band, window=window)


def _write_described_gmt(
    path: Path, standin: GridStandin, scale: Scale, seed: int, mask_seed: int, units: str
) -> None:
    gridline = standin.registration == "gridline"
    x, y, size = _grid_axes(standin, scale, gridline)
    xmin, ymin, xmax, ymax = standin.bounds
    write_gmt_grid(
        path,
        described_field(x, y, standin, seed, mask_seed),
        x_range=(xmin, xmax),
        y_range=(ymin, ymax),
        spacing=(size, size),
        node_offset=0 if gridline else 1,
        title=f"{path.stem} (synthetic stand-in)",
        z_units=units,
    )


def _write_described_latlon(
    path: Path, standin: GridStandin, scale: Scale, layers: dict[str, tuple[int, str]], mask: int
) -> None:
    """netCDF-4 with ascending 1-D lat/lon axes and one float32 variable per `layers` entry
    ({name: (seed, units)})."""
    lon, lat_north_first, _ = _grid_axes(standin, scale)
    lat = lat_north_first[::-1].copy()
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.title = f"{path.stem} (synthetic stand-in)"
        ds.Conventions = "CF-1.8"
        for name, values, units in (("lat", lat, "degrees_north"), ("lon", lon, "degrees_east")):
            ds.createDimension(name, values.size)
            var = ds.createVariable(name, "f8", (name,))
            var.units, var.standard_name = units, "latitude" if name == "lat" else "longitude"
            var[:] = values
        for name, (seed, units) in layers.items():
            var = ds.createVariable(name, "f4", ("lat", "lon"), fill_value=np.float32(np.nan))
            var.units = units
            var[:] = described_field(lon, lat, standin, seed, mask)


def _described_polygons(
    standin: PolygonStandin, scale: Scale, variables: list[VariableSpec], seed: int, crs: str
) -> gpd.GeoDataFrame:
    """Blobs scattered over the bounds; each variable's attribute gets one of its classes."""
    rng = np.random.default_rng(seed)
    xmin, ymin, xmax, ymax = standin.bounds
    small, large = standin.diameters
    count = standin.count[scale]
    margin_x, margin_y = (min(large / 2, (hi - lo) / 2) for lo, hi in ((xmin, xmax), (ymin, ymax)))
    x0 = rng.uniform(xmin + margin_x, xmax - margin_x, count)
    y0 = rng.uniform(ymin + margin_y, ymax - margin_y, count)
    diameters = np.exp(rng.uniform(np.log(small), np.log(large), count))
    geometries = [_blob(rng, x, y, d) for x, y, d in zip(x0, y0, diameters, strict=True)]
    columns: dict[str, object] = {"ID": np.arange(1, count + 1, dtype=np.int32)}
    for variable in variables:
        columns[variable.source_variable] = rng.choice(sorted(variable.classes), count)
    return gpd.GeoDataFrame(columns, geometry=geometries, crs=crs)


def _write_described_polygons(path: Path, frame: gpd.GeoDataFrame) -> list[Path]:
    """A shapefile set (.shp .shx .dbf .prj .cpg) or a GeoJSON file; return the files."""
    if path.suffix.lower() == ".geojson":
        frame.to_file(path, driver="GeoJSON", engine="pyogrio")
        return [path]
    frame.to_file(path, driver="ESRI Shapefile", engine="pyogrio", encoding="UTF-8")
    path.with_suffix(".dbf").write_bytes(_fixed_date_dbf(path.with_suffix(".dbf")))
    return sorted(p for p in path.parent.glob(f"{path.stem}.*") if p.is_file())


def _write_described_file(
    path: Path,
    source: SourceSpec,
    variables: list[VariableSpec],
    scale: Scale,
    seed: int,
) -> list[Path]:
    """One file of a described source (each layer seeded from `seed`); return the files
    written (a shapefile is several)."""
    standin = source.standin
    if isinstance(standin, PolygonStandin):
        frame = _described_polygons(standin, scale, variables, seed, source.source_crs)
        return _write_described_polygons(path, frame)
    assert isinstance(standin, GridStandin)
    mask_seed = seed + 99  # one footprint shared by the file's layers
    if source.source_format == "geotiff":
        bands = max(int(v.source_variable or 1) for v in variables)
        seeds = [seed + band for band in range(bands)]
        _write_described_geotiff(path, standin, scale, source.source_crs, seeds, mask_seed)
    elif source.source_format == "gmt_netcdf":
        _write_described_gmt(path, standin, scale, seed, mask_seed, variables[0].units)
    else:
        names = sorted({v.source_variable: v.units for v in variables}.items())
        layers = {name: (seed + k, units) for k, (name, units) in enumerate(names)}
        _write_described_latlon(path, standin, scale, layers, mask_seed)
    return [path]


def write_described_standin(
    spec: CubeSpec, source: SourceSpec, out_dir: Path, scale: Scale
) -> Path:
    """The download of `source` from its spec `standin` description: the files its variables
    read (each time step its own field), packed into its tar or zip when it has one, written
    as ``out_dir / <the download URL's file name>``."""
    if source.standin is None:
        raise SpecError(f"source {source.id!r}: has no 'standin' description")
    target = out_dir / served_file_name(source.download_url)
    readers = files_read(spec, source)
    if not readers:
        raise SpecError(f"source {source.id!r}: no variable reads it, so no stand-in is made")
    if source.compression_format is None:
        variables = next(iter(readers.values()))
        _write_described_file(target, source, variables, scale, source.standin.seed)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        members: dict[str, bytes] = {}
        for number, (name, variables) in enumerate(readers.items()):
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = source.standin.seed + 1000 * number
            for written in _write_described_file(path, source, variables, scale, seed):
                members[written.relative_to(tmp).as_posix()] = written.read_bytes()
    if source.compression_format == "zip":
        target.write_bytes(_zip_bytes(dict(sorted(members.items()))))
    else:
        _write_tar(target, members)
    return target


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A deterministic tar (fixed timestamps, sorted members)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- entry point
GHF_FILES = tuple(
    f"{km}km_{name}.nc"
    for km in (200, 300)
    for name in ("Dziadek_etal_CurieDepth_Results", "GHF_windowCenters", "GHF_uncertainty")
)
MAGNETIC_FILE = "ASE_MagneticCompilation_Dziadeketal_250m.tif"
THWAITES_FILE = "Malczyk_etal_2020_data_v2.tar"
WAIS_FILE = "WAIS_Max_Extent.zip"
SMOS_FILE = "SMOS_IceThickness_2015_300.nc"
RealisticWriter = Callable[[Path, Scale], list[Path]]
# The ten real sources' hand-made writers, by download file name (one writer makes all six
# GMT grids): sources with these file names and no `standin` description get them.
REALISTIC_WRITERS: dict[str, RealisticWriter] = {
    **{name: write_ghf_grids for name in GHF_FILES},
    MAGNETIC_FILE: lambda out, scale: [write_magnetic_tif(out / MAGNETIC_FILE, scale)],
    THWAITES_FILE: lambda out, scale: [write_thwaites_tar(out / THWAITES_FILE)],
    WAIS_FILE: lambda out, scale: [write_wais_zip(out / WAIS_FILE, scale)],
    SMOS_FILE: lambda out, scale: [write_smos_nc(out / SMOS_FILE)],
}


def make_standins(
    out_dir: Path, scale: Scale = "small", spec: CubeSpec | None = None
) -> list[Path]:
    """Write a stand-in of every source download into out_dir (flat, each under its download
    URL's file name, as the mirror serves them); return their paths. Without `spec`: the ten
    real sources. A source with a `standin` description gets a described stand-in, one
    without it the realistic writer of its file name. Idempotent: overwrites."""
    if scale not in SCALES:
        raise ValueError(f"scale must be 'small' or 'full', not {scale!r}")
    sources = [] if spec is None else spec.sources
    described = [s for s in sources if s.standin is not None]
    realistic = [s for s in sources if s.standin is None]
    missing = [s.id for s in realistic if served_file_name(s.download_url) not in REALISTIC_WRITERS]
    if missing:
        raise SpecError(
            f"no stand-in for source(s) {', '.join(missing)}: describe one in the source's "
            "'standin' entry (see docs/adding-a-source.md)"
        )
    if spec is None:
        writers = dict.fromkeys(REALISTIC_WRITERS.values())
    else:
        names = [served_file_name(s.download_url) for s in realistic]
        writers = dict.fromkeys(REALISTIC_WRITERS[name] for name in names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [path for writer in writers for path in writer(out_dir, scale)]
    paths += [write_described_standin(spec, s, out_dir, scale) for s in described]
    return list(dict.fromkeys(paths))
