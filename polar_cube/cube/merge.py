"""Merge the per-dataset cubes of a version into one cube: same grid and chunk encoding or a
clear refusal, one CF grid mapping.

Every source's build wrote its chunk objects straight into the version's cube and levels
(`keys.VersionKeys`), under the keys the merged cube reads them from, and its metadata into
`<stem>.inputs/<id>.zarr`. Merging therefore moves no chunk: it checks the inputs' metadata
(grid, chunks, dtype, fill value, codec, time axis) and writes the merged cube's metadata
(coordinates, each variable's `.zarray`/`.zattrs`, the group's attributes) next to the
chunks, level by level. `merge_inputs` describes the merged cube as a lazy dataset (what the
cube must equal, value for value).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import xarray as xr
import zarr
from pyproj import CRS
from zarr.core.buffer import default_buffer_prototype

from polar_cube.errors import PolarCubeError
from polar_cube.grid import TargetGrid, outline_lonlat
from polar_cube.keys import VersionKeys
from polar_cube.levels import (
    FINGERPRINT_KEY,
    LINK,
    ZLEVELS,
    agg_method,
    encode_record,
    level_chunk_size,
    level_coords,
    level_count,
    level_name,
    level_shape,
    levels_record,
    link_text,
    read_record,
)
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec, zarr_layout
from polar_cube.version import software_version
from polar_cube.zarr3_shards import _BLOSC, ZARR_JSON, array_metadata
from polar_cube.zarr_store import _COMPRESSOR as CUBE_COMPRESSOR
from polar_cube.zarr_store import (
    CF_CONVENTIONS,
    FINGERPRINT_ATTR,
    GRID_MAPPING,
    NCZARR_ATTR,
    add_grid_coords,
    encoding_for,
    typed_attrs,
    zarr3_consolidation,
)

LEFTOVERS = ("spatial_ref",)
# What the merge itself adds to the inputs' metadata; part of the merged cube's fingerprint,
# so that a published cube with other attributes is republished.
MERGED_LAYOUT = (
    "CF-1.10 (typed flag_values and NCZarr hints, x/y/time axis, int32 time); "
    "ACDD-1.3 (geospatial_bounds, time_coverage_duration and _resolution)"
)


class MergeError(PolarCubeError, ValueError):
    """Inputs that cannot be merged; the message names the input and what differs."""


def source_zarr_key(keys: VersionKeys, source_id: str, level: int = 0) -> str:
    """A source's metadata in the version (level 0) or that of its overview level `level`."""
    if level == 0:
        return keys.input_key(source_id)
    return f"{keys.input_levels_key(source_id)}/{level_name(level)}"


def open_inputs(
    location: StoreLocation, spec: CubeSpec, keys: VersionKeys
) -> dict[str, xr.Dataset]:
    """Open every source's metadata in the version `keys` (`<stem>.inputs/<id>.zarr`),
    lazily, after checking that its complete overview levels from the same build are next
    to it. Only metadata and coordinates are read: the chunks are in the version's cube."""
    inputs = {}
    for source in spec.sources:
        key = keys.input_key(source.id)
        if not is_complete(location, key):
            raise MergeError(
                f"{location.url(key)}: missing or incomplete; build it first "
                "(`polar-cube build` without --only)"
            )
        inputs[key] = xr.open_zarr(location.mapper(key), consolidated=True, chunks={})
        fingerprint = inputs[key].attrs.get(FINGERPRINT_ATTR)
        levels_key = keys.input_levels_key(source.id)
        if (
            fingerprint is None
            or read_levels_record(location, levels_key).get(FINGERPRINT_KEY) != fingerprint
        ):
            raise MergeError(
                f"{location.url(levels_key)}: overview levels missing, incomplete or not "
                f"from the build of {location.url(key)}; build it again "
                "(`polar-cube build` without --only)"
            )
    return inputs


def is_complete(location: StoreLocation, key: str) -> bool:
    """The zarr at `key` has consolidated metadata: `.zmetadata` (zarr 2), or in a zarr 3
    series (`spec.zarr_layout`) a root `zarr.json` holding it."""
    if zarr_layout(key)[0] == 2:
        return location.exists(key, ".zmetadata")
    path = location.path(key, ZARR_JSON)
    if not location.fs.exists(path):
        return False
    return bool(json.loads(location.fs.cat_file(path)).get("consolidated_metadata"))


