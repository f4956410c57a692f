"""A STAC Item describing the published cube, validated offline and written next to it.

The item is built with pystac (STAC 1.1.0, projection v2.0.0, datacube v2.2.0). Validation
needs no network: the core Item is checked against the STAC 1.1.0 JSON schemas that
pystac ships (`pystac.validation.jsonschemas`); the projection and datacube extensions,
whose schemas no PyPI package ships, are checked field by field below.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pystac
import xarray as xr
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError, best_match
from pyproj import Transformer
from pystac.extensions.datacube import DatacubeExtension, Dimension, Variable
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.local_validator import get_local_schema_cache
from referencing import Registry, Resource

from polar_cube.grid import TargetGrid
from polar_cube.spec import CubeSpec

STAC_VERSION = "1.1.0"
ITEM_SCHEMA = f"https://schemas.stacspec.org/v{STAC_VERSION}/item-spec/json-schema/item.json"
PROJECTION_SCHEMAS = {  # schema URI -> the property naming the CRS in that version
    "https://stac-extensions.github.io/projection/v1.0.0/schema.json": "proj:epsg",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json": "proj:epsg",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json": "proj:code",
}
DATACUBE_SCHEMAS = {
    f"https://stac-extensions.github.io/datacube/v{v}/schema.json"
    for v in ("2.0.0", "2.1.0", "2.2.0")
}
ZARR_MEDIA_TYPE = "application/vnd+zarr"
EDGE_POINTS = 101  # points per grid edge in the lon/lat outline
DECIMALS = 7  # of a degree in geometry and bbox: about 1 cm
GEOJSON_TYPES = (
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
)
_LICENSE = re.compile(r"^[\w\-.+]+$")  # STAC 1.1 licensing.json


class StacError(ValueError):
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


def outline_lonlat(grid: TargetGrid, points_per_edge: int = EDGE_POINTS) -> list[list[float]]:
    """The grid's outer edge as a closed lon/lat ring, densified, counter-clockwise.

    Each edge also gets its point nearest to a pole (where a polar grid's edge comes closest
    to it), so the bbox holds the whole outline and not just the samples.
    """
    poles = _poles(grid)
    xmin, ymin, xmax, ymax = grid.bbox
    if any(xmin <= x <= xmax and ymin <= y <= ymax for x, y in poles):
        raise StacError(f"grid {grid.bbox} contains a pole: not supported")
    corners = np.array([(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)])
    points = []
    for start, end in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        steps = [*np.linspace(0, 1, points_per_edge)[:-1], *_nearest(start, end, poles)]
        points += [start + (end - start) * t for t in np.unique(steps)]
    xs, ys = np.array(points).T
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    if np.any(np.abs(np.diff(lon)) > 180):
        raise StacError(f"grid {grid.bbox} crosses the antimeridian: not supported")
    ring = [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]
    if _signed_area(ring) < 0:
        ring.reverse()
    return [*ring, ring[0]]


def _poles(grid: TargetGrid) -> list[tuple[float, float]]:
    """The poles in grid coordinates (those the CRS can project)."""
    to_grid = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    xs, ys = to_grid.transform([0.0, 0.0], [-90.0, 90.0], errcheck=False)
    return [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(x) and np.isfinite(y)]


def _nearest(start: np.ndarray, end: np.ndarray, points: list) -> list[float]:
    """Edge parameters in (0, 1) of the edge points nearest to each of `points`."""
    direction = end - start
    steps = [
        np.dot(np.subtract(p, start), direction) / np.dot(direction, direction) for p in points
    ]
    return [float(t) for t in steps if 0 < t < 1]


def _signed_area(ring: list[list[float]]) -> float:
    x, y = np.array(ring).T
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) / 2)


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
    if value is None:
        return []
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
        title=f"{spec.title} (zarr format 2, consolidated metadata)",
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


def validate_stac_item(item: dict) -> None:
    """Check the item offline: core STAC schema, bbox/geometry, projection, datacube."""
    problems = item_problems(item)
    if problems:
        name = item.get("id") if isinstance(item, dict) else None
        raise StacError(f"STAC item {name!r} is invalid:\n  " + "\n  ".join(problems))


def item_problems(item: dict) -> list[str]:
    """Every problem found, each starting with the field it is about."""
    if not isinstance(item, dict):
        return [f"(root): expected a JSON object, got {type(item).__name__}"]
    problems = _schema_problems(item)
    problems += _bbox_problems(item)
    problems += _extension_problems(item)
    return problems


def _schema_problems(item: dict) -> list[str]:
    validator = Draft7Validator(get_local_schema_cache()[ITEM_SCHEMA], registry=_registry())
    errors = sorted(validator.iter_errors(item), key=lambda e: list(e.absolute_path))
    return list(dict.fromkeys(_describe(error, item) for error in errors))


def _registry() -> Registry:
    """The shipped schemas only: a reference to anything else fails instead of fetching."""
    return Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in get_local_schema_cache().items()
    )


def _describe(error: ValidationError, item: dict) -> str:
    """`field.path: message`, using the most specific error inside oneOf/anyOf."""
    while error.context:
        if any(list(e.absolute_path)[:1] == ["geometry"] for e in error.context):
            return _geometry_problem(item.get("geometry"))
        error = best_match(error.context)
    path = _path(error.absolute_path)
    if error.validator == "required":
        missing = re.match(r"'([^']+)'", error.message)
        if missing:
            path = _path([*error.absolute_path, missing.group(1)])
    return f"{path}: {_shorten(error.message)}"


def _geometry_problem(geometry) -> str:
    """One readable line for a geometry the GeoJSON schema rejects (its oneOf is verbose)."""
    if not isinstance(geometry, dict):
        return f"geometry: {type(geometry).__name__} is not a GeoJSON geometry object or null"
    kind = geometry.get("type")
    if kind not in GEOJSON_TYPES:
        return (
            f"geometry.type: {kind!r} is not a GeoJSON geometry type ({', '.join(GEOJSON_TYPES)})"
        )
    return f"geometry.coordinates: not valid coordinates for a GeoJSON {kind}"


def _path(parts: Iterable) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(root)"


def _shorten(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _bbox_problems(item: dict) -> list[str]:
    """bbox: 2D, lon/lat in range, south < north, and containing every geometry point."""
    bbox, geometry = item.get("bbox"), item.get("geometry")
    if not _numbers(bbox, 4):
        return []  # missing, 3D or malformed: the schema reports what is wrong
    west, south, east, north = bbox
    problems = []
    if not all(-180 <= lon <= 180 for lon in (west, east)):
        problems.append(f"bbox: longitudes {west}, {east} outside -180..180")
    if not all(-90 <= lat <= 90 for lat in (south, north)):
        problems.append(f"bbox: latitudes {south}, {north} outside -90..90")
    if south > north:
        problems.append(f"bbox: south {south} is north of north {north} (order is W, S, E, N)")
    outside = [p for p in _points(geometry) if not _in_bbox(p, bbox)]
    if outside and not problems:
        problems.append(f"bbox: does not contain geometry point {outside[0]} (order is W, S, E, N)")
    return problems


def _in_bbox(point: list[float], bbox: list[float]) -> bool:
    west, south, east, north = bbox
    lon, lat = point[0], point[1]
    inside_lon = west <= lon <= east if west <= east else lon >= west or lon <= east
    return inside_lon and south <= lat <= north


def _points(geometry) -> list[list[float]]:
    """Every position of a GeoJSON geometry (empty when it is malformed)."""
    if not isinstance(geometry, dict):
        return []
    if geometry.get("type") == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _points(g)]
    found: list[list[float]] = []
    _collect(geometry.get("coordinates"), found)
    return found


def _collect(node, found: list) -> None:
    if _numbers(node, 2) or _numbers(node, 3):
        found.append(node)
    elif isinstance(node, list):
        for child in node:
            _collect(child, found)


def _numbers(value, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _extension_problems(item: dict) -> list[str]:
    extensions = item.get("stac_extensions") or []
    if not isinstance(extensions, list):
        return []  # the schema reports it
    properties = item.get("properties") if isinstance(item.get("properties"), dict) else {}
    problems = [
        f"stac_extensions: {uri} cannot be validated offline (known: projection, datacube)"
        for uri in extensions
        if uri not in PROJECTION_SCHEMAS and uri not in DATACUBE_SCHEMAS
    ]
    projection = [uri for uri in extensions if uri in PROJECTION_SCHEMAS]
    datacube = [uri for uri in extensions if uri in DATACUBE_SCHEMAS]
    problems += _undeclared(properties, "proj:", projection, "projection")
    problems += _undeclared(properties, "cube:", datacube, "datacube")
    if projection:
        problems += projection_problems(properties, PROJECTION_SCHEMAS[projection[0]])
    if datacube:
        problems += datacube_problems(properties)
    return problems


def _undeclared(properties: dict, prefix: str, declared: list, name: str) -> list[str]:
    fields = sorted(k for k in properties if k.startswith(prefix))
    if fields and not declared:
        return [f"properties.{fields[0]}: used but the {name} extension is not in stac_extensions"]
    return []


def projection_problems(properties: dict, crs_field: str = "proj:code") -> list[str]:
    """The projection fields this project writes: CRS, bbox, shape, transform, consistent."""
    problems = []
    crs = properties.get(crs_field, "missing")
    if crs_field == "proj:code" and not (crs is None or _is_code(crs)):
        problems.append(f"properties.proj:code: {crs!r} is not an 'AUTHORITY:CODE' string")
    if crs_field == "proj:epsg" and not (crs is None or _is_int(crs)):
        problems.append(f"properties.proj:epsg: {crs!r} is not an integer EPSG code")
    bbox, shape, transform = (properties.get(f"proj:{k}") for k in ("bbox", "shape", "transform"))
    if not _numbers(bbox, 4) or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
        problems.append(f"properties.proj:bbox: {bbox!r} is not [xmin, ymin, xmax, ymax]")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n, 1) for n in shape)):
        problems.append(f"properties.proj:shape: {shape!r} is not [height, width] (positive)")
    if not (_numbers(transform, 6) or _numbers(transform, 9)):
        problems.append(f"properties.proj:transform: {transform!r} is not 6 or 9 numbers")
    if not problems:
        problems += _transform_problems(bbox, shape, transform)
    return problems


def _transform_problems(bbox: list, shape: list, transform: list) -> list[str]:
    """The transform must map the array's outer edges onto proj:bbox (north-up or south-up)."""
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


