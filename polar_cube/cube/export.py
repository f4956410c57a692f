"""A cube (or a subset: variables, a bbox) as a CF netCDF-4 file, with every attribute.

netCDF holds strings and numbers (and arrays of numbers) as attributes; a zarr's JSON holds
more. Attributes netCDF cannot hold as they are (dicts such as GDAL's `_CRS` and
`polar_cube_stats`, lists of strings such as `references`, `sources` or `processing_steps`,
booleans, empty or one-element lists, null) are written as JSON text, and the attribute
`polar_cube_json_attrs` of the same variable (or of the file, for global attributes) lists
them, space-separated: `name` for one kept under its name, `stored:original` for one
renamed (`_CRS` is stored as `zarr_CRS`: CF wants names that begin with a letter). Decoding
(`decode_attrs`) parses them, renames them back and drops the marker, so the attributes
equal those xarray reads from the zarr. The value-typed attributes (`flag_values`, ...) are
written in their variable's type, as CF requires; the NCZarr hints saying so in the zarr
(`_nczarr_attr`, which xarray hides) are then the netCDF types themselves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from polar_cube.errors import PolarCubeError
from polar_cube.grid import TargetGrid
from polar_cube.zarr_store import GRID_MAPPING, NCZARR_ATTR, VALUE_TYPED_ATTRS

JSON_ATTRS = "polar_cube_json_attrs"
# zarr attribute names netCDF-CF readers object to, and the names they are stored under
RENAMED = {"_CRS": "zarr_CRS"}
FORMATS = ("netcdf",)


class ExportError(PolarCubeError, ValueError):
    """An export asked for what the cube does not have (a variable, a bbox outside it)."""


def encode_attrs(attrs: dict, dtype: np.dtype | None = None) -> dict:
    """`attrs` as netCDF can hold them: see the module's doc. `dtype`: the variable's, for
    its value-typed attributes."""
    encoded: dict = {}
    marked: list[str] = []
    for name, value in attrs.items():
        if name == JSON_ATTRS:
            raise ExportError(f"the attribute {JSON_ATTRS} is the export's own")
        if name in VALUE_TYPED_ATTRS and dtype is not None and _numbers(value):
            encoded[name] = np.asarray(value, dtype=dtype)
        elif _native(value):
            encoded[name] = value
        else:
            stored = RENAMED.get(name, name)
            encoded[stored] = json.dumps(value, ensure_ascii=False, sort_keys=False)
            marked.append(stored if stored == name else f"{stored}:{name}")
    if marked:
        encoded[JSON_ATTRS] = " ".join(marked)
    return encoded


def decode_attrs(attrs: dict) -> dict:
    """The attributes `encode_attrs` was given, from what a netCDF reader gives back:
    JSON-encoded ones parsed and renamed back, arrays as lists, numpy numbers as Python's."""
    marked = dict(
        entry.split(":", 1) if ":" in entry else (entry, entry)
        for entry in str(attrs.get(JSON_ATTRS, "")).split()
    )
    decoded: dict = {}
    for name, value in attrs.items():
        if name == JSON_ATTRS:
            continue
        if name in marked:
            decoded[marked[name]] = json.loads(value)
        elif isinstance(value, np.ndarray) or name in VALUE_TYPED_ATTRS:
            decoded[name] = np.atleast_1d(value).tolist()
        elif isinstance(value, np.generic):
            decoded[name] = value.item()
        else:
            decoded[name] = value
    return decoded


def decode_dataset(dataset: xr.Dataset) -> xr.Dataset:
    """`dataset` (an exported netCDF, opened by xarray) with every attribute decoded."""
    dataset = dataset.copy()
    dataset.attrs = decode_attrs(dataset.attrs)
    for variable in dataset.variables.values():
        variable.attrs = decode_attrs(variable.attrs)
    return dataset


def _numbers(value) -> bool:
    values = value if isinstance(value, list | tuple) else [value]
    return bool(values) and all(_number(v) for v in values)


def _number(value) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _native(value) -> bool:
    """True if a netCDF attribute holds `value` and gives it back as it is (up to the
    array-to-list of `decode_attrs`): a string, a number, or two or more numbers of one kind."""
    if isinstance(value, str) or _number(value):
        return True
    if isinstance(value, list | tuple) and len(value) >= 2 and _numbers(value):
        return len({isinstance(v, float | np.floating) for v in value}) == 1
    return False


