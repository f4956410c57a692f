"""GMT classic ("cf") netCDF grids: the six Dziadek et al. grids and described ones.

``{200,300}km_Dziadek_etal_CurieDepth_Results.nc``, ``{200,300}km_GHF_windowCenters.nc``,
``{200,300}km_GHF_uncertainty.nc``: NETCDF3_CLASSIC, first row of ``z`` = north row, no CRS
(EPSG:3031 metres). 200 km: x -2470000..-810000, y -1480000..380000, gridline registered
(node_offset=0, ranges = first/last node); 300 km: inset 50 km each side, pixel registered
(node_offset=1, ranges = outer cell edges). Spacing 10 km (full) / 20 km (small; 40 km does
not divide the 200 km spans). Curie depth negative km (-25..-6.5), heat flow mW m-2
(50..235, from 1/depth), uncertainty mW m-2 (3..73); no holes; the 300 km fields are smoothed
200 km fields.
"""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np

from polar_cube.sources.standins.common import (
    MASK_SEED_OFFSET,
    described_field,
    grid_axes,
    smooth_field,
)
from polar_cube.spec import GridStandin, Scale, SourceSpec, VariableSpec

GHF_FILES = tuple(
    f"{km}km_{name}.nc"
    for km in (200, 300)
    for name in ("Dziadek_etal_CurieDepth_Results", "GHF_windowCenters", "GHF_uncertainty")
)
GMT_SPACING = {"full": 10000.0, "small": 20000.0}


def _rescale(a: np.ndarray, lo: float, hi: float, ref: np.ndarray | None = None) -> np.ndarray:
    """Map ``a`` linearly so that ``ref`` (default ``a``) spans exactly lo..hi."""
    ref = a if ref is None else ref
    return lo + (a - ref.min()) * (hi - lo) / (ref.max() - ref.min())


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


def write_described_gmt(
    path: Path, source: SourceSpec, variables: list[VariableSpec], scale: Scale, seed: int
) -> list[Path]:
    """A described GMT grid, gridline or pixel registered as its `standin` says."""
    standin = source.standin
    assert isinstance(standin, GridStandin)
    gridline = standin.registration == "gridline"
    x, y, size = grid_axes(standin, scale, gridline)
    xmin, ymin, xmax, ymax = standin.bounds
    write_gmt_grid(
        path,
        described_field(x, y, standin, seed, seed + MASK_SEED_OFFSET),
        x_range=(xmin, xmax),
        y_range=(ymin, ymax),
        spacing=(size, size),
        node_offset=0 if gridline else 1,
        title=f"{path.stem} (synthetic stand-in)",
        z_units=variables[0].units,
    )
    return [path]
