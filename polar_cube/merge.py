"""Merge the per-dataset cubes into one cube: same grid or a clear refusal, one CF grid
mapping, lazy (dask) so it is written chunk by chunk."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np
import xarray as xr
from pyproj import CRS

from polar_cube.dataset import software_version
from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec
from polar_cube.stac import outline_lonlat
from polar_cube.upload import INPUTS_PREFIX
from polar_cube.zarr_store import FINGERPRINT_ATTR, GRID_MAPPING, add_grid_coords

LEFTOVERS = ("spatial_ref",)


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the input and what differs."""


def open_inputs(location: StoreLocation, spec: CubeSpec) -> dict[str, xr.Dataset]:
    """Open `<root>/inputs/<source id>.zarr` for every source of the spec, lazily."""
    inputs = {}
    for source in spec.sources:
        key = f"{INPUTS_PREFIX}/{source.id}.zarr"
        if not location.exists(key, ".zmetadata"):
            raise MergeError(
                f"{location.url(key)}: missing or incomplete; build and upload it first "
                "(`polar-cube build` without --only)"
            )
        inputs[key] = xr.open_zarr(location.mapper(key), consolidated=True, chunks={})
    return inputs


def check_same_grid(inputs: dict[str, xr.Dataset], grid: TargetGrid) -> None:
    """Refuse inputs whose coordinates, CRS or chunking differ from the cube's grid."""
    problems = []
    for name, dataset in inputs.items():
        for axis, expected in (("x", grid.x), ("y", grid.y)):
            actual = dataset[axis].values if axis in dataset.coords else None
            if actual is None or actual.shape != expected.shape:
                size = "none" if actual is None else actual.size
                problems.append(f"{name}: {axis} has {size} cells, the grid {expected.size}")
            elif not np.allclose(actual, expected, rtol=0, atol=1e-6 * grid.resolution):
                first = int(np.argmax(~np.isclose(actual, expected, rtol=0, atol=1e-3)))
                problems.append(
                    f"{name}: {axis} differs from the grid (index {first}: "
                    f"{actual[first]:g} vs {expected[first]:g})"
                )
        crs = _input_crs(dataset)
        if crs is None or not crs.equals(grid.pyproj_crs):
            problems.append(f"{name}: CRS {crs.name if crs else 'missing'} is not {grid.crs}")
        for var_name, variable in dataset.data_vars.items():
            if var_name in (GRID_MAPPING, *LEFTOVERS):
                continue
            expected_chunks = tuple(1 if d == "time" else grid.chunk_size for d in variable.dims)
            chunks = tuple(variable.encoding.get("chunks") or ())
            full = tuple(min(c, n) for c, n in zip(expected_chunks, variable.shape, strict=True))
            if chunks not in (expected_chunks, full):
                problems.append(f"{name}: {var_name} chunks {chunks} are not {expected_chunks}")
    if problems:
        raise MergeError("inputs do not share the cube's grid:\n  " + "\n  ".join(problems))


def _input_crs(dataset: xr.Dataset) -> CRS | None:
    for name in (GRID_MAPPING, *LEFTOVERS):
        if name in dataset.variables:
            attrs = dataset[name].attrs
            wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
            if wkt:
                return CRS.from_wkt(wkt)
    return None


def merge_inputs(inputs: dict[str, xr.Dataset], spec: CubeSpec, grid: TargetGrid) -> xr.Dataset:
    """One lazy dataset with the spec's variables, a single `crs`, and cube attributes."""
    check_same_grid(inputs, grid)
    parts = []
    for dataset in inputs.values():
        dataset = dataset.drop_vars([GRID_MAPPING, *LEFTOVERS], errors="ignore")
        for variable in dataset.data_vars.values():
            variable.attrs.pop("grid_mapping", None)
            variable.encoding = {}
        parts.append(dataset)
    merged = xr.merge(parts, join="exact", combine_attrs="override")
    missing = [v.name for v in spec.variables if v.name not in merged]
    if missing:
        raise MergeError(f"inputs lack spec variable(s): {', '.join(missing)}")
    merged = merged[[v.name for v in spec.variables]]
    merged = add_grid_coords(merged, grid)
    merged.attrs = cube_attributes(spec, grid, inputs)
    return merged


def cube_fingerprint(spec: CubeSpec, grid: TargetGrid, inputs: dict[str, xr.Dataset]) -> str:
    """Hash of the inputs' own fingerprints, the spec and the software."""
    recipe = {
        "inputs": {name: ds.attrs.get(FINGERPRINT_ATTR) for name, ds in sorted(inputs.items())},
        "spec": spec.model_dump(mode="json"),
        "grid": [grid.crs, list(grid.bbox), grid.resolution, grid.chunk_size],
        "software": software_version(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cube_attributes(
    spec: CubeSpec, grid: TargetGrid, inputs: dict[str, xr.Dataset]
) -> dict[str, object]:
    """Global attributes generated from the spec and the run (the patch adds the rest)."""
    lon, lat = _geographic_bounds(grid)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs: dict[str, object] = {
        **spec.metadata,
        "id": spec.data_id.removesuffix(".zarr"),
        "title": spec.title,
        "summary": spec.description,
        "product_version": spec.version,
        "license": spec.license,
        "spatial_ref": grid.crs,
        "spatial_res": grid.resolution,
        "geospatial_lon_min": lon[0],
        "geospatial_lon_max": lon[1],
        "geospatial_lat_min": lat[0],
        "geospatial_lat_max": lat[1],
        "date_created": now,
        "history": f"{now} merged from {len(inputs)} per-dataset cubes by {software_version()}",
        "sources": [
            f"{ds.attrs.get('source', name)} (sha256 {_source_checksum(ds)})"
            for name, ds in sorted(inputs.items())
        ],
        FINGERPRINT_ATTR: cube_fingerprint(spec, grid, inputs),
    }
    if spec.time_range:
        attrs["time_coverage_start"] = spec.time_range[0].isoformat()
        attrs["time_coverage_end"] = spec.time_range[1].isoformat()
    return {k: v for k, v in attrs.items() if v is not None}


def _source_checksum(dataset: xr.Dataset) -> str:
    for variable in dataset.data_vars.values():
        if "source_sha256" in variable.attrs:
            return variable.attrs["source_sha256"]
    return "unknown"


def _geographic_bounds(grid: TargetGrid) -> tuple[tuple[float, float], tuple[float, float]]:
    """Lon/lat extent of the grid's outline (the same outline the STAC item uses)."""
    lon, lat = np.array(outline_lonlat(grid)).T
    return (float(lon.min()), float(lon.max())), (float(lat.min()), float(lat.max()))
