"""The xcube server configuration of a published cube (pure: no process is started).

`server_config(cube, source)` turns the cube's metadata (opened with its consolidated
metadata, no data read) and where it is into xcube server configuration: one dataset, the
overview levels `<stem>.levels` (so a zoomed-out map reads the small levels, not the full
grid), and one style giving each variable its colour bar (`color_bar_name`, else viridis) and
value range (the overall minimum and maximum of its `polar_cube_stats`; for flag variables
the range of `flag_values`). Also: the viewer's and tiles' URLs, and the tiles that show the
whole cube. S3 keys never reach the configuration: `split_credentials` keeps them apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from polar_cube.errors import PolarCubeError

if TYPE_CHECKING:
    import xarray as xr

DEFAULT_COLOR_BAR = "viridis"
STORE_ID = "polar-cube"
STATS_ATTR = "polar_cube_stats"
# s3fs options that are secrets: they go into the xcube process's environment only
_SECRET_OPTIONS = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
}


class ViewError(PolarCubeError, RuntimeError):
    """The viewer cannot be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class CubeSource:
    """Where a published cube is: a local folder or an `s3://bucket/folder` prefix, the cube's
    name in it (`<stem>.zarr`, its levels `<stem>.levels` beside it), and the s3fs options
    that are not secret (endpoint, region, ...)."""

    root: str
    cube_name: str
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        secret = sorted(set(self.storage_options) & set(_SECRET_OPTIONS))
        if secret:
            raise ValueError(f"CubeSource.storage_options must not hold secrets ({secret})")

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def stem(self) -> str:
        return self.cube_name.removesuffix(".zarr")

    @property
    def levels_name(self) -> str:
        return f"{self.stem}.levels"

    def url(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def cube_url(self) -> str:
        return self.url(self.cube_name)

    @property
    def levels_url(self) -> str:
        return self.url(self.levels_name)


def split_credentials(storage_options: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """(s3fs options without secrets, the AWS_* environment variables carrying them)."""
    public = {k: v for k, v in storage_options.items() if k not in _SECRET_OPTIONS}
    env = {
        variable: str(storage_options[option])
        for option, variable in _SECRET_OPTIONS.items()
        if storage_options.get(option)
    }
    return public, env


def source_from_folder(folder: str | Path, cube_name: str) -> CubeSource:
    """A cube published into a local folder (`polar-cube build --output FOLDER`)."""
    return CubeSource(str(Path(folder).resolve()), cube_name)


# --- configuration (pure) -------------------------------------------------------------------


def map_variables(cube: xr.Dataset) -> list[str]:
    """The variables a map can show: those whose last two dimensions are (y, x)."""
    return [
        str(name)
        for name, variable in cube.data_vars.items()
        if variable.ndim >= 2 and tuple(variable.dims[-2:]) == ("y", "x")
    ]


def stats_records(attrs: Mapping[str, Any]) -> list[dict]:
    """The variable's `polar_cube_stats` records (a list, or its JSON text), else []."""
    records = attrs.get(STATS_ATTR)
    if isinstance(records, str):
        try:
            records = json.loads(records)
        except ValueError:
            return []
    if isinstance(records, Mapping):
        records = [records]
    if not isinstance(records, list):
        return []
    return [record for record in records if isinstance(record, Mapping)]


def value_range(attrs: Mapping[str, Any]) -> tuple[float, float]:
    """The colour bar's range: flag variables the range of their `flag_values`; others the
    overall minimum and maximum of their statistics (all time steps); [0, 1] without any.
    A single value v becomes [v - 0.5, v + 0.5]."""
    if "flag_values" in attrs:
        values = _numbers(attrs["flag_values"])
    else:
        values = []
        for record in stats_records(attrs):
            values += _numbers([record.get("minimum"), record.get("maximum")])
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if low == high:
        return low - 0.5, high + 0.5
    return low, high


def _numbers(values: Any) -> list[float]:
    """The finite numbers among `values` (a scalar or a sequence), as floats."""
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        values = [values]
    found = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            found.append(number)
    return found


def color_bar(attrs: Mapping[str, Any], default: str = DEFAULT_COLOR_BAR) -> str:
    """The variable's `color_bar_name` if it is a colour map xcube knows, else `default`."""
    from matplotlib import colormaps

    name = attrs.get("color_bar_name")
    return name if isinstance(name, str) and name in colormaps else default


def color_mapping(attrs: Mapping[str, Any]) -> dict:
    """xcube's ColorMappings entry of one variable: its colour bar and value range."""
    low, high = value_range(attrs)
    return {"ColorBar": color_bar(attrs), "ValueRange": [low, high]}


def time_steps(cube: xr.Dataset) -> list[str]:
    """The cube's time steps as ISO dates ([] without a time dimension). The viewer steps
    through them only if `time` is a datetime coordinate: anything else is refused."""
    import numpy as np

    if "time" not in cube.dims:
        return []
    if "time" not in cube.coords or not np.issubdtype(cube["time"].dtype, np.datetime64):
        raise ViewError(
            "the cube's time dimension has no datetime coordinate: the viewer cannot step "
            "through its time steps"
        )
    return [str(np.datetime_as_string(t, unit="D")) for t in cube["time"].values]


def server_config(
    cube: xr.Dataset, source: CubeSource, *, viewer_dir: str | Path | None = None
) -> dict:
    """xcube server configuration showing `cube` (its metadata: attributes, coordinates) from
    `source`: its overview levels as one dataset, a style with every map variable's colour bar
    and value range, and (with `viewer_dir`) the web viewer's own configuration folder.

    The store's parameters hold the non-secret s3fs options only (endpoint, region)."""
    time_steps(cube)  # refuses a time dimension the viewer could not step through
    stem = source.stem
    variables = map_variables(cube)
    if not variables:
        raise ViewError(f"{source.cube_url}: no variable on a (y, x) grid to show")
    if source.is_s3:
        params = {"root": source.root.removeprefix("s3://").strip("/")}
        if source.storage_options:
            params["storage_options"] = dict(source.storage_options)
    else:
        params = {"root": source.root}
    dataset = {
        "Identifier": stem,
        "Path": source.levels_name,
        "Title": str(cube.attrs.get("title") or stem),
        "Style": stem,
        "Variables": variables,
    }
    description = cube.attrs.get("summary") or cube.attrs.get("description")
    if description:
        dataset["Description"] = " ".join(str(description).split())
    config: dict = {
        "DataStores": [
            {
                "Identifier": STORE_ID,
                "StoreId": "s3" if source.is_s3 else "file",
                "StoreParams": params,
                "Datasets": [dataset],
            }
        ],
        "Styles": [
            {
                "Identifier": stem,
                "ColorMappings": {name: color_mapping(cube[name].attrs) for name in variables},
            }
        ],
        "EntrypointDatasetId": stem,
    }
    if viewer_dir is not None:
        config["Viewer"] = {"Configuration": {"Path": str(viewer_dir)}}
    return config


def viewer_url(server_url: str, dataset_id: str, variable: str | None = None) -> str:
    """The viewer's address with the dataset (and variable) selected."""
    url = f"{server_url}/viewer/?dataset={quote(dataset_id)}"
    return url + (f"&variable={quote(variable)}" if variable else "")


# --- reading the cube's metadata ------------------------------------------------------------


def open_cube_metadata(
    source: CubeSource, storage_options: dict | None = None
) -> tuple[xr.Dataset, int]:
    """(the published cube opened lazily from its consolidated metadata, the number of its
    overview levels), after checking that the levels are complete (`.zlevels` present). No
    chunk of a data variable is read.

    `storage_options` are the full s3fs options (keys included) for an S3 source."""
    import fsspec
    import xarray as xr

    from polar_cube.levels import ZLEVELS, level_count, read_record
    from polar_cube.storage import reaching_storage

    options = (storage_options if storage_options is not None else source.storage_options) or {}
    options = options if source.is_s3 else {}
    with reaching_storage(source.root, options):
        fs, _ = fsspec.core.url_to_fs(source.root, **options)
        cube_path = fs._strip_protocol(source.cube_url)
        if not any(fs.exists(f"{cube_path}/{name}") for name in (".zmetadata", "zarr.json")):
            raise ViewError(
                f"no published cube at {source.cube_url} (no consolidated metadata); "
                f"build it first, or name it with --cube-id"
            )
        zlevels = f"{fs._strip_protocol(source.levels_url)}/{ZLEVELS}"
        if not fs.exists(zlevels):
            raise ViewError(
                f"{source.levels_url}: the cube's overview levels are missing or incomplete; "
                f"rerun the build that published {source.cube_url}"
            )
        record = read_record(fs.cat_file(zlevels))
        kwargs = {"storage_options": options} if source.is_s3 else {}
        cube = xr.open_zarr(source.cube_url, consolidated=True, chunks=None, **kwargs)
    variables = map_variables(cube)
    shape = cube[variables[0]].shape if variables else (cube.sizes["y"], cube.sizes["x"])
    num_levels = record.get("num_levels")
    if not isinstance(num_levels, int) or num_levels < 1:  # an older record: as the build does
        num_levels = level_count(shape)
    return cube, num_levels


# --- map tiles (EPSG:3857, as the viewer asks for them) -------------------------------------


def web_mercator_tile(lon: float, lat: float, zoom: int) -> tuple[int, int]:
    """(x, y) of the web-mercator (XYZ) tile at `zoom` holding the point lon/lat."""
    count = 2**zoom
    lat = max(min(lat, 85.0511), -85.0511)
    x = int((lon + 180.0) / 360.0 * count)
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * count)
    return min(max(x, 0), count - 1), min(max(y, 0), count - 1)


def cube_outline(cube: xr.Dataset, points_per_edge: int = 64) -> list[tuple[float, float]]:
    """lon/lat points along the outer edge of the cube's grid (and its centre, first)."""
    import numpy as np
    import pyproj
    from xcube.core.gridmapping import GridMapping

    grid = GridMapping.from_dataset(cube)
    x0, y0, x1, y1 = grid.xy_bbox
    steps = np.linspace(0.0, 1.0, points_per_edge)
    xs = np.concatenate([x0 + (x1 - x0) * steps, np.full_like(steps, x1)])
    ys = np.concatenate([np.full_like(steps, y0), y0 + (y1 - y0) * steps])
    xs = np.concatenate([[(x0 + x1) / 2], xs, x1 - (x1 - x0) * steps, np.full_like(steps, x0)])
    ys = np.concatenate([[(y0 + y1) / 2], ys, np.full_like(steps, y1), y1 - (y1 - y0) * steps])
    to_lonlat = pyproj.Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lons, lats = to_lonlat.transform(xs, ys)
    return list(zip(map(float, lons), map(float, lats), strict=True))


def whole_cube_tile(cube: xr.Dataset) -> tuple[int, int, int]:
    """(z, x, y): the deepest web-mercator tile that holds the whole cube."""
    outline = cube_outline(cube)
    for zoom in range(24, -1, -1):
        if len({web_mercator_tile(lon, lat, zoom) for lon, lat in outline}) == 1:
            return (zoom, *web_mercator_tile(*outline[0], zoom))
    return 0, 0, 0


def level_for_zoom(zoom: int, resolution: float, num_levels: int) -> int:
    """The overview level xcube reads for a web-mercator tile at `zoom`."""
    from xcube.core.tilingscheme import TilingScheme

    resolutions = [resolution * 2**level for level in range(num_levels)]
    return TilingScheme.WEB_MERCATOR.get_resolutions_level(zoom, resolutions, "m")


def warm_up_tiles(cube: xr.Dataset, num_levels: int) -> list[tuple[int, int, int]]:
    """(z, x, y) of one tile at the cube's centre per overview level, coarsest first."""
    from xcube.core.gridmapping import GridMapping

    resolution = float(GridMapping.from_dataset(cube).x_res)
    lon, lat = cube_outline(cube, 2)[0]
    tiles: dict[int, tuple[int, int, int]] = {}
    for zoom in range(25):
        level = level_for_zoom(zoom, resolution, num_levels)
        tiles.setdefault(level, (zoom, *web_mercator_tile(lon, lat, zoom)))
    return [tiles[level] for level in sorted(tiles, reverse=True)]


def tile_url(
    server_url: str, dataset_id: str, variable: str, tile: tuple[int, int, int], **query: str
) -> str:
    """The server's address of one EPSG:3857 map tile (z, x, y) of `variable`."""
    z, x, y = tile
    params = "&".join(f"{key}={quote(str(value))}" for key, value in query.items())
    url = f"{server_url}/tiles/{quote(dataset_id)}/{quote(variable)}/{z}/{y}/{x}?crs=EPSG:3857"
    return url + (f"&{params}" if params else "")
