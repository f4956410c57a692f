"""Check a published cube (and its overview levels) against the spec, and summarise what is
in it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd
import xarray as xr
from pyproj import CRS
from pyproj.exceptions import CRSError

from polar_cube.errors import PolarCubeError
from polar_cube.grid import TargetGrid
from polar_cube.levels import (
    FINGERPRINT_KEY,
    LINK,
    ZLEVELS,
    level_chunk_size,
    level_count,
    level_name,
    level_shape,
    link_text,
    read_record,
)
from polar_cube.spec import CubeSpec, VariableSpec
from polar_cube.stats import STATS_ATTR, time_labels
from polar_cube.zarr3_shards import ZARR_JSON
from polar_cube.zarr_store import GRID_MAPPING

LEFTOVER_CRS_NAME = "spatial_ref"  # what rioxarray adds; the cube uses `crs` only


class CubeCheckError(PolarCubeError, ValueError):
    """A cube that does not match its spec; the message lists every problem, one per line."""


# --- checking ------------------------------------------------------------------------------


def find_problems(
    cube: xr.Dataset,
    spec: CubeSpec,
    grid: TargetGrid,
    *,
    variables: Sequence[str] | None = None,
) -> list[str]:
    """Every way `cube` differs from `spec` and `grid`, one line each naming the culprit.

    `variables` limits the check to some of the spec's variables (a per-dataset cube).
    """
    expected = _expected_variables(spec, variables)
    problems = _check_axes(cube, grid)
    problems += _check_crs(cube, grid)
    for name in sorted(set(cube.data_vars) - set(expected) - {GRID_MAPPING}):
        problems.append(f"{name}: unexpected data variable (not in the spec)")
    for variable in expected.values():
        if variable.name not in cube.data_vars:
            problems.append(f"{variable.name}: missing")
            continue
        problems += _check_variable(cube[variable.name], variable, grid)
        problems += _check_times(cube[variable.name], variable, spec)
    return problems


def verify_cube(
    cube: xr.Dataset,
    spec: CubeSpec,
    grid: TargetGrid,
    where: str,
    *,
    variables: Sequence[str] | None = None,
) -> None:
    """Raise CubeCheckError listing every problem of the cube at `where`, if there is any."""
    problems = find_problems(cube, spec, grid, variables=variables)
    if problems:
        raise CubeCheckError(_message(where, problems))


def check_store_layout(mapper: MutableMapping, where: str, zarr_format: int = 2) -> None:
    """Raise CubeCheckError unless the store is zarr format 2 with consolidated metadata
    (`zarr_format` 3: a zarr 3 group whose root `zarr.json` holds consolidated metadata)."""
    if zarr_format == 3:
        problems = _zarr3_layout_problems(mapper)
        if problems:
            raise CubeCheckError(_message(where, problems))
        return
    problems = []
    group = _read_json(mapper, ".zgroup")
    if group is None:
        hint = " (found zarr.json: zarr format 3)" if _has_key(mapper, "zarr.json") else ""
        problems.append(f".zgroup: missing, not a zarr format 2 group{hint}")
    elif group.get("zarr_format") != 2:
        problems.append(f".zgroup: zarr_format is {group.get('zarr_format')!r}, expected 2")
    consolidated = _read_json(mapper, ".zmetadata")
    if consolidated is None:
        problems.append(".zmetadata: missing, metadata not consolidated")
    elif consolidated.get("zarr_consolidated_format") != 1:
        found = consolidated.get("zarr_consolidated_format")
        problems.append(f".zmetadata: zarr_consolidated_format is {found!r}, expected 1")
    if problems:
        raise CubeCheckError(_message(where, problems))


def _zarr3_layout_problems(mapper: MutableMapping) -> list[str]:
    group = _read_json(mapper, ZARR_JSON)
    if group is None:
        hint = " (found .zgroup: zarr format 2)" if _has_key(mapper, ".zgroup") else ""
        return [f"{ZARR_JSON}: missing, not a zarr format 3 group{hint}"]
    problems = []
    if group.get("zarr_format") != 3 or group.get("node_type") != "group":
        problems.append(
            f"{ZARR_JSON}: zarr_format {group.get('zarr_format')!r}, node_type "
            f"{group.get('node_type')!r}, expected a zarr format 3 group"
        )
    if not (group.get("consolidated_metadata") or {}).get("metadata"):
        problems.append(f"{ZARR_JSON}: no consolidated metadata")
    return problems


def _level_arrays(mapper: MutableMapping, name: str, zarr_format: int) -> dict | None:
    """{variable: (shape, chunk shape)} of level `name` from its consolidated metadata."""
    if zarr_format == 3:
        group = _read_json(mapper, f"{name}/{ZARR_JSON}") or {}
        metadata = (group.get("consolidated_metadata") or {}).get("metadata")
        if not metadata:
            return None
        return {
            array: (meta.get("shape", []), _v3_chunks(meta))
            for array, meta in metadata.items()
            if meta.get("node_type") == "array"
        }
    consolidated = _read_json(mapper, f"{name}/.zmetadata")
    if not consolidated:
        return None
    return {
        key.removesuffix("/.zarray"): (zarray.get("shape", []), zarray.get("chunks", []))
        for key, zarray in consolidated.get("metadata", {}).items()
        if key.endswith("/.zarray")
    }


def _v3_chunks(meta: dict) -> list[int]:
    """The (inner) chunk shape of a zarr 3 array's metadata."""
    codecs = meta.get("codecs") or [{}]
    if codecs[0].get("name") == "sharding_indexed":
        return list(codecs[0]["configuration"]["chunk_shape"])
    return list(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", []))


def levels_problems(
    mapper: MutableMapping,
    spec: CubeSpec,
    grid: TargetGrid,
    *,
    fingerprint: str,
    cube_name: str,
    zarr_format: int = 2,
) -> list[str]:
    """Every way the overview levels in `mapper` differ from what the cube `cube_name` with
    inputs `fingerprint` on `grid` needs, one line each (metadata only, no chunk is read).
    `zarr_format` 3: zarr 3 levels, consolidated in each level's root `zarr.json`."""
    record = read_record(_read_bytes(mapper, ZLEVELS))
    if not record:
        return [f"{ZLEVELS}: missing, the overview levels are not complete"]
    problems = []
    if record.get(FINGERPRINT_KEY) != fingerprint:
        found = str(record.get(FINGERPRINT_KEY))[:16]
        problems.append(
            f"{ZLEVELS}: made from inputs {found}…, the cube from {str(fingerprint)[:16]}…"
        )
    count = level_count(grid.shape)
    if record.get("num_levels") != count:
        problems.append(f"{ZLEVELS}: num_levels is {record.get('num_levels')!r}, expected {count}")
    link = _read_bytes(mapper, LINK)
    if link is None or link.decode(errors="replace").strip() != link_text(cube_name):
        found = "missing" if link is None else repr(link.decode(errors="replace"))
        problems.append(f"{LINK}: {found}, expected {link_text(cube_name)!r}")
    chunk = [level_chunk_size(grid.chunk_size)] * 2
    for level in range(1, count):
        name = level_name(level)
        arrays = _level_arrays(mapper, name, zarr_format)
        if not arrays:
            problems.append(f"{name}: missing or without consolidated metadata")
            continue
        shape = list(level_shape(grid.shape, level))
        for variable in spec.variables:
            if variable.name not in arrays:
                problems.append(f"{name}: {variable.name} missing")
                continue
            found_shape, found_chunks = arrays[variable.name]
            if found_shape[-2:] != shape:
                problems.append(
                    f"{name}: {variable.name} y, x shape {found_shape}, expected {shape}"
                )
            if found_chunks[-2:] != chunk:
                problems.append(f"{name}: {variable.name} chunks {found_chunks}, expected {chunk}")
    return problems


def verify_levels(
    mapper: MutableMapping,
    spec: CubeSpec,
    grid: TargetGrid,
    where: str,
    *,
    fingerprint: str,
    cube_name: str,
    zarr_format: int = 2,
) -> None:
    """Raise CubeCheckError listing every problem of the levels at `where`, if there is any."""
    problems = levels_problems(
        mapper, spec, grid, fingerprint=fingerprint, cube_name=cube_name, zarr_format=zarr_format
    )
    if problems:
        raise CubeCheckError(_message(where, problems))


def _message(where: str, problems: list[str]) -> str:
    return "\n".join(f"{where}: {problem}" for problem in problems)


def _expected_variables(spec: CubeSpec, names: Sequence[str] | None) -> dict[str, VariableSpec]:
    known = {v.name: v for v in spec.variables}
    if names is None:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"not in the spec: {', '.join(unknown)}")
    return {n: known[n] for n in names}


