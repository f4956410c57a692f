"""Statistics collected by the writing pass: each block, as it is written, also yields its
valid-cell count, min, max and sum; they are combined per variable and time step and stored
as the variable's `polar_cube_stats` attribute (JSON, no NaN), which the upload, the chunk-copy
merge and the publish carry along with its other attributes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from polar_cube.blank import constant_value

STATS_ATTR = "polar_cube_stats"
BLOCK_FIELDS = 4  # valid cells, min, max, sum


def block_stats(block: np.ndarray) -> np.ndarray:
    """[valid cells, min, max, sum] of one block, shaped (1, …, 1, 4) like the block's
    position in the block grid; min and max are NaN when no cell is valid."""
    value = constant_value(block)
    if value is not None:  # one value throughout: nothing to scan
        valid = 0 if np.isnan(value) else block.size
        row = [valid, value, value, value * valid] if valid else [0, np.nan, np.nan, 0.0]
        return np.array(row, dtype="float64").reshape((1,) * block.ndim + (BLOCK_FIELDS,))
    missing = np.isnan(block)
    valid = block.size - int(np.count_nonzero(missing))
    if valid:  # fmin/fmax skip NaN without copying the block
        if valid == block.size:
            total = np.sum(block, dtype="float64")
        else:
            total = np.sum(np.where(missing, 0, block), dtype="float64")
        row = [valid, np.fmin.reduce(block, axis=None), np.fmax.reduce(block, axis=None), total]
    else:
        row = [0, np.nan, np.nan, 0.0]
    return np.array(row, dtype="float64").reshape((1,) * block.ndim + (BLOCK_FIELDS,))


def combine_block_stats(
    per_block: np.ndarray, times: Sequence[str | None], cells: int
) -> list[dict]:
    """One record per time step from the per-block rows (time first, if any; last axis the
    fields): cells, valid cells, minimum, maximum (None without a valid cell) and sum."""
    records = []
    for time, rows in zip(times, per_block.reshape(len(times), -1, BLOCK_FIELDS), strict=True):
        with_values = rows[rows[:, 0] > 0]
        valid = int(with_values[:, 0].sum())
        records.append(
            {
                "time": time,
                "cells": int(cells),
                "valid_cells": valid,
                "minimum": float(with_values[:, 1].min()) if valid else None,
                "maximum": float(with_values[:, 2].max()) if valid else None,
                "sum": float(with_values[:, 3].sum()) if valid else 0.0,
            }
        )
    return records


def time_labels(data: xr.DataArray) -> list[str | None]:
    """`YYYY-MM-DD` per time step, or [None] for a static layer."""
    if "time" not in data.dims:
        return [None]
    return [pd.Timestamp(t).strftime("%Y-%m-%d") for t in data["time"].values]
