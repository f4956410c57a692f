"""A STAC Item describing the published cube, validated offline and written next to it.

The item is built with pystac (STAC 1.1.0, projection v2.0.0, datacube v2.2.0) and validated
with pystac's JSON-schema validator without network: the core schemas ship with pystac, the
extension schemas are fetched once at setup (`polar_cube.cube.stac_schemas`). A few checks
that the schemas cannot make are written out below, each saying why.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pystac
import shapely.geometry
import xarray as xr
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from jsonschema.exceptions import ValidationError
from pystac.errors import STACValidationError
from pystac.extensions.datacube import DatacubeExtension, Dimension, Variable
from pystac.extensions.projection import ProjectionExtension
from pystac.stac_object import STACObjectType
from pystac.validation import GetSchemaError, JsonSchemaSTACValidator

from polar_cube.cube.stac_schemas import DATACUBE, PROJECTION, load_extension_schemas
from polar_cube.errors import PolarCubeError
from polar_cube.grid import TargetGrid, outline_lonlat
from polar_cube.spec import CubeSpec

STAC_VERSION = "1.1.0"
ITEM_SCHEMA = f"https://schemas.stacspec.org/v{STAC_VERSION}/item-spec/json-schema/item.json"
ZARR_MEDIA_TYPE = "application/vnd+zarr"
DECIMALS = 7  # of a degree in geometry and bbox: about 1 cm
_LICENSE = re.compile(r"^[\w\-.+]+$")  # STAC 1.1 licensing.json


class StacError(PolarCubeError, ValueError):
    """An item that cannot be built or is invalid; the message names each bad field."""


# --- building ------------------------------------------------------------------------------


def cube_stac_item(
    cube: xr.Dataset,
    spec: CubeSpec,
    grid: TargetGrid,
    cube_url: str,
    *,
    quicklook_urls: Sequence[str] = (),
) -> dict:
    """A STAC Item (JSON-ready dict) describing the cube published at `cube_url`."""
    missing = [v.name for v in spec.variables if v.name not in cube.data_vars]
    if missing:
        raise StacError(f"{cube_url}: cube lacks spec variable(s) {', '.join(missing)}")
    ring = outline_lonlat(grid)
    item = pystac.Item(
        id=spec.data_id.removesuffix(".zarr"),
        geometry={"type": "Polygon", "coordinates": [[_rounded(p) for p in ring]]},
        bbox=_outer_bbox(ring),
        datetime=None,
        properties=_properties(spec),
        start_datetime=_utc(spec.time_range[0]) if spec.time_range else None,
        end_datetime=_utc(spec.time_range[1]) if spec.time_range else None,
    )
    item.common_metadata.created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    _add_projection(item, grid)
    _add_datacube(item, cube, spec, grid)
    item.add_asset("zarr", _zarr_asset(spec, cube_url))
    for key, asset in _quicklook_assets(quicklook_urls).items():
        item.add_asset(key, asset)
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def _rounded(point: list[float]) -> list[float]:
    return [round(v, DECIMALS) for v in point]


def _outer_bbox(ring: list[list[float]]) -> list[float]:
    """[W, S, E, N] rounded outwards, so it holds the rounded geometry too."""
    lon, lat = np.array(ring).T
    scale = 10.0**DECIMALS
    low = [float(np.floor(v.min() * scale) / scale) for v in (lon, lat)]
    high = [float(np.ceil(v.max() * scale) / scale) for v in (lon, lat)]
    return [low[0], low[1], high[0], high[1]]


def _utc(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _properties(spec: CubeSpec) -> dict:
    """title, description, license ("other" plus its text when not an SPDX id), providers."""
    properties = {"title": spec.title, "description": spec.description}
    if spec.license and _LICENSE.match(spec.license):
        properties["license"] = spec.license
    elif spec.license:
        properties["license"] = "other"
        properties["polar_cube:license_text"] = spec.license
    providers = _providers(spec.metadata)
    if providers:
        properties["providers"] = providers
    return properties


def _providers(metadata: dict) -> list[dict]:
    """STAC providers from the spec's CF-style creator_* and publisher_* attributes."""
    names = _as_list(metadata.get("creator_name"))
    urls = _as_list(metadata.get("creator_url"))
    providers = [
        {"name": name, "roles": ["producer"], **({"url": url} if url else {})}
        for name, url in zip(names, urls + [None] * len(names), strict=False)
    ]
    if metadata.get("publisher_name"):
        publisher = {"name": metadata["publisher_name"], "roles": ["host"]}
        if metadata.get("publisher_url"):
            publisher["url"] = metadata["publisher_url"]
        providers.append(publisher)
    return providers