def _check_axes(cube: xr.Dataset, grid: TargetGrid) -> list[str]:
    problems = []
    for axis, expected in (("x", grid.x), ("y", grid.y)):
        if axis not in cube.coords:
            problems.append(f"{axis}: coordinate missing")
            continue
        values = np.asarray(cube[axis].values, dtype="float64")
        if values.size != expected.size:
            problems.append(f"{axis}: {values.size} cells, the grid has {expected.size}")
        elif values.size > 1 and not (np.diff(values) > 0).all():
            problems.append(f"{axis}: coordinates are not ascending")
        elif not np.allclose(values, expected, rtol=0, atol=1e-6 * grid.resolution):
            problems.append(
                f"{axis}: coordinates are not the grid's cell centres "
                f"({values[0]:g} … {values[-1]:g}, expected {expected[0]:g} … {expected[-1]:g})"
            )
    if LEFTOVER_CRS_NAME in cube.variables:
        problems.append(f"{LEFTOVER_CRS_NAME}: leftover variable (the grid mapping is `crs`)")
    return problems


def _check_crs(cube: xr.Dataset, grid: TargetGrid) -> list[str]:
    if GRID_MAPPING not in cube.variables:
        return [f"{GRID_MAPPING}: grid-mapping variable missing"]
    attrs = cube[GRID_MAPPING].attrs
    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    if not wkt:
        return [f"{GRID_MAPPING}: no crs_wkt or spatial_ref attribute"]
    try:
        crs = CRS.from_wkt(wkt)
    except CRSError as error:
        return [f"{GRID_MAPPING}: crs_wkt is not a valid WKT CRS ({error})"]
    if not (crs.equals(grid.pyproj_crs) or crs.to_epsg() == grid.pyproj_crs.to_epsg()):
        return [f"{GRID_MAPPING}: crs_wkt describes {crs.name!r}, not {grid.crs}"]
    return []


