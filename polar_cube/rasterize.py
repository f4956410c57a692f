"""Polygons burnt straight onto the target grid, chunk by chunk (no intermediate raster)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import geopandas
import numpy as np
import xarray as xr
from pyproj import CRS
from rasterio.features import rasterize
from rasterio.transform import from_origin

from polar_cube.blank import constant
from polar_cube.grid import TargetGrid
from polar_cube.sources.checks import check_polygons
from polar_cube.sources.readers import SourceFormatError


@dataclass(frozen=True)
class PolygonLayer:
    """Polygons with an integer class code each, in the target CRS, sorted by code."""

    frame: geopandas.GeoDataFrame  # columns: geometry, code
    background: float
    description: str


def read_polygons(
    path: Path, attribute: str, classes: dict[str, int], background: float | None, crs: str
) -> PolygonLayer:
    """Read a vector file (a shapefile must be as long as its headers say); map `attribute`
    values to codes with `classes`."""
    check_polygons(path, read_features=False)
    try:
        frame = geopandas.read_file(path)
    except Exception as error:  # pyogrio raises several types for unreadable files
        raise SourceFormatError(f"{path}: cannot read polygons: {error}") from None
    if attribute not in frame.columns:
        raise SourceFormatError(
            f"{path}: no attribute {attribute!r} (has: {', '.join(map(str, frame.columns))})"
        )
    unknown = sorted(set(frame[attribute].dropna().astype(str)) - set(classes))
    if unknown:
        raise SourceFormatError(
            f"{path}: {attribute} values {unknown} have no code in the spec's classes {classes}"
        )
    if frame.crs is None:
        frame = frame.set_crs(crs)
    frame = frame.assign(code=frame[attribute].astype(str).map(classes))[["geometry", "code"]]
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    counts = ", ".join(f"{n} {name}" for name, n in frame_counts(frame, classes).items())
    return PolygonLayer(
        frame=frame.sort_values("code", kind="stable"),
        background=np.nan if background is None else float(background),
        description=f"Read {len(frame)} polygons ({counts}) from {path.name}",
    )


def frame_counts(frame: geopandas.GeoDataFrame, classes: dict[str, int]) -> dict[str, int]:
    return {name: int((frame["code"] == code).sum()) for name, code in classes.items()}


class BlockRasterizer:
    """Burns the polygons touching one target chunk; picklable for dask workers."""

    def __init__(self, layer: PolygonLayer, grid: TargetGrid) -> None:
        frame = layer.frame
        if not CRS.from_user_input(frame.crs).equals(grid.pyproj_crs):
            frame = frame.to_crs(grid.crs)
        self.frame = frame
        self.background = layer.background
        self.grid = grid

    def __call__(self, block_info: dict | None = None) -> np.ndarray:
        (row0, row1), (col0, col1) = block_info[None]["array-location"]
        res = self.grid.resolution
        west = self.grid.bbox[0] + col0 * res
        south = self.grid.bbox[1] + row0 * res
        shape = (row1 - row0, col1 - col0)
        north, east = south + shape[0] * res, west + shape[1] * res
        hits = self.frame.iloc[self.frame.sindex.query(_box(west, south, east, north))]
        if hits.empty:  # no polygon here: the background throughout, taking no memory
            return constant(shape, self.background)
        burnt = rasterize(
            zip(hits.geometry, hits["code"].astype(float), strict=True),
            out_shape=shape,
            transform=from_origin(west, north, res, res),
            fill=self.background,
            dtype="float32",
        )
        return burnt[::-1]  # rasterio writes north-up; our y ascends


def _box(west: float, south: float, east: float, north: float):
    from shapely.geometry import box

    return box(west, south, east, north)


def rasterize_layer(layer: PolygonLayer, grid: TargetGrid) -> xr.DataArray:
    """A lazy float32 DataArray (y, x): each cell takes the code of the polygon containing
    its centre (the highest code where polygons overlap), else the background."""
    array = da.map_blocks(
        BlockRasterizer(layer, grid),
        chunks=grid.chunks(),
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name=f"rasterize-{uuid.uuid4().hex}",
    )
    return xr.DataArray(array, dims=("y", "x"), coords={"y": grid.y, "x": grid.x})
