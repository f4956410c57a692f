"""One resampler: any `SourceLayer` onto the target grid, chunk by chunk.

For each target chunk the cell centres are mapped into the source CRS, turned into
fractional indices along the source's real (possibly non-uniform) 1-D axes, and only the
source window they touch is read. Linear is bilinear in index space with the weights of
missing (NaN or off-grid) neighbours dropped and the rest renormalised, and no value where
the source cell containing the point is missing, as GDAL's warper does (so data never
spreads into no-data areas); nearest takes the cell whose area contains the centre. Target
cells outside the source's outer cell edges are NaN.

In the grid's own CRS the mapping is separable (one index per column, one per row) and is
computed that way. Across CRSs only the nodes of a lattice over the chunk are transformed
exactly and the points between them interpolated, as GDAL's approximate transformer does;
the lattice is refined until every point lands within `MAX_TRANSFORM_ERROR` target cells of
its exact position (`lattice_transform`).

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
MAX_TRANSFORM_ERROR = 0.01  # target cells: how far an interpolated point may land off its centre
_LATTICE_STEP = 64  # target cells between the first lattice nodes (a power of two)
_FINEST_STEP = 4  # lattice cells still too inaccurate at this size are transformed exactly
_STRIP_ROWS = 128  # target rows computed at once: bounds the float64 temporaries
_BATCH_POINTS = 1 << 18  # lattice points filled at once


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


def lattice_transform(
    transformer: Transformer,
    xs: np.ndarray,
    ys: np.ndarray,
    max_error: float = MAX_TRANSFORM_ERROR,
) -> tuple[np.ndarray, np.ndarray]:
    """`transformer.transform(*np.meshgrid(xs, ys))` for uniform axes `xs`, `ys`, with every
    point within `max_error` cells of its exact position, from few exact transforms.

    Only the nodes of a lattice over the points are transformed; the points between them are
    interpolated bilinearly. The error is measured in target cells: a lattice cell is kept
    when the interpolated source coordinates of its centre and edge midpoints, mapped back
    with the exact inverse transform, land within `max_error / 4` cells of those points (for
    a locally quadratic mapping that is where bilinear interpolation errs most; the margin
    covers the rest). Other cells are split in four down to `_FINEST_STEP` cells, then
    transformed exactly, as are cells whose corners straddle a discontinuity of a geographic
    source (longitudes spanning more than 180°: across the ±180° meridian or round a pole).
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.size < 2 and ys.size < 2:
        return transformer.transform(*np.meshgrid(xs, ys))
    dx = xs[1] - xs[0] if xs.size > 1 else ys[1] - ys[0]
    dy = ys[1] - ys[0] if ys.size > 1 else dx
    step = _LATTICE_STEP
    height, width = -(-ys.size // step) * step, -(-xs.size // step) * step
    lattice = _Lattice(transformer, xs[0], ys[0], dx, dy, width)
    source_x, source_y = np.empty((height, width)), np.empty((height, width))
    cell_rows, cell_cols = np.divmod(np.arange((height // step) * (width // step)), width // step)
    check_v, check_u = np.array([0.0, 0.5, 0.5, 0.5, 1.0]), np.array([0.5, 0.0, 0.5, 1.0, 0.5])
    geographic_source = transformer.target_crs.is_geographic
    while cell_rows.size:
        corner_x, corner_y = lattice.corners(cell_rows, cell_cols, step)
        checked_x, checked_y = lattice.target(
            (cell_rows[:, np.newaxis] + check_v) * step, (cell_cols[:, np.newaxis] + check_u) * step
        )
        back_x, back_y = transformer.transform(
            _interpolate(corner_x, check_v, check_u),
            _interpolate(corner_y, check_v, check_u),
            direction="INVERSE",
        )
        error = np.hypot((back_x - checked_x) / dx, (back_y - checked_y) / dy).max(axis=1)
        straddling = np.zeros(cell_rows.size, dtype=bool)
        if geographic_source:
            straddling = np.ptp(corner_x, axis=1) > 180.0
        good = (error <= max_error / 4) & ~straddling  # NaN (failed transform) is not good
        # the error shrinks with the square of the step: hopeless cells go exact at once
        hopeless = ~(error * (_FINEST_STEP / step) ** 2 <= max_error / 4)
        exact = ~good & (straddling | hopeless)
        for array, corners in ((source_x, corner_x[good]), (source_y, corner_y[good])):
            _fill_cells(array, step, cell_rows[good], cell_cols[good], corners)
        _fill_cells_exactly(lattice, source_x, source_y, step, cell_rows[exact], cell_cols[exact])
        split = ~good & ~exact
        cell_rows = (2 * cell_rows[split, np.newaxis] + np.array([0, 0, 1, 1])).ravel()
        cell_cols = (2 * cell_cols[split, np.newaxis] + np.array([0, 1, 0, 1])).ravel()
        step //= 2
    return source_x[: ys.size, : xs.size], source_y[: ys.size, : xs.size]


class _Lattice:
    """Target points by (row, column) index on uniform axes, and exact transforms of them."""

    def __init__(self, transformer: Transformer, x0, y0, dx, dy, width: int) -> None:
        self.transformer = transformer
        self.x0, self.y0, self.dx, self.dy = x0, y0, dx, dy
        self.node_columns = width + 1

    def target(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x0 + cols * self.dx, self.y0 + rows * self.dy

    def transform(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.target(*np.broadcast_arrays(rows, cols))
        return self.transformer.transform(x, y)

    def corners(self, cell_rows, cell_cols, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of the corners of `step`-sized lattice cells, (k, 4) in the
        order (row, col), (row, col + 1), (row + 1, col), (row + 1, col + 1), each shared
        node transformed once."""
        rows = (cell_rows[:, np.newaxis] + np.array([0, 0, 1, 1])) * step
        cols = (cell_cols[:, np.newaxis] + np.array([0, 1, 0, 1])) * step
        nodes, which = np.unique((rows * self.node_columns + cols).ravel(), return_inverse=True)
        x, y = self.transform(*np.divmod(nodes, self.node_columns))
        return x[which].reshape(rows.shape), y[which].reshape(rows.shape)


def _interpolate(corners: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Bilinear between each cell's corners (k, 4, ordered as `_Lattice.corners` gives
    them) at fractions `v` of a cell along the rows and `u` along the columns."""
    ndim = np.broadcast(v, u).ndim
    at_00, at_01, at_10, at_11 = (corners[:, i].reshape((-1,) + (1,) * ndim) for i in range(4))
    first_col = at_00 + (at_10 - at_00) * v
    last_col = at_01 + (at_11 - at_01) * v
    return first_col + (last_col - first_col) * u


def _cell_view(array: np.ndarray, step: int) -> np.ndarray:
    """`array` as (cell row, row in cell, cell column, column in cell), a view."""
    height, width = array.shape
    return array.reshape(height // step, step, width // step, step)


def _fill_cells(array, step: int, cell_rows, cell_cols, corners: np.ndarray) -> None:
    """Interpolate every point of the given lattice cells from their corners."""
    fraction = np.arange(step) / step
    batch = max(1, _BATCH_POINTS // step**2)
    for start in range(0, cell_rows.size, batch):
        part = slice(start, start + batch)
        _cell_view(array, step)[cell_rows[part], :, cell_cols[part], :] = _interpolate(
            corners[part], fraction[:, np.newaxis], fraction[np.newaxis, :]
        )


def _fill_cells_exactly(lattice: _Lattice, source_x, source_y, step, cell_rows, cell_cols):
    """Transform every point of the given lattice cells exactly."""
    offsets = np.arange(step)
    batch = max(1, _BATCH_POINTS // step**2)
    for start in range(0, cell_rows.size, batch):
        part = slice(start, start + batch)
        rows = cell_rows[part, np.newaxis, np.newaxis] * step + offsets[:, np.newaxis]
        cols = cell_cols[part, np.newaxis, np.newaxis] * step + offsets
        x, y = lattice.transform(rows, cols)
        _cell_view(source_x, step)[cell_rows[part], :, cell_cols[part], :] = x
        _cell_view(source_y, step)[cell_rows[part], :, cell_cols[part], :] = y


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
        return self.resample_block(slice(row0, row1), slice(col0, col1))

    def resample_block(self, rows: slice, cols: slice) -> np.ndarray:
        """The float32 values of target rows `rows` and columns `cols`."""
        xs, ys = self.grid.x[cols], self.grid.y[rows]
        if self.same_crs:  # separable: one index per column and one per row
            fx = fractional_index(self.src_x, xs)[np.newaxis, :]
            fy = fractional_index(self.src_y, ys)[:, np.newaxis]
        else:
            transformer = Transformer.from_crs(self.grid.crs, self.source_crs, always_xy=True)
            sx, sy = lattice_transform(transformer, xs, ys)
            fx = fractional_index(self.src_x, sx)
            del sx  # one chunk-sized coordinate array at a time
            fy = fractional_index(self.src_y, sy)
            del sy
        x_range, y_range = _finite_range(fx), _finite_range(fy)
        if x_range is None or y_range is None:
            return np.full((ys.size, xs.size), np.nan, dtype=np.float32)
        if self.method == "nearest":
            return self._nearest(fx, fy, x_range, y_range)
        window = self._bilinear_window(x_range, y_range)
        if self.same_crs:
            return window.bilinear_separable(fx[0], fy[:, 0])
        return window.bilinear(fx, fy)

    def _read_window(self, j0: int, j1: int, i0: int, i1: int) -> np.ndarray:
        """Source rows j0..j1 and columns i0..i1 (inclusive), masked by the spec's rules.

        A failing lazy read (a file damaged after it was opened) becomes a SourceFormatError
        naming the file; dask re-raises it as is to whoever computes the chunk.
        """
        failure = None
        try:
            window = self.data.isel(y=slice(j0, j1 + 1), x=slice(i0, i1 + 1)).values
        except (OSError, RuntimeError) as error:  # rasterio's "Read failed", netCDF/HDF5 errors
            failure = f"{type(error).__name__}: {error}"
        if failure is not None:
            # Raised outside the `except`: GDAL's error as its context would not unpickle, and
            # dask.distributed would then hand the caller a bare Exception instead.
            source = self.data.encoding.get("source", self.data.name)
            raise SourceFormatError(
                f"{source}: cannot read rows {j0}..{j1}, columns {i0}..{i1} "
                f"(truncated or damaged?): {failure}"
            )
        window = np.asarray(window, dtype=np.float64)
        if self.valid_if:
            valid = np.ones(window.shape, dtype=bool)
            with np.errstate(invalid="ignore"):
                for condition in self.valid_if:
                    valid &= condition.holds(window)
            window = np.where(valid, window, np.nan)
        return window

    def _nearest(self, fx: np.ndarray, fy: np.ndarray, x_range, y_range) -> np.ndarray:
        i0, i1 = (int(np.floor(bound + 0.5)) for bound in x_range)
        j0, j1 = (int(np.floor(bound + 0.5)) for bound in y_range)
        window = self._read_window(j0, j1, i0, i1)
        height, width = window.shape
        table = np.full((height + 1, width + 1), np.nan, dtype=np.float32)  # last row/col: none
        table[:height, :width] = window
        out = np.empty(np.broadcast_shapes(fx.shape, fy.shape), dtype=np.float32)
        for strip in _strips(out.shape[0]):
            rows = np.floor(_rows_of(fy, strip) + 0.5)
            cols = np.floor(_rows_of(fx, strip) + 0.5)
            out[strip] = table[
                np.where(np.isfinite(rows), rows - j0, height).astype(np.intp),
                np.where(np.isfinite(cols), cols - i0, width).astype(np.intp),
            ]
        return out

    def _bilinear_window(self, x_range, y_range) -> _Window:
        """The source window bilinear needs for fractional indices within these ranges."""
        i0 = max(int(np.floor(x_range[0])), 0)
        i1 = min(int(np.floor(x_range[1])) + 1, self.src_x.size - 1)
        j0 = max(int(np.floor(y_range[0])), 0)
        j1 = min(int(np.floor(y_range[1])) + 1, self.src_y.size - 1)
        return _Window(self._read_window(j0, j1, i0, i1), i0, j0)


class _Window:
    """A source window for bilinear, padded with one cell of no data all round so that
    neighbours beyond it weigh 0: `values` (NaN as 0) and `valid` (the weight of a cell)."""

    def __init__(self, window: np.ndarray, i0: int, j0: int) -> None:
        self.i0, self.j0 = i0, j0
        self.valid = np.zeros((window.shape[0] + 2, window.shape[1] + 2), dtype=bool)
        self.valid[1:-1, 1:-1] = np.isfinite(window)
        self.complete = bool(self.valid[1:-1, 1:-1].all())  # no missing cell inside
        self.values = np.zeros(self.valid.shape)
        self.values[1:-1, 1:-1] = window
        if not self.complete:
            self.values[~self.valid] = 0.0

    def bilinear_separable(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """For one index per column (`fx`) and one per row (`fy`), a strip of target rows at
        a time: along x on the source rows the strip uses, then along y."""
        if self.complete:
            return self._bilinear_complete(fx, fy)
        col, col_weights, nearest_col = _neighbours(fx, self.i0)
        row, row_weights, nearest_row = _neighbours(fy, self.j0)
        out = np.empty((fy.size, fx.size), dtype=np.float32)
        for strip in _strips(fy.size):
            used, lower, upper = _rows_used(row[strip])
            lower_weight = row_weights[0][strip, np.newaxis]
            upper_weight = row_weights[1][strip, np.newaxis]
            sums = []  # weighted sums of the values, sums of the weights
            for padded in (self.values, self.valid):
                rows = padded[used]
                along_x = rows[:, col] * col_weights[0]
                along_x += rows[:, col + 1] * col_weights[1]
                along_y = along_x[lower]
                along_y *= lower_weight
                upper_part = along_x[upper]
                upper_part *= upper_weight
                along_y += upper_part
                sums.append(along_y)
            containing = self.valid[nearest_row[strip, np.newaxis], nearest_col]
            out[strip] = _renormalised(*sums, containing)
        return out

    def _bilinear_complete(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """`bilinear_separable` for a window without missing cells, where only the padding
        (beyond the source's edges) is invalid: validity is then separable too, so the
        renormalised weights are per axis and each strip is two weighted row sums."""
        cols, col_weights, col_ok = _axis_weights(fx, self.i0, self.valid.shape[1] - 2)
        rows, row_weights, row_ok = _axis_weights(fy, self.j0, self.valid.shape[0] - 2)
        out = np.empty((fy.size, fx.size), dtype=np.float32)
        for strip in _strips(fy.size):
            used, lower, upper = _rows_used(rows[strip])
            source_rows = self.values[used]
            along_x = source_rows[:, cols] * col_weights[0]
            along_x += source_rows[:, cols + 1] * col_weights[1]
            along_y = along_x[lower]
            along_y *= row_weights[0][strip, np.newaxis]
            upper_part = along_x[upper]
            upper_part *= row_weights[1][strip, np.newaxis]
            along_y += upper_part
            out[strip] = along_y
        out[~row_ok] = np.nan
        out[:, ~col_ok] = np.nan
        return out

    def bilinear(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """For indices `fx`, `fy` given at every target point, a strip of rows at a time."""
        width = self.valid.shape[1]
        values, valid = self.values.ravel(), self.valid.ravel()
        out = np.empty(fx.shape, dtype=np.float32)
        for strip in _strips(fx.shape[0]):
            base_x, base_y = np.floor(fx[strip]), np.floor(fy[strip])
            upper_x, upper_y = fx[strip] - base_x, fy[strip] - base_y  # weights of the upper
            first = (base_y - (self.j0 - 1)) * width + (base_x - (self.i0 - 1))
            first = np.nan_to_num(first, copy=False, nan=0.0).astype(np.intp)
            total, weights = np.zeros(first.shape), np.zeros(first.shape)
            weights_x = (1.0 - upper_x, upper_x)
            for dy, weight_y in enumerate((1.0 - upper_y, upper_y)):
                for dx, weight_x in enumerate(weights_x):
                    offset = dy * width + dx
                    weight = weight_y * weight_x
                    weights += weight * np.take(valid[offset:], first)
                    weight *= np.take(values[offset:], first)
                    total += weight
            nearest = first + width * (upper_y >= 0.5) + (upper_x >= 0.5)
            out[strip] = _renormalised(total, weights, np.take(valid, nearest))
        return out


def _neighbours(f: np.ndarray, start: int) -> tuple[np.ndarray, tuple, np.ndarray]:
    """For 1-D fractional indices `f` into a padded window starting at source index
    `start`: the index of the lower neighbour, the weights of the lower and upper ones, and
    the index of the nearest cell (the padding, never valid, where `f` is NaN)."""
    base = np.floor(f)
    finite = np.isfinite(f)
    lower = np.where(finite, base - start + 1, 0).astype(np.intp)
    nearest = np.where(finite, np.floor(f + 0.5) - start + 1, 0).astype(np.intp)
    upper_weight = f - base
    return lower, (1.0 - upper_weight, upper_weight), nearest


def _rows_used(lower_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window rows that lower neighbours `lower_rows` and the rows above them use, once
    each, and where each lower and upper neighbour is among them."""
    used, at = np.unique(np.concatenate([lower_rows, lower_rows + 1]), return_inverse=True)
    lower, upper = np.split(at, 2)
    return used, lower, upper


def _axis_weights(f: np.ndarray, start: int, size: int) -> tuple[np.ndarray, tuple, np.ndarray]:
    """`_neighbours` along one axis of a complete window of `size` cells (padded indices
    1..size are valid): the lower neighbour's index, the two weights renormalised over the
    valid neighbours, and where there is a value at all (the nearest cell is valid)."""
    lower, (lower_weight, upper_weight), nearest = _neighbours(f, start)
    ok = (nearest >= 1) & (nearest <= size)
    lower_weight = np.where(ok & (lower >= 1), lower_weight, 0.0)
    upper_weight = np.where(ok & (lower + 1 <= size), upper_weight, 0.0)
    total = lower_weight + upper_weight
    total[~ok] = 1.0
    lower[~ok] = 0
    return lower, (lower_weight / total, upper_weight / total), ok


def _finite_range(f: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values of `f`, None if there are none."""
    low, high = np.fmin.reduce(f, axis=None), np.fmax.reduce(f, axis=None)
    return None if np.isnan(low) else (float(low), float(high))


def _strips(rows: int):
    """Slices of at most `_STRIP_ROWS` rows covering `rows` rows."""
    return (slice(start, start + _STRIP_ROWS) for start in range(0, rows, _STRIP_ROWS))


def _rows_of(array: np.ndarray, strip: slice) -> np.ndarray:
    """The `strip` rows of `array`, or `array` itself when it has one row to broadcast."""
    return array if array.shape[0] == 1 else array[strip]


def _renormalised(total: np.ndarray, weights: np.ndarray, containing: np.ndarray) -> np.ndarray:
    """total / weights where the containing cell is valid and the weights count, else NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        total /= weights
    total[~(containing & (weights > _MIN_WEIGHT))] = np.nan
    return total


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