def _check_variable(data: xr.DataArray, variable: VariableSpec, grid: TargetGrid) -> list[str]:
    name = variable.name
    problems = []
    if tuple(data.dims) != tuple(variable.dims):
        problems.append(f"{name}: dims {tuple(data.dims)}, expected {tuple(variable.dims)}")
    if data.dtype != np.dtype(variable.dtype):
        problems.append(f"{name}: dtype {data.dtype}, expected {variable.dtype}")
    for attr in ("units", "long_name"):
        found, wanted = data.attrs.get(attr), getattr(variable, attr)
        if found != wanted:
            problems.append(f"{name}: attribute {attr} is {found!r}, expected {wanted!r}")
    grid_mapping = data.attrs.get("grid_mapping", data.encoding.get("grid_mapping"))
    if grid_mapping != GRID_MAPPING:
        problems.append(f"{name}: grid_mapping is {grid_mapping!r}, expected {GRID_MAPPING!r}")
    if STATS_ATTR not in data.attrs:
        problems.append(f"{name}: no {STATS_ATTR} attribute (statistics of the writing pass)")
    elif _stats_records(data) is None:
        problems.append(f"{name}: {STATS_ATTR} does not hold one record per time step")
    return problems + _check_chunks(data, variable.name, grid)


def _check_chunks(data: xr.DataArray, name: str, grid: TargetGrid) -> list[str]:
    chunks = _stored_chunks(data)
    if chunks is None:
        return [f"{name}: chunking unknown (no encoding['chunks'] and not a dask array)"]
    problems = []
    for dim, size, chunk in zip(data.dims, data.shape, chunks, strict=False):
        allowed = {1} if dim == "time" else {grid.chunk_size, min(grid.chunk_size, size)}
        if chunk not in allowed:
            wanted = " or ".join(str(a) for a in sorted(allowed))
            problems.append(f"{name}: {dim} chunk is {chunk}, expected {wanted}")
    return problems


def _stored_chunks(data: xr.DataArray) -> tuple[int, ...] | None:
    """Chunk shape as stored (encoding, from open_zarr), else the dask chunks."""
    if "chunks" in data.encoding:
        return tuple(int(c) for c in data.encoding["chunks"])
    if data.chunks is not None:
        return tuple(int(c[0]) for c in data.chunks)
    return None


def _check_times(data: xr.DataArray, variable: VariableSpec, spec: CubeSpec) -> list[str]:
    if "time" not in variable.dims or "time" not in data.dims:
        return []
    if "time" not in data.coords:
        return [f"{variable.name}: time coordinate missing"]
    expected = _expected_dates(variable, spec)
    try:
        found = [d.isoformat() for d in pd.DatetimeIndex(data["time"].values).date]
    except (TypeError, ValueError):
        return [f"{variable.name}: time values are not dates ({data['time'].values!r})"]
    if found != expected:
        return [f"{variable.name}: time is {found}, expected {expected}"]
    return []


def _expected_dates(variable: VariableSpec, spec: CubeSpec) -> list[str]:
    """The dates a time-stepped variable is stacked on: its files' dates, else time_range."""
    if variable.source_files_by_time:
        return sorted(d.isoformat() for d in variable.source_files_by_time)
    return [d.isoformat() for d in spec.time_range or ()]


def _read_bytes(mapper: MutableMapping, key: str) -> bytes | None:
    try:
        return mapper[key]
    except (KeyError, FileNotFoundError):
        return None


