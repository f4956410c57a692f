"""The target grid: a regular, north-up grid of cell centres, both axes ascending."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pyproj import CRS

from polar_cube.spec import CubeSpec, SpecError, resolution_problem

CHUNK_SIZE = 2048


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