def select(
    cube: xr.Dataset,
    variables: Sequence[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
) -> xr.Dataset:
    """`variables` (default: all) of `cube`, within `bbox` (xmin, ymin, xmax, ymax in the
    cube's CRS: the cells whose centres fall in it). A bbox updates the extent attributes
    (`geospatial_*`, the grid mapping's `GeoTransform`) and says so in `history`."""
    if variables:
        unknown = sorted(set(variables) - set(cube.data_vars))
        if unknown:
            raise ExportError(f"no variable {', '.join(unknown)} in the cube")
        keep = [*variables, *([GRID_MAPPING] if GRID_MAPPING in cube.variables else [])]
        cube = cube[list(dict.fromkeys(keep))]
    if bbox is None:
        return cube
    xmin, ymin, xmax, ymax = bbox
    subset = cube.sel(x=slice(xmin, xmax), y=_y_slice(cube, ymin, ymax))
    if subset.sizes["x"] < 2 or subset.sizes["y"] < 2:
        raise ExportError(f"bbox {list(bbox)} holds fewer than 2 × 2 cells of the cube")
    return _with_extent(subset, cube, bbox)


def _y_slice(cube: xr.Dataset, ymin: float, ymax: float) -> slice:
    ascending = cube.y.size < 2 or float(cube.y[1]) > float(cube.y[0])
    return slice(ymin, ymax) if ascending else slice(ymax, ymin)


def _with_extent(subset: xr.Dataset, cube: xr.Dataset, bbox) -> xr.Dataset:
    from polar_cube.cube.merge import geospatial_attrs

    x, y = subset.x.values, subset.y.values
    dx, dy = float(x[1] - x[0]), float(y[1] - y[0])
    edges = (
        float(min(x[0], x[-1])) - abs(dx) / 2,
        float(min(y[0], y[-1])) - abs(dy) / 2,
        float(max(x[0], x[-1])) + abs(dx) / 2,
        float(max(y[0], y[-1])) + abs(dy) / 2,
    )
    crs = cube.attrs.get("geospatial_bounds_crs") or cube.attrs.get("spatial_ref")
    subset = subset.copy()
    if crs:
        grid = TargetGrid(crs, edges, abs(dx), max(subset.sizes["x"], subset.sizes["y"]))
        subset.attrs.update(geospatial_attrs(grid))
    subset.attrs["history"] = (
        f"{cube.attrs.get('history', '')}\nsubset to bbox {list(bbox)} by polar-cube export"
    ).strip()
    if GRID_MAPPING in subset.variables and "GeoTransform" in subset[GRID_MAPPING].attrs:
        origin_x, origin_y = float(x[0]) - dx / 2, float(y[0]) - dy / 2
        subset[GRID_MAPPING].attrs["GeoTransform"] = f"{origin_x} {dx} 0 {origin_y} 0 {dy}"
    return subset


def netcdf_dataset(cube: xr.Dataset) -> tuple[xr.Dataset, dict[str, dict]]:
    """`cube` with netCDF-safe attributes, and the encoding to write it with: data as
    float32 with NaN fill, zlib-compressed in chunks of at most 512 × 512; no fill value on
    the coordinates; time as int32 days (CF 1.10 readers without int64 support)."""
    out = cube.copy()
    out.attrs = encode_attrs(cube.attrs)
    encoding: dict[str, dict] = {}
    for name, variable in cube.variables.items():
        # zarr 3 cubes show NCZarr's hints, which xarray hides in zarr 2: not for netCDF
        variable = variable.copy(deep=False)
        variable.attrs = {k: v for k, v in variable.attrs.items() if k != NCZARR_ATTR}
        dtype = np.dtype("float32") if name in cube.data_vars else variable.dtype
        if name != GRID_MAPPING and name in cube.data_vars:
            out[name].attrs = encode_attrs(variable.attrs, dtype)
            chunks = tuple(1 if d == "time" else min(512, cube.sizes[d]) for d in variable.dims)
            encoding[name] = {
                "dtype": "float32",
                "_FillValue": np.float32(np.nan),
                "zlib": True,
                "complevel": 4,
                "shuffle": True,
                "chunksizes": chunks,
            }
        else:
            out[name].attrs = encode_attrs(variable.attrs)
            encoding[name] = {"_FillValue": None}
    if "time" in cube.variables:
        encoding["time"] |= {
            "units": cube.time.encoding.get("units", "days since 1970-01-01"),
            "calendar": cube.time.encoding.get("calendar", "proleptic_gregorian"),
            "dtype": "int32",
        }
    return out, encoding


def export_netcdf(
    cube: xr.Dataset,
    target: str | Path,
    variables: Sequence[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
) -> Path:
    """Write `cube` (or its `variables` within `bbox`, see `select`) to the netCDF-4 file
    `target` (written beside it, then renamed into place). Returns its path."""
    target = Path(target)
    dataset, encoding = netcdf_dataset(select(cube, variables, bbox))
    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        dataset.to_netcdf(partial, format="NETCDF4", engine="netcdf4", encoding=encoding)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