def consolidate(location: StoreLocation, key: str) -> None:
    """Consolidate the metadata of the zarr at `key` in its format (`spec.zarr_layout`)."""
    with zarr3_consolidation():  # zarr 3: "consolidated metadata is not in the spec"
        zarr.consolidate_metadata(location.mapper(key), zarr_format=zarr_layout(key)[0])


def input_fingerprints(inputs: dict[str, xr.Dataset]) -> dict[str, str | None]:
    """{source id: fingerprint of its per-dataset cube}."""
    return {
        ds.attrs.get("polar_cube_source_id", name): ds.attrs.get(FINGERPRINT_ATTR)
        for name, ds in inputs.items()
    }


def read_levels_record(location: StoreLocation, levels_key: str) -> dict:
    """The `.zlevels` record of the levels folder at `levels_key` ({} if there is none)."""
    path = location.path(levels_key, ZLEVELS)
    return read_record(location.fs.cat_file(path) if location.fs.exists(path) else None)


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
    """One lazy dataset with the spec's variables, a single `crs`, and cube attributes: the
    cube `copy_merged_cube` writes, described by decoding (for checks, not for writing)."""
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
    for variable in merged.data_vars.values():  # as xarray reads the cube: it hides `_nc*`
        variable.attrs.pop(NCZARR_ATTR, None)
    merged.attrs = cube_attributes(spec, grid, inputs)
    return merged


@dataclass(frozen=True)
class StoredVariable:
    """A spec variable as its input stores it, with the metadata the merged cube gives it."""

    input_key: str
    name: str
    zarray: dict
    zattrs: dict

    @property
    def dims(self) -> list[str]:
        if "_ARRAY_DIMENSIONS" not in self.zattrs and "dimension_names" in self.zarray:
            return list(self.zarray["dimension_names"])  # zarr 3
        return self.zattrs["_ARRAY_DIMENSIONS"]


def write_merged_cube(
    location: StoreLocation,
    keys: VersionKeys,
    inputs: dict[str, xr.Dataset],
    spec: CubeSpec,
    grid: TargetGrid,
) -> None:
    """Write the merged cube's metadata at `keys.cube`, next to the chunks the sources'
    builds wrote there: coordinates and `crs`, each variable's metadata, the group's
    attributes. It is left unconsolidated and without the fingerprint attribute: whoever
    calls this marks it complete afterwards (`target.mark_complete`)."""
    check_same_grid(inputs, grid)
    objects = _metadata_objects(location, keys.cube, keys, inputs, spec, grid, level=0)
    attrs = cube_attributes(spec, grid, inputs)
    del attrs[FINGERPRINT_ATTR]  # the completion marker comes last
    _put_objects(location, keys.cube, objects)
    _put_objects(location, keys.cube, _group_attrs_object(keys.cube, attrs))  # then these


def _group_attrs_object(key: str, attrs: dict) -> dict[str, bytes]:
    """The group's attributes: `.zattrs`, or a zarr 3 series' root `zarr.json` (without
    consolidated metadata: consolidating marks it complete)."""
    if zarr_layout(key)[0] == 2:
        return {".zattrs": _json(attrs)}
    return {ZARR_JSON: _json({"zarr_format": 3, "node_type": "group", "attributes": attrs})}


def _put_objects(location: StoreLocation, key: str, objects: dict[str, bytes]) -> None:
    """Store the group's `objects` (by key within it) at `key`, all at once."""
    location.fs.pipe({location.path(key, name): data for name, data in objects.items()})


def _consolidated(objects: dict[str, bytes], zarr_format: int) -> dict[str, bytes]:
    """`objects` (a whole group's metadata) with their consolidated metadata added, made in
    memory: nothing is read back from the store."""
    prototype = default_buffer_prototype()
    store = {name: prototype.buffer.from_bytes(data) for name, data in objects.items()}
    with zarr3_consolidation():  # zarr 3: "consolidated metadata is not in the spec"
        zarr.consolidate_metadata(zarr.storage.MemoryStore(store), zarr_format=zarr_format)
    return {name: buffer.to_bytes() for name, buffer in store.items()}