def _as_list(value) -> list:
    """A list as it is, or ACDD's comma-separated list (`"a, b"`) split."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value) if isinstance(value, list | tuple) else [value]


def _add_projection(item: pystac.Item, grid: TargetGrid) -> None:
    """proj:code, proj:bbox, proj:shape and the transform of the stored (south-first) rows."""
    epsg = grid.pyproj_crs.to_epsg()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg else None,
        wkt2=None if epsg else grid.pyproj_crs.to_wkt(),
        bbox=[float(v) for v in grid.bbox],
        shape=[grid.height, grid.width],
        transform=projection_transform(grid),
    )


def projection_transform(grid: TargetGrid) -> list[float]:
    """Affine coefficients [a, b, c, d, e, f] of the cube's array: row 0 is the south edge.

    The cube's y axis ascends (as published), so e = +resolution and f = ymin.
    """
    xmin, ymin = grid.bbox[0], grid.bbox[1]
    resolution = float(grid.resolution)
    return [resolution, 0.0, float(xmin), 0.0, resolution, float(ymin)]


def _add_datacube(item: pystac.Item, cube: xr.Dataset, spec: CubeSpec, grid: TargetGrid) -> None:
    dimensions = _spatial_dimensions(grid)
    times = _time_values(cube)
    if times:
        dimensions["time"] = Dimension.from_dict(
            {"type": "temporal", "extent": [times[0], times[-1]], "values": times}
        )
    variables = {}
    for variable in spec.variables:
        dims = list(cube[variable.name].dims)
        variables[variable.name] = Variable(
            {
                "dimensions": dims,
                "type": "data",
                "unit": variable.units,
                "description": variable.description or variable.long_name,
                "long_name": variable.long_name,
            }
        )
    DatacubeExtension.ext(item, add_if_missing=True).apply(dimensions, variables)


def _spatial_dimensions(grid: TargetGrid) -> dict[str, Dimension]:
    """x/y with the extent of the cell centres (the coordinate values) and the cell size."""
    reference = grid.pyproj_crs.to_epsg() or grid.pyproj_crs.to_wkt()
    return {
        axis: Dimension.from_dict(
            {
                "type": "spatial",
                "axis": axis,
                "extent": [float(values[0]), float(values[-1])],
                "step": float(grid.resolution),
                "reference_system": reference,
            }
        )
        for axis, values in (("x", grid.x), ("y", grid.y))
    }


def _time_values(cube: xr.Dataset) -> list[str]:
    if "time" not in cube.coords:
        return []
    return [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in pd.DatetimeIndex(cube["time"].values)]


def _zarr_asset(spec: CubeSpec, cube_url: str) -> pystac.Asset:
    return pystac.Asset(
        href=cube_url,
        media_type=ZARR_MEDIA_TYPE,
        roles=["data"],
        title=f"{spec.title} (zarr format {spec.zarr_layout[0]}, consolidated metadata)",
    )


def _quicklook_assets(urls: Iterable[str]) -> dict[str, pystac.Asset]:
    """One `quicklook-<file stem>` asset per PNG (`<variable>` or `<variable>_<date>`)."""
    assets: dict[str, pystac.Asset] = {}
    for url in urls:
        stem = PurePosixPath(url.rstrip("/")).stem
        key = f"quicklook-{stem}"
        if key in assets:
            raise StacError(f"quicklook {url}: asset {key!r} given twice")
        assets[key] = pystac.Asset(
            href=url, media_type=pystac.MediaType.PNG, roles=["overview"], title=stem
        )
    return assets


# --- validation ----------------------------------------------------------------------------


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator on local schemas only: it never fetches."""

    def __init__(self, extension_schemas: dict[str, dict]) -> None:
        super().__init__()  # the STAC core and GeoJSON schemas that pystac ships
        self.schema_cache.update(extension_schemas)

    def _get_schema(self, schema_uri: str) -> dict:
        try:
            return self.schema_cache[schema_uri.rstrip("#")]
        except KeyError:
            raise GetSchemaError(schema_uri, LookupError("no offline copy")) from None


