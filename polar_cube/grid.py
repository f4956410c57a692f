"""The target grid: a regular, north-up grid of cell centres, both axes ascending."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pyproj import CRS, Transformer

from polar_cube.errors import PolarCubeError
from polar_cube.spec import CubeSpec, SpecError, resolution_problem

CHUNK_SIZE = 2048
EDGE_POINTS = 101  # points per grid edge in the lon/lat outline


class GridError(PolarCubeError, ValueError):
    """A grid this project cannot describe (its outline holds a pole or crosses ±180°)."""


@dataclass(frozen=True)
class TargetGrid:
    crs: str
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax: outer cell edges
    resolution: float
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        problem = resolution_problem(self.resolution, self.bbox)
        if problem:
            raise SpecError(f"resolution {self.resolution:g} m: {problem}")

    @classmethod
    def from_spec(cls, spec: CubeSpec, resolution: float | None = None) -> TargetGrid:
        """The spec's grid; `resolution` (metres) overrides the spec's when given (0 is refused,
        not taken as "unset")."""
        return cls(
            crs=spec.spatial_ref,
            bbox=spec.spatial_bbox,
            resolution=float(spec.spatial_res[0] if resolution is None else resolution),
        )

    @property
    def width(self) -> int:
        return round((self.bbox[2] - self.bbox[0]) / self.resolution)

    @property
    def height(self) -> int:
        return round((self.bbox[3] - self.bbox[1]) / self.resolution)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @cached_property
    def x(self) -> np.ndarray:
        """Cell-centre x coordinates, west to east."""
        return self.bbox[0] + self.resolution * (np.arange(self.width) + 0.5)

    @cached_property
    def y(self) -> np.ndarray:
        """Cell-centre y coordinates, south to north (ascending, as published)."""
        return self.bbox[1] + self.resolution * (np.arange(self.height) + 0.5)

    @cached_property
    def pyproj_crs(self) -> CRS:
        return CRS.from_user_input(self.crs)

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks (y, x) of `chunk_size` cells."""
        return _split(self.height, self.chunk_size), _split(self.width, self.chunk_size)


def _split(length: int, size: int) -> tuple[int, ...]:
    full, rest = divmod(length, size)
    return (size,) * full + ((rest,) if rest else ())


def outline_lonlat(grid: TargetGrid, points_per_edge: int = EDGE_POINTS) -> list[list[float]]:
    """The grid's outer edge as a closed lon/lat ring, densified, counter-clockwise.

    Each edge also gets its point nearest to a pole (where a polar grid's edge comes closest
    to it), so the bbox holds the whole outline and not just the samples.
    """
    poles = _poles(grid)
    xmin, ymin, xmax, ymax = grid.bbox
    if any(xmin <= x <= xmax and ymin <= y <= ymax for x, y in poles):
        raise GridError(f"grid {grid.bbox} contains a pole: not supported")
    corners = np.array([(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)])
    points = []
    for start, end in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        steps = [*np.linspace(0, 1, points_per_edge)[:-1], *_nearest(start, end, poles)]
        points += [start + (end - start) * t for t in np.unique(steps)]
    xs, ys = np.array(points).T
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    if np.any(np.abs(np.diff(lon)) > 180):
        raise GridError(f"grid {grid.bbox} crosses the antimeridian: not supported")
    ring = [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]
    if _signed_area(ring) < 0:
        ring.reverse()
    return [*ring, ring[0]]


def _poles(grid: TargetGrid) -> list[tuple[float, float]]:
    """The poles in grid coordinates (those the CRS can project)."""
    to_grid = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    xs, ys = to_grid.transform([0.0, 0.0], [-90.0, 90.0], errcheck=False)
    return [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(x) and np.isfinite(y)]


def _nearest(start: np.ndarray, end: np.ndarray, points: list) -> list[float]:
    """Edge parameters in (0, 1) of the edge points nearest to each of `points`."""
    direction = end - start
    steps = [
        np.dot(np.subtract(p, start), direction) / np.dot(direction, direction) for p in points
    ]
    return [float(t) for t in steps if 0 < t < 1]


def _signed_area(ring: list[list[float]]) -> float:
    x, y = np.array(ring).T
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) / 2)
