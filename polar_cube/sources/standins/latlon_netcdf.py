"""netCDF stand-ins on 1-D latitude/longitude axes: CryoSMOS ice thickness and described grids.

``SMOS_IceThickness_2015_300.nc``: netCDF4, ascending 1-D ``lat`` (584, non-uniform) and
``lon`` (1388) = cell centres of the EASE-Grid 2.0 global 25 km grid (EPSG:6933);
``est``/``mrg`` float32 m (0..~4100), ``index`` int8 (0 ocean, 1 East Antarctic estimate,
2 BEDMAP2 merge). ``mrg`` = 0 off the ice sheet, ``est`` = -999 where not estimated.
The coastline wobbles around -64 deg and dips to ~-73.5 deg in the Amundsen/Bellingshausen
sector, so the cube area holds both ice and ocean. Same at both scales.
"""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
from pyproj import Transformer

from polar_cube.sources.standins.common import (
    MASK_SEED_OFFSET,
    described_field,
    grid_axes,
    smooth_field,
)
from polar_cube.spec import GridStandin, Scale, SourceSpec, VariableSpec

SMOS_FILE = "SMOS_IceThickness_2015_300.nc"
EASE2_CELL = 25025.26  # EASE-Grid 2.0 global 25 km: 1388 x 584 cells
EASE2_SHAPE = (584, 1388)


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


def write_described_latlon(
    path: Path, source: SourceSpec, variables: list[VariableSpec], scale: Scale, seed: int
) -> list[Path]:
    """netCDF-4 with ascending 1-D lat/lon axes and one float32 variable per variable name
    the file's variables read (seeded `seed`, `seed + 1`, … in name order)."""
    standin = source.standin
    assert isinstance(standin, GridStandin)
    names = sorted({v.source_variable: v.units for v in variables}.items())
    layers = {name: (seed + k, units) for k, (name, units) in enumerate(names)}
    mask_seed = seed + MASK_SEED_OFFSET
    lon, lat_north_first, _ = grid_axes(standin, scale)
    lat = lat_north_first[::-1].copy()
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.title = f"{path.stem} (synthetic stand-in)"
        ds.Conventions = "CF-1.8"
        for name, values, units in (("lat", lat, "degrees_north"), ("lon", lon, "degrees_east")):
            ds.createDimension(name, values.size)
            var = ds.createVariable(name, "f8", (name,))
            var.units, var.standard_name = units, "latitude" if name == "lat" else "longitude"
            var[:] = values
        for name, (layer_seed, units) in layers.items():
            var = ds.createVariable(name, "f4", ("lat", "lon"), fill_value=np.float32(np.nan))
            var.units = units
            var[:] = described_field(lon, lat, standin, layer_seed, mask_seed)
    return [path]
