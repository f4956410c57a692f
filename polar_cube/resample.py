"""One resampler: any `SourceLayer` onto the target grid, chunk by chunk.

For each target chunk the cell centres are mapped into the source CRS, turned into
fractional indices along the source's real (possibly non-uniform) 1-D axes, and only the
source window they touch is read. Linear is bilinear in index space with the weights of
missing (NaN or off-grid) neighbours dropped and the rest renormalised, and no value where
the source cell containing the point is missing, as GDAL's warper does (so data never
spreads into no-data areas); nearest takes the cell whose area contains the centre. Target
cells outside the source's outer cell edges are NaN.

Downsampling (a target coarser than the source, e.g. a quick 1 km run from 250 m) samples
points: GDAL instead widens its kernel there. At the cube's 100 m every source is coarser.
"""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
import xarray as xr
from pyproj import CRS, Transformer

from polar_cube.grid import TargetGrid
from polar_cube.readers import SourceFormatError, SourceLayer
from polar_cube.spec import ResamplingMethod, ValidCondition

_MIN_WEIGHT = 1e-5  # below this the valid neighbours hardly touch the point: no data


def fractional_index(axis: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Position of `coords` along the cell centres `axis` (monotonic, maybe non-uniform),
    in index units; NaN outside the outer cell edges (half a cell beyond the end centres)."""
    axis = np.asarray(axis, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    n = axis.size
    descending = axis[-1] < axis[0]
    ascending_axis = axis[::-1] if descending else axis
    frac = np.interp(coords, ascending_axis, np.arange(n, dtype=np.float64))
    below = coords < ascending_axis[0]
    above = coords > ascending_axis[-1]
    frac[below] = (coords[below] - ascending_axis[0]) / (ascending_axis[1] - ascending_axis[0])
    frac[above] = (
        n - 1 + (coords[above] - ascending_axis[-1]) / (ascending_axis[-1] - ascending_axis[-2])
    )
    frac[(frac < -0.5) | (frac >= n - 0.5) | ~np.isfinite(coords)] = np.nan
    return (n - 1) - frac if descending else frac


class BlockResampler:
    """Computes one target chunk of one layer; picklable, so dask workers can run it."""

    def __init__(
        self,
        layer: SourceLayer,
        grid: TargetGrid,
        method: ResamplingMethod,
        valid_if: tuple[ValidCondition, ...] = (),
    ) -> None:
        self.data = layer.data
        self.source_crs = layer.crs
        self.grid = grid
        self.method = method
        self.valid_if = valid_if
        self.src_x = np.asarray(layer.data["x"].values, dtype=np.float64)
        self.src_y = np.asarray(layer.data["y"].values, dtype=np.float64)
        if self.src_x.size < 2 or self.src_y.size < 2:
            raise SourceFormatError(f"{layer.description}: needs at least 2x2 cells")
        self.same_crs = CRS.from_user_input(layer.crs).equals(grid.pyproj_crs)

    def __call__(self, block_info: dict | None = None) -> np.ndarray:
        (row0, row1), (col0, col1) = block_info[None]["array-location"]
        return self.resample_block(slice(row0, row1), slice(col0, col1)).astype(np.float32)

    def resample_block(self, rows: slice, cols: slice) -> np.ndarray:
        xs, ys = self.grid.x[cols], self.grid.y[rows]
        if self.same_crs:  # separable: one index per column and one per row
            fx = fractional_index(self.src_x, xs)[np.newaxis, :]
            fy = fractional_index(self.src_y, ys)[:, np.newaxis]
        else:
            transformer = Transformer.from_crs(self.grid.crs, self.source_crs, always_xy=True)
            sx, sy = transformer.transform(*np.meshgrid(xs, ys))
            fx, fy = fractional_index(self.src_x, sx), fractional_index(self.src_y, sy)
        shape = (ys.size, xs.size)
        if self.method == "nearest":
            return self._nearest(fx, fy, shape)
        return self._bilinear(fx, fy, shape)

    def _read_window(self, j0: int, j1: int, i0: int, i1: int) -> np.ndarray:
        """Source rows j0..j1 and columns i0..i1 (inclusive), masked by the spec's rules."""
        window = self.data.isel(y=slice(j0, j1 + 1), x=slice(i0, i1 + 1)).values
        window = np.asarray(window, dtype=np.float64)
        if self.valid_if:
            valid = np.ones(window.shape, dtype=bool)
            with np.errstate(invalid="ignore"):
                for condition in self.valid_if:
                    valid &= condition.holds(window)
            window = np.where(valid, window, np.nan)
        return window

    def _nearest(self, fx: np.ndarray, fy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        ix, iy = np.floor(fx + 0.5), np.floor(fy + 0.5)
        inside = np.broadcast_to(np.isfinite(ix) & np.isfinite(iy), shape)
        out = np.full(shape, np.nan)
        if not inside.any():
            return out
        i0, i1 = int(np.nanmin(ix)), int(np.nanmax(ix))
        j0, j1 = int(np.nanmin(iy)), int(np.nanmax(iy))
        window = self._read_window(j0, j1, i0, i1)
        cols = np.where(np.isfinite(ix), ix - i0, 0).astype(np.intp)
        rows = np.where(np.isfinite(iy), iy - j0, 0).astype(np.intp)
        values = window[rows, cols]
        out[inside] = np.broadcast_to(values, shape)[inside]
        return out

    def _bilinear(self, fx: np.ndarray, fy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        base_x, base_y = np.floor(fx), np.floor(fy)
        inside = np.broadcast_to(np.isfinite(base_x) & np.isfinite(base_y), shape)
        if not inside.any():
            return np.full(shape, np.nan)
        nx, ny = self.src_x.size, self.src_y.size
        i0 = max(int(np.nanmin(base_x)), 0)
        i1 = min(int(np.nanmax(base_x)) + 1, nx - 1)
        j0 = max(int(np.nanmin(base_y)), 0)
        j1 = min(int(np.nanmax(base_y)) + 1, ny - 1)
        window = self._read_window(j0, j1, i0, i1)
        containing = window[
            np.where(np.isfinite(fy), np.floor(fy + 0.5) - j0, 0).astype(np.intp),
            np.where(np.isfinite(fx), np.floor(fx + 0.5) - i0, 0).astype(np.intp),
        ]
        inside = inside & np.isfinite(containing)
        total = np.zeros(shape)
        weights = np.zeros(shape)
        for dy in (0, 1):
            row = base_y + dy
            weight_y = 1.0 - np.abs(fy - row)
            row_ok = (row >= j0) & (row <= j1)
            rows = np.where(row_ok, row - j0, 0).astype(np.intp)
            for dx in (0, 1):
                col = base_x + dx
                weight_x = 1.0 - np.abs(fx - col)
                col_ok = (col >= i0) & (col <= i1)
                cols = np.where(col_ok, col - i0, 0).astype(np.intp)
                values = window[rows, cols]
                weight = np.where(row_ok & col_ok & np.isfinite(values), weight_y * weight_x, 0.0)
                total += weight * np.nan_to_num(values)
                weights += weight
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(inside & (weights > _MIN_WEIGHT), total / weights, np.nan)


def resample_layer(
    layer: SourceLayer,
    grid: TargetGrid,
    method: ResamplingMethod,
    valid_if: tuple[ValidCondition, ...] = (),
) -> xr.DataArray:
    """A lazy (dask) float32 DataArray (y, x) of `layer` on `grid`, one task per chunk."""
    block = BlockResampler(layer, grid, method, valid_if)
    array = da.map_blocks(
        block,
        chunks=grid.chunks(),
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name=f"resample-{uuid.uuid4().hex}",  # naming it keeps dask from hashing the source
    )
    return xr.DataArray(array, dims=("y", "x"), coords={"y": grid.y, "x": grid.x})
