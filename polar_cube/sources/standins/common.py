"""What every stand-in writer shares: the cube's bbox, smooth random fields (a pure function of
the seed and of (x, y), so each run writes the same bytes), and the grid and values of a
spec-described grid (`polar_cube.spec.GridStandin`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import numpy as np

from polar_cube.spec import GridStandin, Scale, SourceSpec, VariableSpec

CUBE_BBOX = (-2602500.0, -1626000.0, -649500.0, 495000.0)  # xmin, ymin, xmax, ymax
EPSG_3031 = "EPSG:3031"
MASK_SEED_OFFSET = 99  # a described grid file's footprint seed: one shared by its layers
# (file, its source, the variables reading it, scale, seed) -> the files written (a shapefile
# is several): each format's generic writer of spec-described stand-ins.
DescribedWriter = Callable[[Path, SourceSpec, list[VariableSpec], Scale, int], list[Path]]


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


def grid_axes(
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
