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

Hand-written rather than rioxarray's `reproject` or odc-geo: those warp through GDAL on a
whole array (or need the source in a GDAL-readable file per chunk), where this one is a
dask graph reading only each chunk's source window, also from non-uniform netCDF axes and
GMT grids, in bounded memory, and it agrees with gdalwarp (`tests/test_reprojection.py`).
"""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
import xarray as xr
from pyproj import CRS, Transformer

from polar_cube.blank import blank
from polar_cube.grid import TargetGrid
from polar_cube.sources.readers import SourceFormatError, SourceLayer
from polar_cube.spec import ResamplingMethod, ValidCondition

_MIN_WEIGHT = 1e-5  # below this the valid neighbours hardly touch the point: no data
MAX_TRANSFORM_ERROR = 0.01  # target cells: how far an interpolated point may land off its centre
_LATTICE_STEP = 64  # target cells between the first lattice nodes (a power of two)
_FINEST_STEP = 4  # lattice cells still too inaccurate at this size are transformed exactly
_STRIP_ROWS = 128  # target rows computed at once: bounds the temporaries
_BATCH_POINTS = 1 << 18  # lattice points filled at once


def fractional_index(axis: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Position of `coords` along the cell centres `axis` (monotonic, maybe non-uniform),
    in index units; NaN outside the outer cell edges (half a cell beyond the end centres)."""
    axis = np.asarray(axis, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    n = axis.size
    spacing = np.diff(axis)
    if np.all(np.abs(spacing - spacing[0]) <= 1e-9 * abs(spacing[0])):  # uniform: affine
        frac = (coords - axis[0]) / spacing[0]
        # the same edges as below: the upper one (in coordinates) is beyond the source
        if spacing[0] > 0:
            frac[(frac < -0.5) | (frac >= n - 0.5)] = np.nan
        else:
            frac[(frac <= -0.5) | (frac > n - 0.5)] = np.nan
        return frac
    index = np.arange(n, dtype=np.float64)
    descending = axis[-1] < axis[0]
    if descending:
        axis, index = axis[::-1], index[::-1]
    # the outer edges as two more nodes: linear beyond the end centres, NaN past the edges
    edges = (axis[0] - (axis[1] - axis[0]) / 2, axis[-1] + (axis[-1] - axis[-2]) / 2)
    outer = (index[0] - (index[1] - index[0]) / 2, index[-1] + (index[-1] - index[-2]) / 2)
    nodes = np.concatenate([[edges[0]], axis, [edges[1]]])
    positions = np.concatenate([[outer[0]], index, [outer[1]]])
    frac = np.interp(coords, nodes, positions, left=np.nan, right=np.nan)
    # the upper edge (in coordinates) belongs to the next cell, beyond the source
    frac[(frac <= -0.5) if descending else (frac >= n - 0.5)] = np.nan
    return frac


def lattice_transform(
    transformer: Transformer,
    xs: np.ndarray,
    ys: np.ndarray,
    max_error: float = MAX_TRANSFORM_ERROR,
) -> tuple[np.ndarray, np.ndarray]:
    """`transformer.transform(*np.meshgrid(xs, ys))` for uniform axes `xs`, `ys`, with every
    point within `max_error` cells of its exact position (see `lattice_mapping`)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.size < 2 and ys.size < 2:
        return transformer.transform(*np.meshgrid(xs, ys))
    return lattice_mapping(transformer, xs, ys, max_error).rows(0, ys.size)


def lattice_mapping(
    transformer: Transformer,
    xs: np.ndarray,
    ys: np.ndarray,
    max_error: float = MAX_TRANSFORM_ERROR,
) -> _LatticeMapping:
    """The source coordinates of the points `np.meshgrid(xs, ys)` (uniform axes, at least
    two points along one) from few exact transforms, row by row on demand.

    Only the nodes of a lattice over the points are transformed; the points between them are
    interpolated bilinearly (separably, row and column). The error is measured in target
    cells: a lattice cell passes when the interpolated source coordinates of its centre and
    edge midpoints, mapped back with the exact inverse transform, land within
    `max_error / 4` cells of those points (for a locally quadratic mapping that is where
    bilinear interpolation errs most; the margin covers the rest). The lattice starts at
    `_LATTICE_STEP` cells; its step is halved, down to `_FINEST_STEP`, until every cell
    passes (the error shrinks with the square of the step, which predicts the step to try).
    Cells that still fail are transformed exactly, as are cells whose corners straddle a
    discontinuity of a geographic source (longitudes spanning more than 180°: across the
    ±180° meridian or round a pole).
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    dx = xs[1] - xs[0] if xs.size > 1 else ys[1] - ys[0]
    dy = ys[1] - ys[0] if ys.size > 1 else dx
    height, width = (-(-size // _LATTICE_STEP) * _LATTICE_STEP for size in (ys.size, xs.size))
    lattice = _Lattice(transformer, xs[0], ys[0], dx, dy)
    step = _LATTICE_STEP
    nodes, error, straddling = lattice.check(step, height, width)
    # cells that even the finest step would not bring within the error go exact at once
    exact = straddling | ~(error * (_FINEST_STEP / step) ** 2 <= max_error / 4)
    worst = float(error[~exact].max(initial=0.0))
    while step > _FINEST_STEP and worst * (step / _LATTICE_STEP) ** 2 > max_error / 4:
        step //= 2
    while step < _LATTICE_STEP:
        exact_here = np.repeat(np.repeat(exact, _LATTICE_STEP // step, 0), _LATTICE_STEP // step, 1)
        nodes, error, straddling = lattice.check(step, height, width)
        failing = ~(error <= max_error / 4) | straddling
        if step == _FINEST_STEP or not (failing & ~exact_here).any():
            exact = exact_here | failing
            break
        step //= 2
    return _LatticeMapping(lattice, nodes, step, exact, xs.size)


class _Lattice:
    """Target points by (row, column) index on uniform axes, and exact transforms of them."""

    def __init__(self, transformer: Transformer, x0, y0, dx, dy) -> None:
        self.transformer = transformer
        self.x0, self.y0, self.dx, self.dy = x0, y0, dx, dy

    def target(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x0 + cols * self.dx, self.y0 + rows * self.dy

    def transform(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.target(*np.broadcast_arrays(rows, cols))
        return self.transformer.transform(x, y)

    def check(self, step: int, height: int, width: int):
        """The lattice of `step` over `height` × `width` points: its nodes' source
        coordinates (x, y, each (height/step + 1, width/step + 1)), and per cell the error of
        interpolation in target cells (largest at the centre and edge midpoints) and whether
        its corners straddle a discontinuity of a geographic source."""
        rows = np.arange(0, height + 1, step, dtype=np.float64)[:, np.newaxis]
        cols = np.arange(0, width + 1, step, dtype=np.float64)[np.newaxis, :]
        node_x, node_y = self.transform(rows, cols)
        half = step / 2
        checks = (  # (row offset, column offset, corners to average) of the checked points
            (half, half, ((0, 0), (0, 1), (1, 0), (1, 1))),
            (0, half, ((0, 0), (0, 1))),
            (step, half, ((1, 0), (1, 1))),
            (half, 0, ((0, 0), (1, 0))),
            (half, step, ((0, 1), (1, 1))),
        )
        error = np.zeros((height // step, width // step))
        failed = np.zeros(error.shape, dtype=bool)  # a transform failed: NaN error
        for row_offset, col_offset, corners in checks:
            guess_x = sum(_corner(node_x, *c) for c in corners) / len(corners)
            guess_y = sum(_corner(node_y, *c) for c in corners) / len(corners)
            back_x, back_y = self.transformer.transform(guess_x, guess_y, direction="INVERSE")
            want_x, want_y = self.target(rows[:-1] + row_offset, cols[:, :-1] + col_offset)
            miss = np.hypot((back_x - want_x) / self.dx, (back_y - want_y) / self.dy)
            failed |= np.isnan(miss)
            error = np.fmax(error, miss)
        error[failed] = np.nan
        straddling = np.zeros(error.shape, dtype=bool)
        if self.transformer.target_crs.is_geographic:
            corner_x = [_corner(node_x, *c) for c in ((0, 0), (0, 1), (1, 0), (1, 1))]
            straddling = np.ptp(np.stack(corner_x), axis=0) > 180.0
        return (node_x, node_y), error, straddling


def _corner(nodes: np.ndarray, row: int, col: int) -> np.ndarray:
    """Each lattice cell's node at its corner (row, col) in {0, 1}²."""
    return nodes[row : nodes.shape[0] - 1 + row, col : nodes.shape[1] - 1 + col]


class _LatticeMapping:
    """Source coordinates of a chunk's points: bilinear between lattice nodes `step` points
    apart, exact in the cells marked `exact`; produced a strip of rows at a time, so no
    chunk-sized coordinate array is ever built."""

    def __init__(self, lattice: _Lattice, nodes, step: int, exact: np.ndarray, width: int):
        self.lattice, self.step, self.width = lattice, step, width
        fraction = np.arange(step) / step
        self.node_rows = []  # per node row: x and y interpolated along it at every column
        for node_values in nodes:
            left, right = node_values[:, :-1, np.newaxis], node_values[:, 1:, np.newaxis]
            along = (left + (right - left) * fraction).reshape(node_values.shape[0], -1)
            self.node_rows.append(along[:, :width])
        self.bounds = tuple(  # (x0, x1, y0, y1): a bilinear point stays within its corners'
            bound
            for values in nodes
            for bound in (np.fmin.reduce(values, axis=None), np.fmax.reduce(values, axis=None))
        )
        self.exact_cells = list(zip(*np.nonzero(exact), strict=True))
        for cell_row, cell_col in self.exact_cells:
            x, y = self._exactly(cell_row, cell_col, 0, 1 << 62)
            self.bounds = (
                np.fmin(self.bounds[0], np.fmin.reduce(x, axis=None, initial=np.inf)),
                np.fmax(self.bounds[1], np.fmax.reduce(x, axis=None, initial=-np.inf)),
                np.fmin(self.bounds[2], np.fmin.reduce(y, axis=None, initial=np.inf)),
                np.fmax(self.bounds[3], np.fmax.reduce(y, axis=None, initial=-np.inf)),
            )

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Source x and y of target rows `start`..`stop` (exclusive), every column."""
        rows = np.arange(start, stop)
        node_row, fraction = np.divmod(rows, self.step)
        fraction = (fraction / self.step)[:, np.newaxis]
        result = []
        for along in self.node_rows:
            top, bottom = along[node_row], along[node_row + 1]
            bottom -= top
            bottom *= fraction
            bottom += top
            result.append(bottom)
        for cell_row, cell_col in self.exact_cells:
            first = cell_row * self.step
            if first < stop and first + self.step > start:
                x, y = self._exactly(cell_row, cell_col, start, stop)
                inside = slice(max(first, start) - start, min(first + self.step, stop) - start)
                cols = slice(cell_col * self.step, min((cell_col + 1) * self.step, self.width))
                result[0][inside, cols], result[1][inside, cols] = x, y
        return result[0], result[1]

    def _exactly(self, cell_row: int, cell_col: int, start: int, stop: int):
        """Exact source x and y of a lattice cell's points within target rows start..stop."""
        first_row, first_col = cell_row * self.step, cell_col * self.step
        rows = np.arange(max(first_row, start), min(first_row + self.step, stop))
        cols = np.arange(first_col, min(first_col + self.step, self.width))
        return self.lattice.transform(rows[:, np.newaxis], cols[np.newaxis, :])


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
            if self.method == "linear" and max(xs.size, ys.size) > 1:
                return self._bilinear_reprojected(lattice_mapping(transformer, xs, ys), ys.size)
            sx, sy = lattice_transform(transformer, xs, ys)
            fx = fractional_index(self.src_x, sx)
            del sx  # one chunk-sized coordinate array at a time
            fy = fractional_index(self.src_y, sy)
            del sy
        x_range, y_range = _finite_range(fx), _finite_range(fy)
        if x_range is None or y_range is None:
            return blank((ys.size, xs.size))  # the source does not reach this chunk
        if self.method == "nearest":
            return self._nearest(fx, fy, x_range, y_range)
        window = self._bilinear_window(x_range, y_range)
        if window.empty:  # e.g. a chunk over land of a sea-ice source
            return blank((ys.size, xs.size))
        if self.same_crs:
            return window.bilinear_separable(fx[0], fy[:, 0])
        return window.bilinear(fx, fy)

    def _bilinear_reprojected(self, mapping: _LatticeMapping, height: int) -> np.ndarray:
        """Bilinear across CRSs, a strip of rows at a time: the window comes from the
        lattice's bounds, each strip's coordinates and indices from the lattice."""
        x_range = _index_range(self.src_x, *mapping.bounds[:2])
        y_range = _index_range(self.src_y, *mapping.bounds[2:])
        if x_range is None or y_range is None:
            return blank((height, mapping.width))
        window = self._bilinear_window(x_range, y_range)
        if window.empty:
            return blank((height, mapping.width))
        out = np.empty((height, mapping.width), dtype=np.float32)
        for strip in _strips(height):
            source_x, source_y = mapping.rows(strip.start, min(strip.stop, height))
            out[strip] = window.bilinear(
                fractional_index(self.src_x, source_x), fractional_index(self.src_y, source_y)
            )
        return out

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
            why = "not allowed" if "Permission denied" in failure else "truncated or damaged?"
            raise SourceFormatError(
                f"{source}: cannot read rows {j0}..{j1}, columns {i0}..{i1} ({why}): {failure}"
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
        if not np.isfinite(window).any():
            return blank(np.broadcast_shapes(fx.shape, fy.shape))
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
        self.empty = not self.complete and not self.valid.any()  # every target cell NaN
        self.values = np.zeros(self.valid.shape, dtype=np.float32)  # as published
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
        whole, width = self._whole(), self.valid.shape[1]
        out = np.empty((fy.size, fx.size), dtype=np.float32)
        for strip in _strips(fy.size):
            strip_weights = (row_weights[0][strip], row_weights[1][strip])
            # plain bilinear, missing cells as 0
            result = _separable(self.values, row[strip], strip_weights, col, col_weights)
            containing = self.valid[nearest_row[strip, np.newaxis], nearest_col]
            partial = containing & ~whole[row[strip, np.newaxis], col]
            at_row, at_col = np.nonzero(partial)
            if at_row.size:  # beside a missing cell: renormalise over the valid neighbours
                result[at_row, at_col] = self._renormalised_at(
                    row[strip][at_row] * width + col[at_col],
                    col_weights[1][at_col],
                    row_weights[1][strip][at_row],
                    (0, 1, width, width + 1),
                )
            result[~containing] = np.nan
            out[strip] = result
        return out

    def _whole(self) -> np.ndarray:
        """Per window cell: it and its neighbours to the right, above and above right are
        all valid (plain bilinear from there needs no renormalising)."""
        whole = np.zeros(self.valid.shape, dtype=bool)
        whole[:-1, :-1] = self.valid[:-1, :-1] & self.valid[:-1, 1:]
        whole[:-1, :-1] &= self.valid[1:, :-1] & self.valid[1:, 1:]
        return whole

    def _bilinear_complete(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """`bilinear_separable` for a window without missing cells, where only the padding
        (beyond the source's edges) is invalid: validity is then separable too, so the
        renormalised weights are per axis and each strip is two weighted row sums."""
        cols, col_weights, col_ok = _axis_weights(fx, self.i0, self.valid.shape[1] - 2)
        rows, row_weights, row_ok = _axis_weights(fy, self.j0, self.valid.shape[0] - 2)
        out = np.empty((fy.size, fx.size), dtype=np.float32)
        for strip in _strips(fy.size):
            strip_weights = (row_weights[0][strip], row_weights[1][strip])
            out[strip] = _separable(self.values, rows[strip], strip_weights, cols, col_weights)
        out[~row_ok] = np.nan
        out[:, ~col_ok] = np.nan
        return out

    def bilinear(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """For indices `fx`, `fy` given at every target point, a strip of rows at a time.

        Plain bilinear from the four neighbours (missing ones count as 0); only points whose
        neighbours are not all valid are then renormalised over the valid ones.
        """
        width = self.valid.shape[1]
        values, valid = self.values.ravel(), self.valid.ravel()
        offsets = (0, 1, width, width + 1)  # from the lower-left neighbour
        whole = self._whole().ravel()
        out = np.empty(fx.shape, dtype=np.float32)
        for strip in _strips(fx.shape[0]):
            base_x, base_y = np.floor(fx[strip]), np.floor(fy[strip])
            upper_x, upper_y = fx[strip] - base_x, fy[strip] - base_y  # weights of the upper
            first = (base_y - (self.j0 - 1)) * width + (base_x - (self.i0 - 1))
            first[np.isnan(first)] = 0  # the padding: never valid
            first = first.astype(np.intp)
            at = [np.take(values[offset:], first) for offset in offsets]
            lower = at[0] * (1.0 - upper_x) + at[1] * upper_x
            upper = at[2] * (1.0 - upper_x) + at[3] * upper_x
            result = lower * (1.0 - upper_y) + upper * upper_y
            nearest = first + width * (upper_y >= 0.5) + (upper_x >= 0.5)
            containing = np.take(valid, nearest)
            partial = np.flatnonzero(containing & ~np.take(whole, first))
            if partial.size:
                result.flat[partial] = self._renormalised_at(
                    first.flat[partial], upper_x.flat[partial], upper_y.flat[partial], offsets
                )
            result[~containing] = np.nan
            out[strip] = result
        return out

    def _renormalised_at(self, first, upper_x, upper_y, offsets) -> np.ndarray:
        """Bilinear over the valid neighbours only (NaN if they hardly weigh), at points
        given by their lower-left neighbour `first` and the weights of the upper ones."""
        values, valid = self.values.ravel(), self.valid.ravel()
        total, weights = np.zeros(first.shape), np.zeros(first.shape)
        corner_weights = [
            (1.0 - upper_y) * (1.0 - upper_x),
            (1.0 - upper_y) * upper_x,
            upper_y * (1.0 - upper_x),
            upper_y * upper_x,
        ]
        for offset, weight in zip(offsets, corner_weights, strict=True):
            weight = weight * np.take(valid[offset:], first)
            weights += weight
            total += weight * np.take(values[offset:], first)
        return _renormalised(total, weights, np.ones(first.shape, dtype=bool))


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


def _separable(values, rows, row_weights, cols, col_weights) -> np.ndarray:
    """Bilinear with one lower neighbour and weight pair per target row (`rows`,
    `row_weights`) and per column (`cols`, `col_weights`): along x on the window rows the
    strip uses, then along y."""
    used, lower, upper = _rows_used(rows)
    source_rows = values[used]
    weights = [np.asarray(w, dtype=values.dtype) for w in (*col_weights, *row_weights)]
    along_x = source_rows[:, cols] * weights[0]
    along_x += source_rows[:, cols + 1] * weights[1]
    result = along_x[lower]
    result *= weights[2][:, np.newaxis]
    upper_part = along_x[upper]
    upper_part *= weights[3][:, np.newaxis]
    result += upper_part
    return result


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


def _index_range(axis: np.ndarray, low: float, high: float) -> tuple[float, float] | None:
    """The range of fractional indices (clamped to the end centres) of coordinates from
    `low` to `high` that fall within the outer edges of `axis`; None if none does."""
    ascending, index = axis, np.arange(axis.size, dtype=np.float64)
    if axis[-1] < axis[0]:
        ascending, index = axis[::-1], index[::-1]
    first_edge = ascending[0] - (ascending[1] - ascending[0]) / 2
    last_edge = ascending[-1] + (ascending[-1] - ascending[-2]) / 2
    if not (low <= last_edge and high >= first_edge):  # also when either is NaN
        return None
    ends = np.interp([low, high], ascending, index)
    return float(ends.min()), float(ends.max())


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