@functools.cache
def offline_validator(schema_dir: Path | None = None) -> OfflineValidator:
    """The validator with the schemas of `schema_dir` (default: where setup puts them)."""
    return OfflineValidator(load_extension_schemas(schema_dir))


def validate_stac_item(item: dict, schema_dir: Path | None = None) -> list[str]:
    """Check the item offline against its schemas, then this project's rules.

    Returns the URIs of the schemas used; raises `StacError` naming each bad field, or
    `SchemasMissing` (with the command that fetches them) when the schemas are not installed.
    """
    validator = offline_validator(schema_dir)
    name = item.get("id") if isinstance(item, dict) else None
    try:
        item = json.loads(json.dumps(item))  # as written: tuples become lists
    except (TypeError, ValueError) as error:
        raise StacError(f"STAC item {name!r} is not JSON: {error}") from None
    used, problems = _schema_problems(item, validator)
    if not problems:  # the rules expect an item the schemas accept
        problems = _bbox_problems(item) + _undeclared(item["properties"], used)
        if PROJECTION in used:
            problems += _transform_problems(item["properties"])
        if DATACUBE in used:
            problems += _variable_problems(item["properties"])
    if problems:
        raise StacError(f"STAC item {name!r} is invalid:\n  " + "\n  ".join(problems))
    return used


def _schema_problems(item: dict, validator: OfflineValidator) -> tuple[list[str], list[str]]:
    """(schema URIs used, one line per bad field) for the item schema and its extensions."""
    if not isinstance(item, dict):
        return [], [f"(root): expected a JSON object, got {type(item).__name__}"]
    extensions = item.get("stac_extensions")
    declared = [u for u in extensions if isinstance(u, str)] if isinstance(extensions, list) else []
    problems = [
        f"stac_extensions: no offline schema for {uri} (have projection v2.0.0, datacube v2.2.0)"
        for uri in declared
        if uri not in validator.schema_cache
    ]
    used = []
    for uri in [ITEM_SCHEMA, *(u for u in declared if u in validator.schema_cache)]:
        try:
            if uri == ITEM_SCHEMA:
                validator.validate_core(item, STACObjectType.ITEM, STAC_VERSION)
            else:
                validator.validate_extension(item, STACObjectType.ITEM, STAC_VERSION, uri)
            used.append(uri)
        except STACValidationError as error:
            lines: dict[str, str] = {}  # one per field
            for path, message in map(_describe, error.source or []):
                lines.setdefault(path, f"{path}: {_shorten(message)}")
            problems += lines.values()
    return used, problems


def _describe(error: ValidationError) -> tuple[str, str]:
    """(field path, message) of the most frequent leaf error under oneOf/anyOf.

    jsonschema's best_match (what pystac reports) often names the wrong branch, e.g. the
    extensions' oneOf(Item, Collection) gives "'Collection' was expected".
    """
    return Counter(_leaves(error)).most_common(1)[0][0]