def write_merged_levels(
    location: StoreLocation,
    keys: VersionKeys,
    inputs: dict[str, xr.Dataset],
    spec: CubeSpec,
    grid: TargetGrid,
    fingerprint: str,
) -> None:
    """Write the merged overview levels' metadata at `keys.levels`, next to their chunks.

    Each level is written, consolidated (in memory), in turn, then `0.link` (to the cube),
    and last `.zlevels` with `fingerprint`: it marks the levels complete.
    """
    check_same_grid(inputs, grid)
    count, methods = level_count(grid.shape), {}
    for level in range(1, count):
        target = f"{keys.levels}/{level_name(level)}"
        objects = _metadata_objects(location, target, keys, inputs, spec, grid, level)
        objects |= _group_attrs_object(target, cube_attributes(spec, grid, inputs))
        _put_objects(location, target, _consolidated(objects, zarr_layout(target)[0]))
    for variable in spec.variables:
        methods[variable.name] = agg_method(variable.attrs)
    location.fs.pipe_file(location.path(keys.levels, LINK), link_text(keys.cube).encode())
    record = levels_record(count, methods, fingerprint)
    location.fs.pipe_file(location.path(keys.levels, ZLEVELS), encode_record(record))


def _metadata_objects(
    location: StoreLocation,
    key: str,
    keys: VersionKeys,
    inputs: dict[str, xr.Dataset],
    spec: CubeSpec,
    grid: TargetGrid,
    level: int,
) -> dict[str, bytes]:
    """Coordinates and `crs`, and each variable's metadata of the merged `level` at `key`,
    rendered (by key within the group); arrays an earlier merge of this (unpublished)
    version left there that this one does not write are removed first (a variable since
    dropped from the spec: consolidating the cube would list it again)."""
    variables = stored_variables(location, keys, inputs, spec, grid, level)
    timed = any(v.dims[0] == "time" for v in variables)
    merged = {v.name for v in variables} | {"x", "y", GRID_MAPPING} | ({"time"} if timed else set())
    _remove_other_arrays(location, key, merged)
    objects = _coordinate_objects(inputs, variables, grid, level, zarr_layout(key)[0])
    if zarr_layout(key)[0] == 3:
        return objects | {
            f"{v.name}/{ZARR_JSON}": _json({**v.zarray, "attributes": v.zattrs}) for v in variables
        }
    return objects | {
        f"{variable.name}/{name}": _json(metadata)
        for variable in variables
        for name, metadata in ((".zarray", variable.zarray), (".zattrs", variable.zattrs))
    }


