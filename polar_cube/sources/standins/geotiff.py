"""GeoTIFF stand-ins: the ASE magnetic compilation, the Thwaites lake masks and described
grids.

- ``ASE_MagneticCompilation_Dziadeketal_250m.tif``: EPSG:3031 float32, bounds = cube bbox
  (-2602500, -1626000, -649500, 495000), 250 m (7812 x 8484, uncompressed, 512x512 tiles,
  written block by block) or 3000 m (651 x 707); nT within +-2100, NaN outside a wobbly
  footprint covering ~2/3 of the bbox.
- ``Malczyk_etal_2020_data_v2.tar``: top-level ``Thw{70,124,142,170}_{2013,2017}_mask.tif``,
  EPSG:3031, 500 m, uint8 0/1 without nodata, small grids within x -1.47e6..-1.37e6,
  y -0.47e6..-0.38e6; both years of a lake share a grid, the lake blob differs.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window
from scipy import ndimage

from polar_cube.sources.standins.common import (
    CUBE_BBOX,
    EPSG_3031,
    MASK_SEED_OFFSET,
    described_field,
    grid_axes,
    smooth_field,
)
from polar_cube.sources.standins.packing import FIXED_MTIME
from polar_cube.spec import GridStandin, Scale, SourceSpec, VariableSpec

MAGNETIC_FILE = "ASE_MagneticCompilation_Dziadeketal_250m.tif"
THWAITES_FILE = "Malczyk_etal_2020_data_v2.tar"
MAG_PIXEL = {"full": 250.0, "small": 3000.0}
MAG_BLOCK_ROWS = 512
# Thwaites lakes: grid (xmin, ymin, xmax, ymax) in EPSG:3031 metres, all on 500 m pixels.
THW_GRIDS = {
    70: (-1468000.0, -470000.0, -1444000.0, -446000.0),
    124: (-1424500.0, -456000.0, -1404500.0, -408000.0),
    142: (-1401000.0, -442000.0, -1381000.0, -414000.0),
    170: (-1396000.0, -410000.0, -1370000.0, -380000.0),
}
GRID_BLOCK_ROWS = 512  # GeoTIFF stand-ins are computed and written in blocks of rows


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


def write_described_geotiff(
    path: Path, source: SourceSpec, variables: list[VariableSpec], scale: Scale, seed: int
) -> list[Path]:
    """A tiled float32 GeoTIFF with as many bands as its variables read (band k seeded
    `seed + k - 1`), NaN as nodata, written in row blocks."""
    standin = source.standin
    assert isinstance(standin, GridStandin)
    bands = max(int(v.source_variable or 1) for v in variables)
    seeds = [seed + band for band in range(bands)]
    mask_seed = seed + MASK_SEED_OFFSET
    x, y, size = grid_axes(standin, scale)
    profile = dict(
        driver="GTiff",
        width=x.size,
        height=y.size,
        count=len(seeds),
        dtype="float32",
        crs=source.source_crs,
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
            for band, band_seed in enumerate(seeds, start=1):
                values = described_field(x, rows, standin, band_seed, mask_seed)
                dst.write(values, band, window=window)
    return [path]