def _is_code(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z][\w.-]*:\w+", value) is not None


def _is_int(value, minimum: int | None = None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return ok and (minimum is None or value >= minimum)


def datacube_problems(properties: dict) -> list[str]:
    """cube:dimensions and cube:variables as the datacube extension defines them.

    Beyond the extension, this project requires a `unit` on every variable.
    """
    dimensions = properties.get("cube:dimensions")
    variables = properties.get("cube:variables")
    if not isinstance(dimensions, dict) or not dimensions:
        return ["properties.cube:dimensions: missing or not a non-empty object"]
    problems = []
    for name, dimension in dimensions.items():
        problems += _dimension_problems(f"properties.cube:dimensions.{name}", dimension)
    if not isinstance(variables, dict):
        return [*problems, "properties.cube:variables: missing or not an object"]
    for name, variable in variables.items():
        where = f"properties.cube:variables.{name}"
        problems += _variable_problems(where, variable, set(dimensions))
    return problems


def _dimension_problems(where: str, dimension) -> list[str]:
    if not isinstance(dimension, dict) or not isinstance(dimension.get("type"), str):
        return [f"{where}.type: missing (every dimension needs a type)"]
    kind = dimension["type"]
    if kind == "spatial":
        return _spatial_problems(where, dimension)
    if kind == "temporal":
        return _temporal_problems(where, dimension)
    return []


def _spatial_problems(where: str, dimension: dict) -> list[str]:
    problems = []
    axis = dimension.get("axis")
    if axis not in ("x", "y", "z"):
        problems.append(f"{where}.axis: {axis!r} is not 'x', 'y' or 'z'")
    extent = dimension.get("extent")
    if axis in ("x", "y") and not (_numbers(extent, 2) and extent[0] <= extent[1]):
        problems.append(f"{where}.extent: {extent!r} is not [min, max]")
    step = dimension.get("step")
    if step is not None and not isinstance(step, int | float):
        problems.append(f"{where}.step: {step!r} is not a number")
    reference = dimension.get("reference_system", 4326)
    if not isinstance(reference, str | int | dict) or isinstance(reference, bool):
        problems.append(
            f"{where}.reference_system: {reference!r} is not an EPSG code/WKT2/PROJJSON"
        )
    return problems


def _temporal_problems(where: str, dimension: dict) -> list[str]:
    problems = []
    extent = dimension.get("extent")
    if not (isinstance(extent, list) and len(extent) == 2 and all(map(_is_time, extent))):
        problems.append(f"{where}.extent: {extent!r} is not [start, end] (ISO 8601 or null)")
    values = dimension.get("values", [])
    if not (isinstance(values, list) and all(_is_time(v) and v for v in values)):
        problems.append(f"{where}.values: not a list of ISO 8601 date-times")
    return problems


def _is_time(value) -> bool:
    if value is None:
        return True
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return False
    return True


def _variable_problems(where: str, variable, dimension_names: set[str]) -> list[str]:
    if not isinstance(variable, dict):
        return [f"{where}: not an object"]
    problems = []
    dims = variable.get("dimensions")
    if not (isinstance(dims, list) and all(isinstance(d, str) for d in dims)):
        problems.append(f"{where}.dimensions: {dims!r} is not a list of dimension names")
    else:
        unknown = [d for d in dims if d not in dimension_names]
        if unknown:
            problems.append(f"{where}.dimensions: {unknown} not in cube:dimensions")
    if variable.get("type") not in ("data", "auxiliary"):
        problems.append(f"{where}.type: {variable.get('type')!r} is not 'data' or 'auxiliary'")
    unit = variable.get("unit")
    if not isinstance(unit, str) or not unit:
        problems.append(f"{where}.unit: missing (every cube variable needs a unit)")
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