def _remove_other_arrays(location: StoreLocation, key: str, keep: set[str]) -> None:
    """Remove the arrays (metadata and chunks) at `key` not named in `keep`."""
    location.fs.invalidate_cache()  # s3fs caches listings; the builds wrote since
    if not location.exists(key):
        return
    for entry in location.fs.ls(location.path(key), detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and name not in keep:
            location.fs.rm(entry["name"], recursive=True)


def stored_variables(
    location: StoreLocation,
    keys: VersionKeys,
    inputs: dict[str, xr.Dataset],
    spec: CubeSpec,
    grid: TargetGrid,
    level: int = 0,
) -> list[StoredVariable]:
    """Every spec variable as stored in its source's input (or its overview `level`).
    MergeError unless each is there, stored with the cube's chunks, dtype, fill value and
    codec (and, for a level, its shape), on the same time axis."""
    wanted = {source_zarr_key(keys, v.source, level) for v in spec.variables}
    metadata = {key: _consolidated_metadata(location, key) for key in sorted(wanted)}
    gdal_crs = {"wkt": grid.pyproj_crs.to_wkt()}
    variables, missing, problems = [], [], []
    zarr_format, shards = zarr_layout(keys.cube)
    for variable in spec.variables:
        key = source_zarr_key(keys, variable.source, level)
        where = f"{key}: {variable.name}"
        if zarr_format == 3:
            array = metadata[key].get(f"{variable.name}/{ZARR_JSON}")
            if array is None:
                missing.append(f"{variable.name} (in {key})")
                continue
            zarray = {k: v for k, v in array.items() if k != "attributes"}
            zattrs = dict(array.get("attributes", {}))
            dims = zarray.get("dimension_names")
            problems += _encoding_problems_v3(where, zarray, dims, grid, level, shards)
        else:
            zarray = metadata[key].get(f"{variable.name}/.zarray")
            if zarray is None:
                missing.append(f"{variable.name} (in {key})")
                continue
            zattrs = dict(metadata[key].get(f"{variable.name}/.zattrs", {}))
            dims = zattrs.get("_ARRAY_DIMENSIONS")
            problems += _encoding_problems(where, zarray, dims, grid, level)
        # typed again here: inputs written before CF-1.8 (kept by `--only`) carry int flags
        zattrs = typed_attrs({**zattrs, "grid_mapping": GRID_MAPPING, "_CRS": gdal_crs})
        variables.append(StoredVariable(key, variable.name, zarray, zattrs))
    if missing:
        raise MergeError(f"inputs lack spec variable(s): {', '.join(missing)}")
    problems += _time_axis_problems(inputs)
    if problems:
        raise MergeError("inputs cannot be merged chunk for chunk:\n  " + "\n  ".join(problems))
    return variables


def _consolidated_metadata(location: StoreLocation, key: str) -> dict:
    """The consolidated metadata of the zarr at `key` ({} if it has none); of a zarr 3 one
    as {"<array>/zarr.json": its metadata}."""
    if zarr_layout(key)[0] == 3:
        path = location.path(key, ZARR_JSON)
        if not location.fs.exists(path):
            return {}
        consolidated = json.loads(location.fs.cat_file(path)).get("consolidated_metadata") or {}
        return {
            f"{name}/{ZARR_JSON}": meta
            for name, meta in consolidated.get("metadata", {}).items()
            if meta.get("node_type") == "array"
        }
    path = location.path(key, ".zmetadata")
    if not location.fs.exists(path):
        return {}
    return json.loads(location.fs.cat_file(path))["metadata"]


def _encoding_problems(
    where: str, zarray: dict, dims: list[str] | None, grid: TargetGrid, level: int = 0
) -> list[str]:
    """How an input array's stored encoding differs from the cube's (each chunk is copied
    as it is, so they must be the same); for an overview level also its y, x shape."""
    if not dims:
        return [f"{where}: no _ARRAY_DIMENSIONS attribute (not written by xarray)"]
    chunk = grid.chunk_size if level == 0 else level_chunk_size(grid.chunk_size)
    expected = {
        "zarr_format": 2,
        "chunks": [1 if dim == "time" else chunk for dim in dims],
        "dtype": "<f4",
        "fill_value": "NaN",
        "compressor": CUBE_COMPRESSOR.get_config(),
        "filters": None,
        "order": "C",
        "dimension_separator": ".",
    }
    problems = []
    if level:
        found, wanted = zarray.get("shape", [])[-2:], list(level_shape(grid.shape, level))
        if found != wanted:
            problems.append(f"{where}: y, x shape {found}, level {level} of the grid is {wanted}")
    for field, wanted in expected.items():
        found = zarray.get(field, "." if field == "dimension_separator" else None)
        if found != wanted:
            problems.append(
                f"{where}: {field} {_describe(field, found)}, "
                f"the cube's is {_describe(field, wanted)}"
            )
    return problems


# what `_encoding_problems_v3` compares (the shape and dimension names apart)
_V3_FIELDS = ("zarr_format", "node_type", "data_type", "fill_value", "chunk_grid", "codecs")


def _encoding_problems_v3(
    where: str,
    zarray: dict,
    dims: list[str] | None,
    grid: TargetGrid,
    level: int,
    shards: int | None,
) -> list[str]:
    """`_encoding_problems` for a zarr 3 series: its arrays' stored metadata must be what
    the writer makes (`zarr_store.encoding_for_v3`): the cube's in shards of `shards` ×
    `shards` chunks (`zarr3_shards.array_metadata`), its levels' unsharded tiles."""
    if not dims:
        return [f"{where}: no dimension_names (not written by xarray)"]
    shape = tuple(zarray.get("shape", ()))
    if len(shape) != len(dims):
        return [f"{where}: shape {list(shape)} does not match its dimensions {dims}"]
    expected = _expected_v3(shape, tuple(dims), grid.chunk_size, level, shards)
    problems = []
    if level:
        found, wanted = list(shape[-2:]), list(level_shape(grid.shape, level))
        if found != wanted:
            problems.append(f"{where}: y, x shape {found}, level {level} of the grid is {wanted}")
    if zarray.get("chunk_key_encoding", {}).get("name", "default") != "default":
        problems.append(f"{where}: chunk_key_encoding {json.dumps(zarray['chunk_key_encoding'])}")
    for field in _V3_FIELDS:
        found, wanted = zarray.get(field), expected.get(field)
        if json.dumps(found, sort_keys=True) != json.dumps(wanted, sort_keys=True):
            problems.append(
                f"{where}: {field} {json.dumps(found)}, the cube's is {json.dumps(wanted)}"
            )
    return problems


@cache
def _expected_v3(
    shape: tuple[int, ...], dims: tuple[str, ...], chunk_size: int, level: int, shards: int | None
) -> dict:
    if not level:
        return array_metadata(shape, chunk_size, shards or 1, dims, {})
    tile = level_chunk_size(chunk_size)
    store: dict = {}
    zarr.create_array(
        store=zarr.storage.MemoryStore(store),
        shape=shape,
        dtype="float32",
        chunks=tuple(1 if dim == "time" else tile for dim in dims),
        compressors=zarr.codecs.BloscCodec(**_BLOSC),
        fill_value=math.nan,
        dimension_names=dims,
        zarr_format=3,
    )
    return json.loads(store[ZARR_JSON].to_bytes())


def _describe(field: str, value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        options = ", ".join(f"{k}={v}" for k, v in value.items() if k != "id")
        return f"{value.get('id')}({options})"
    if field == "dtype" and isinstance(value, str):
        try:
            return f"{value} ({np.dtype(value).name})"
        except TypeError:
            return value
    return value if isinstance(value, str) else json.dumps(value)


def _time_axis_problems(inputs: dict[str, xr.Dataset]) -> list[str]:
    axes = {name: ds["time"].values for name, ds in inputs.items() if "time" in ds.coords}
    if len(axes) < 2:
        return []
    (first, reference), *others = axes.items()
    return [
        f"{name}: time axis {_describe_times(values)} differs from {first}'s "
        f"{_describe_times(reference)}"
        for name, values in others
        if not np.array_equal(values, reference)
    ]


def _describe_times(values: np.ndarray) -> str:
    if np.issubdtype(values.dtype, np.datetime64):
        values = np.datetime_as_string(values, unit="D")
    shown = [str(v) for v in values]
    if len(shown) > 4:
        shown = [*shown[:2], "…", shown[-1]]
    return f"({len(values)} step{'' if len(values) == 1 else 's'}: {', '.join(shown)})"


def _coordinate_objects(
    inputs: dict[str, xr.Dataset],
    variables: list[StoredVariable],
    grid: TargetGrid,
    level: int,
    zarr_format: int,
) -> dict[str, bytes]:
    """x and y (the grid's, at `level`), time (the inputs'), and the `crs` variable, as the
    zarr objects that hold them (`render_zarr`)."""
    coords = {}
    timed = [v.name for v in variables if v.dims[0] == "time"]
    if timed:
        with_time = next(ds for ds in inputs.values() if "time" in ds.coords)
        time = with_time["time"].variable.copy()  # the same in every input (checked)
        time.encoding = {}
        coords["time"] = time
    dataset = add_grid_coords(xr.Dataset(coords=coords), grid)
    if level:
        on_level = level_coords(dataset["x"], dataset["y"], dataset[GRID_MAPPING], level)
        dataset = on_level.assign_coords({name: dataset[name] for name in coords})
    return render_zarr(dataset, encoding_for(dataset, grid.chunk_size), zarr_format)


def render_zarr(dataset: xr.Dataset, encoding: dict, zarr_format: int = 2) -> dict[str, bytes]:
    """`dataset` (small: coordinates) as the zarr objects that hold it, by key, made in
    memory: stored next to the chunks the builds wrote (xarray's `mode="w"` on the store
    would delete them)."""
    rendered: dict = {}
    dataset.to_zarr(
        zarr.storage.MemoryStore(rendered),
        mode="w",
        zarr_format=zarr_format,
        consolidated=False,
        encoding=encoding,
        write_empty_chunks=False,
    )
    return {name: buffer.to_bytes() for name, buffer in rendered.items()}


def _json(value: object) -> bytes:
    return json.dumps(value, indent=4, sort_keys=True).encode()


def cube_fingerprint(spec: CubeSpec, grid: TargetGrid, inputs: dict[str, str | None]) -> str:
    """Hash of the inputs' own fingerprints ({source id: fingerprint}), the spec (but not
    the version it is published as), the software and what the merge adds
    (`MERGED_LAYOUT`)."""
    recipe = {
        "inputs": dict(sorted(inputs.items())),
        "series": spec.series,
        "spec": spec.model_dump(mode="json", exclude={"data_id", "version"}),
        "grid": [grid.crs, list(grid.bbox), grid.resolution, grid.chunk_size],
        "software": software_version(),
        "layout": MERGED_LAYOUT,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cube_attributes(
    spec: CubeSpec, grid: TargetGrid, inputs: dict[str, xr.Dataset]
) -> dict[str, object]:
    """Global attributes generated from the spec and the run (the patch adds the rest)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs: dict[str, object] = {
        "Conventions": CF_CONVENTIONS,  # unless the spec's metadata names more
        **spec.metadata,
        "id": spec.data_id.removesuffix(".zarr"),
        "title": spec.title,
        "summary": spec.description,
        "product_version": spec.version,
        "license": spec.license,
        "spatial_ref": grid.crs,
        "spatial_res": grid.resolution,
        **geospatial_attrs(grid),
        "date_created": now,
        "date_modified": now,
        "date_metadata_modified": now,
        "history": f"{now} merged from {len(inputs)} per-dataset cubes by {software_version()}",
        "sources": [
            f"{ds.attrs.get('source', name)} (sha256 {_source_checksum(ds)})"
            for name, ds in sorted(inputs.items())
        ],
        "references": _references(spec),
        FINGERPRINT_ATTR: cube_fingerprint(spec, grid, input_fingerprints(inputs)),
    }
    if spec.time_range:
        start, end = spec.time_range
        attrs["time_coverage_start"] = start.isoformat()
        attrs["time_coverage_end"] = end.isoformat()
        attrs["time_coverage_duration"] = _iso_days(end - start)
        resolution = time_resolution(spec)
        if resolution:
            attrs["time_coverage_resolution"] = resolution
    return {k: v for k, v in attrs.items() if v is not None}


def _references(spec: CubeSpec) -> str | None:
    """ACDD's `references`: every source's, once each, comma-separated (None if none)."""
    found = dict.fromkeys(r for s in spec.sources for r in (s.references or []))
    return ", ".join(found) or None


def geospatial_attrs(grid: TargetGrid) -> dict[str, object]:
    """ACDD 1.3's extent of `grid`: lon/lat bounds of its outline, and exactly, as a WKT
    polygon in its own CRS (`geospatial_bounds`, `geospatial_bounds_crs`)."""
    lon, lat = _geographic_bounds(grid)
    return {
        "geospatial_lon_min": lon[0],
        "geospatial_lon_max": lon[1],
        "geospatial_lat_min": lat[0],
        "geospatial_lat_max": lat[1],
        "geospatial_lat_units": "degree_north",
        "geospatial_lon_units": "degree_east",
        "geospatial_bounds": _bounds_wkt(grid),
        "geospatial_bounds_crs": grid.crs,
    }


def time_resolution(spec: CubeSpec) -> str | None:
    """ACDD's `time_coverage_resolution`: the step between the cube's time steps (an ISO 8601
    duration in days), None without time steps or when they are not evenly spaced."""
    steps = sorted({d for v in spec.variables for d in (v.source_files_by_time or {})})
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    return _iso_days(gaps.pop()) if len(gaps) == 1 else None


def _iso_days(delta: dt.timedelta) -> str:
    return f"P{delta.days}D"


def _bounds_wkt(grid: TargetGrid) -> str:
    """The grid's bounding box as a WKT polygon in its CRS (x y order, EPSG:3031's axes)."""
    x0, y0, x1, y1 = (f"{v:.10g}" for v in grid.bbox)
    return f"POLYGON (({x0} {y0}, {x1} {y0}, {x1} {y1}, {x0} {y1}, {x0} {y0}))"


def _source_checksum(dataset: xr.Dataset) -> str:
    for variable in dataset.data_vars.values():
        if "source_sha256" in variable.attrs:
            return variable.attrs["source_sha256"]
    return "unknown"


def _geographic_bounds(grid: TargetGrid) -> tuple[tuple[float, float], tuple[float, float]]:
    """Lon/lat extent of the grid's outline (the same outline the STAC item uses)."""
    lon, lat = np.array(outline_lonlat(grid)).T
    return (float(lon.min()), float(lon.max())), (float(lat.min()), float(lat.max()))