def _read_json(mapper: MutableMapping, key: str) -> dict | None:
    raw = _read_bytes(mapper, key)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _has_key(mapper: MutableMapping, key: str) -> bool:
    try:
        return key in mapper
    except (OSError, ValueError):
        return False


# --- summarising ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VariableStats:
    """Summary of one variable (or one time step of it)."""

    name: str
    units: str
    time: str | None
    valid_fraction: float
    minimum: float | None
    maximum: float | None
    mean: float | None


def variable_stats(cube: xr.Dataset, spec: CubeSpec) -> list[VariableStats]:
    """Valid fraction, min, max, mean per spec variable in the cube, per time step if any,
    computed from the data (the pipeline stores them while writing: `stored_stats`).

    Reduced chunk by chunk with dask (one pass per variable), never loading a whole layer.
    """
    stats: list[VariableStats] = []
    for variable in spec.variables:
        if variable.name in cube.data_vars:
            stats += _stats_of(cube[variable.name], variable)
    return stats


def stored_stats(cube: xr.Dataset, spec: CubeSpec, where: str) -> list[VariableStats]:
    """The statistics the writing pass stored with each spec variable in the cube (its
    `polar_cube_stats` attribute): no chunk is read. CubeCheckError naming the variable if
    one lacks them."""
    stats: list[VariableStats] = []
    for variable in spec.variables:
        if variable.name not in cube.data_vars:
            continue
        data = cube[variable.name]
        records = _stats_records(data)
        if records is None:
            raise CubeCheckError(
                f"{where}: {variable.name}: no valid {STATS_ATTR} attribute (statistics of "
                "the writing pass); rebuild its per-dataset cube"
            )
        units = str(data.attrs.get("units", variable.units))
        stats += [_from_record(variable.name, units, record) for record in records]
    return stats


def _stats_records(data: xr.DataArray) -> list[dict] | None:
    """The variable's stored statistics records, one per time step; None if malformed."""
    records = data.attrs.get(STATS_ATTR)
    fields = {"time", "cells", "valid_cells", "minimum", "maximum", "sum"}
    if not isinstance(records, list) or len(records) != len(time_labels(data)):
        return None
    if not all(isinstance(r, dict) and fields <= r.keys() and r["cells"] for r in records):
        return None
    return records


def _from_record(name: str, units: str, record: dict) -> VariableStats:
    valid = record["valid_cells"]
    return VariableStats(
        name=name,
        units=units,
        time=record["time"],
        valid_fraction=valid / record["cells"],
        minimum=record["minimum"],
        maximum=record["maximum"],
        mean=record["sum"] / valid if valid else None,
    )


def _stats_of(data: xr.DataArray, variable: VariableSpec) -> list[VariableStats]:
    spatial = [d for d in data.dims if d != "time"]
    reductions = (
        data.notnull().mean(spatial),
        data.min(spatial, skipna=True),
        data.max(spatial, skipna=True),
        data.astype("float64").mean(spatial, skipna=True),
    )
    valid, low, high, mean = (np.atleast_1d(r.values) for r in dask.compute(*reductions))
    times = time_labels(data)
    units = str(data.attrs.get("units", variable.units))
    return [
        VariableStats(
            name=variable.name,
            units=units,
            time=time,
            valid_fraction=float(valid[i]),
            minimum=_finite_or_none(low[i]),
            maximum=_finite_or_none(high[i]),
            mean=_finite_or_none(mean[i]),
        )
        for i, time in enumerate(times)
    ]


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --- presenting ----------------------------------------------------------------------------

COLUMNS = ("variable", "time", "units", "valid %", "min", "max", "mean")


def stats_table_rows(stats: Iterable[VariableStats]) -> list[dict]:
    """Rows for a table artifact: valid % to 2 decimals, values to 4 significant digits."""
    return [
        {
            "variable": s.name,
            "time": s.time or "",
            "units": s.units,
            "valid %": round(100 * s.valid_fraction, 2),
            "min": _significant(s.minimum),
            "max": _significant(s.maximum),
            "mean": _significant(s.mean),
        }
        for s in stats
    ]


def stats_markdown(
    stats: Iterable[VariableStats],
    *,
    title: str,
    cube_url: str,
    extra_lines: Iterable[str] = (),
) -> str:
    """A markdown summary: heading, where the cube is, extra lines, one table row per stat."""
    lines = [f"# {title}", "", f"Cube: `{cube_url}`", ""]
    extra = list(extra_lines)
    if extra:
        lines += [*extra, ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|")
    for row in stats_table_rows(stats):
        cells = [_cell(row[column]) for column in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _significant(value: float | None, digits: int = 4) -> float | None:
    if value is None or value == 0:
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _cell(value: object) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")