def _leaves(error: ValidationError) -> list[tuple[str, str]]:
    """(path, message) of the leaf errors in the oneOf/anyOf branches meant for the instance.

    A branch is not meant for it when it rejects the instance's JSON type or its `type` field;
    when every branch rejects the `type` field, that field is the problem.
    """
    if not error.context:
        return [(_path(error), _message(error))]
    branches: dict[object, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    where = list(error.absolute_path)
    kinds = [s for s in error.context if list(s.absolute_path) == [*where, "type"]]
    meant = [b for b in branches.values() if not any(_discriminates(s, where) for s in b)]
    if not meant and kinds:
        allowed = list(dict.fromkeys(v for s in kinds for v in _allowed(s)))
        return [(_path(kinds[0]), f"{kinds[0].instance!r} is not one of {allowed}")]
    return [leaf for branch in meant or branches.values() for s in branch for leaf in _leaves(s)]


def _discriminates(error: ValidationError, where: list) -> bool:
    path = list(error.absolute_path)
    return path == [*where, "type"] or (path == where and error.validator == "type")


def _allowed(error: ValidationError) -> list:
    if error.validator == "const":
        return [error.validator_value]
    return list(error.validator_value) if error.validator == "enum" else []


def _path(error: ValidationError) -> str:
    """The field path; for a missing property, the path of that property."""
    parts = list(error.absolute_path)
    missing = re.match(r"'([^']+)' is a required", error.message)
    if error.validator == "required" and missing:
        parts.append(missing.group(1))
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return text.lstrip(".") or "(root)"


def _message(error: ValidationError, limit: int = 60) -> str:
    """jsonschema's message, with a long offending value (it starts the message) abbreviated."""
    shown = repr(error.instance)
    if len(shown) <= limit or not error.message.startswith(shown):
        return error.message
    size = f" of {len(error.instance)}" if isinstance(error.instance, list | dict) else ""
    value = f"{shown[: limit // 2]}... ({type(error.instance).__name__}{size})"
    return value + error.message[len(shown) :]


def _shorten(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _bbox_problems(item: dict) -> list[str]:
    """bbox: [W, S, E, N] in lon/lat range (W <= E) holding the geometry.

    The schema asks for 4 or 6 numbers only; it cannot relate bbox and geometry.
    """
    bbox, geometry = item.get("bbox"), item.get("geometry")
    if bbox is None or len(bbox) != 4:
        return []  # 3D: not written by this project
    west, south, east, north = bbox
    if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
        return [f"bbox: not [W, S, E, N] in lon/lat with W <= E: {bbox}"]
    if geometry is None:
        return []
    low_lon, low_lat, high_lon, high_lat = shapely.geometry.shape(geometry).bounds
    if low_lon < west or low_lat < south or high_lon > east or high_lat > north:
        bounds = [low_lon, low_lat, high_lon, high_lat]
        return [f"bbox: does not contain the geometry: {bbox} vs. its bounds {bounds}"]
    return []


def _undeclared(properties: dict, extensions: list[str]) -> list[str]:
    """proj:/cube: fields need their extension in stac_extensions.

    An extension's schema only applies when it is declared, so no schema sees this.
    """
    problems = []
    for prefix, uri in (("proj:", PROJECTION), ("cube:", DATACUBE)):
        fields = sorted(k for k in properties if k.startswith(prefix))
        if fields and uri not in extensions:
            problems.append(f"properties.{fields[0]}: used but {uri} is not in stac_extensions")
    return problems


def _transform_problems(properties: dict) -> list[str]:
    """proj:transform must map the edges of the proj:shape array onto proj:bbox.

    The schema checks each field's form, not that they agree.
    """
    bbox, shape, transform = (properties.get(f"proj:{k}") for k in ("bbox", "shape", "transform"))
    if bbox is None or shape is None or transform is None or len(bbox) != 4:
        return []
    a, b, c, d, e, f = transform[:6]
    height, width = shape
    xs, ys = sorted([c, c + a * width]), sorted([f, f + e * height])
    tolerance = 1e-6 * max(abs(a), abs(e), 1)
    expected = [xs[0], ys[0], xs[1], ys[1]]
    if b != 0 or d != 0 or any(abs(p - q) > tolerance for p, q in zip(expected, bbox, strict=True)):
        return [
            f"properties.proj:transform: {transform} with proj:shape {shape} covers "
            f"{expected}, not proj:bbox {bbox}"
        ]
    return []


def _variable_problems(properties: dict) -> list[str]:
    """Each cube variable: its `type`, a `unit`, dimensions from cube:dimensions.

    datacube v2.2.0's schema checks `variable_type` instead of `type` (a bug); a unit is this
    project's rule; a schema cannot check that names refer to cube:dimensions.
    """
    dimensions = properties.get("cube:dimensions") or {}
    problems = []
    for name, variable in (properties.get("cube:variables") or {}).items():
        where = f"properties.cube:variables.{name}"
        if variable.get("type") not in ("data", "auxiliary"):
            problems.append(f"{where}.type: {variable.get('type')!r} is not 'data' or 'auxiliary'")
        if not variable.get("unit"):
            problems.append(f"{where}.unit: missing (every cube variable needs a unit)")
        unknown = [d for d in variable["dimensions"] if d not in dimensions]
        if unknown:
            problems.append(f"{where}.dimensions: {unknown} not in cube:dimensions")
    return problems


# --- writing -------------------------------------------------------------------------------


def write_stac_item(item: dict, url: str, storage_options: dict | None = None) -> str:
    """Validate the item and write it as JSON to `url` (local path or s3://); return `url`."""
    validate_stac_item(item)
    fs, path = url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):  # object stores need no folders
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(item, f, indent=1)
        f.write("\n")
    return url
