"""The cube spec (`cube.geojson`): a typed model, validated when loaded.

The spec is a GeoJSON Feature whose `properties` describe the cube (grid, variables,
sources, global metadata). Every per-dataset difference of the pipeline lives here:
which source and which file/variable inside it feed a variable, the masking rule and
the resampling method.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pyproj import CRS
from pyproj.exceptions import CRSError

from polar_cube.errors import PolarCubeError, read_input_file

SourceFormat = Literal["gmt_netcdf", "geotiff", "latlon_netcdf", "polygons"]
ResamplingMethod = Literal["linear", "nearest"]
Scale = Literal["small", "full"]  # stand-in sizes: `small` for tests, `full` the real size
SCALES: tuple[Scale, ...] = ("small", "full")

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "!=": operator.ne,
}
_CONDITION = re.compile(r"^\s*(>=|<=|>|<|!=)\s*([-+]?\d+(\.\d*)?([eE][-+]?\d+)?)\s*$")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecError(PolarCubeError, ValueError):
    """The spec file is invalid; the message names the file and each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidCondition(_Strict):
    """One masking rule such as `> 0`: source values failing it become NaN."""

    op: Literal[">=", "<=", ">", "<", "!="]
    threshold: float

    @classmethod
    def parse(cls, text: str) -> ValidCondition:
        match = _CONDITION.match(text)
        if not match:
            raise ValueError(f"invalid condition {text!r}; expected e.g. '> 0' or '>= -1.5'")
        return cls(op=match.group(1), threshold=float(match.group(2)))

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"

    def holds(self, values: np.ndarray) -> np.ndarray:
        return _COMPARISONS[self.op](values, self.threshold)


def _check_bounds(value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    xmin, ymin, xmax, ymax = value
    if not (xmin < xmax and ymin < ymax):
        raise ValueError("must be [xmin, ymin, xmax, ymax] with min < max")
    return value


def _check_per_scale(value: dict[Scale, Any]) -> dict[Scale, Any]:
    missing = [scale for scale in SCALES if scale not in value]
    if missing:
        raise ValueError(f"needs a value for each scale: missing {', '.join(missing)}")
    if any(not v > 0 for v in value.values()):
        raise ValueError("values must be positive")
    return value


Bounds = Annotated[tuple[float, float, float, float], AfterValidator(_check_bounds)]


class GridStandin(_Strict):
    """A synthetic raster stand-in (geotiff, gmt_netcdf, latlon_netcdf): a smooth random
    field on a regular grid in the source's CRS, the same bytes on every run."""

    bounds: Bounds = Field(
        description="xmin, ymin, xmax, ymax in the source CRS (degrees for latlon_netcdf)"
    )
    pixel_size: Annotated[dict[Scale, float], AfterValidator(_check_per_scale)] = Field(
        description="cell size per scale (small, full)"
    )
    values: tuple[float, float] = Field(description="every value lies within [low, high]")
    wavelengths: tuple[float, float] = Field(
        description="shortest and longest feature size, in the CRS's units"
    )
    valid_fraction: float = Field(
        default=1.0, gt=0, le=1, description="about this share of cells has data, the rest NaN"
    )
    registration: Literal["pixel", "gridline"] = Field(
        default="pixel", description="gmt_netcdf: node_offset 1 (pixel) or 0 (gridline)"
    )
    seed: int = 0

    @field_validator("values")
    @classmethod
    def _check_values(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError("must be [low, high] with low < high")
        return value

    @field_validator("wavelengths")
    @classmethod
    def _check_wavelengths(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [shortest, longest] with 0 < shortest <= longest")
        return value

    @model_validator(mode="after")
    def _check_cells(self) -> GridStandin:
        xmin, ymin, xmax, ymax = self.bounds
        for scale, size in self.pixel_size.items():
            for extent in (xmax - xmin, ymax - ymin):
                if abs(extent / size - round(extent / size)) > 1e-6:
                    raise ValueError(
                        f"pixel_size.{scale} {size:.10g} does not divide the bounds' extent "
                        f"{extent:.10g} into whole cells"
                    )
        return self


class PolygonStandin(_Strict):
    """A synthetic polygons stand-in: irregular blobs scattered over `bounds`, each given one
    of its variables' `classes` at random."""

    bounds: Bounds = Field(description="xmin, ymin, xmax, ymax in the source CRS")
    count: Annotated[dict[Scale, int], AfterValidator(_check_per_scale)] = Field(
        description="number of polygons per scale (small, full)"
    )
    diameters: tuple[float, float] = Field(description="smallest and largest diameter")
    seed: int = 0

    @field_validator("diameters")
    @classmethod
    def _check_diameters(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [smallest, largest] with 0 < smallest <= largest")
        return value


def _standin_kind(value: Any) -> str:
    """Which stand-in a description is: one with `count` is made of polygons."""
    fields = value if isinstance(value, dict) else vars(value)
    return "polygons" if "count" in fields else "grid"


Standin = Annotated[
    Annotated[GridStandin, Tag("grid")] | Annotated[PolygonStandin, Tag("polygons")],
    Discriminator(_standin_kind),
]


class SourceSpec(_Strict):
    """One downloadable source: where it is, how it is packed, what format it is in."""

    id: str = Field(description="short name; also the name of the source's per-dataset cube")
    name: str
    download_url: str = Field(description="http(s)://, file:// or a plain path")
    compression_format: Literal["tar", "zip"] | None = None
    source_format: SourceFormat
    source_crs: str = Field(description="CRS of the data, e.g. EPSG:3031 (checked by pyproj)")
    sha256: str | None = None
    size: int | None = Field(default=None, gt=0)
    credentials_block: str | None = Field(
        default=None, description="name of a Prefect Secret block holding 'user:password'"
    )
    license: str | None = None
    references: list[str] = []
    acknowledgement: str | None = None
    # How `polar-cube sources make` writes a stand-in of this source (sources without one
    # need a built-in writer). Not part of the data's recipe: left out of fingerprints.
    standin: Standin | None = Field(default=None, exclude=True)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"{value!r} must be lower-case letters, digits and '_'")
        return value

    @field_validator("source_crs")
    @classmethod
    def _check_crs(cls, value: str) -> str:
        try:
            CRS.from_user_input(value)
        except CRSError as error:
            raise ValueError(f"unknown CRS {value!r}: {error}") from None
        return value

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lower-case hex digits")
        return value

    @field_validator("standin")
    @classmethod
    def _check_standin(cls, value: Any, info: ValidationInfo) -> Any:
        source_format = info.data.get("source_format")
        if value is None or source_format is None:
            return value
        polygons = source_format == "polygons"
        if polygons != isinstance(value, PolygonStandin):
            needs = "count, diameters" if polygons else "pixel_size, values, wavelengths"
            raise ValueError(f"a {source_format} stand-in needs {needs}")
        if source_format != "gmt_netcdf" and getattr(value, "registration", "pixel") != "pixel":
            raise ValueError("registration: only gmt_netcdf grids have a choice")
        return value

    @property
    def file_name(self) -> str:
        """The downloaded file's name: the last segment of the URL or path."""
        return re.split(r"[/\\]", self.download_url.split("?")[0].rstrip("/"))[-1]


# ACDD 1.3 `coverage_content_type`: ISO 19115-1 MD_CoverageContentTypeCode
CoverageContentType = Literal[
    "image",
    "thematicClassification",
    "physicalMeasurement",
    "auxiliaryInformation",
    "qualityInformation",
    "referenceInformation",
    "modelResult",
    "coordinate",
]


class VariableSpec(_Strict):
    """One cube variable and the recipe that makes it from its source."""

    name: str
    long_name: str
    standard_name: str | None = Field(
        default=None, description="from the CF standard-name table, where it has one"
    )
    coverage_content_type: CoverageContentType | None = Field(
        default=None, description="ACDD 1.3: what the values are (ISO 19115-1 code)"
    )
    description: str | None = None
    units: str
    dtype: Literal["float32"] = "float32"
    dims: tuple[Literal["y"], Literal["x"]] | tuple[Literal["time"], Literal["y"], Literal["x"]]
    fill_value: Literal["nan"] = "nan"
    source: str = Field(description="id of the source this variable is made from")
    source_file: str | None = Field(
        default=None, description="file inside the download (archive member path, or its name)"
    )
    source_files_by_time: dict[dt.date, str] | None = Field(
        default=None, description="one file per time step, stacked on `time`"
    )
    source_variable: str | None = Field(
        default=None, description="netCDF variable, or the polygon attribute holding classes"
    )
    valid_if: tuple[ValidCondition, ...] = ()
    resampling: ResamplingMethod | None = None
    classes: dict[str, int] | None = Field(
        default=None, description="polygons: attribute value -> code burnt into the grid"
    )
    background: float | None = Field(
        default=None, description="polygons: code for cells covered by no polygon"
    )
    attrs: dict[str, Any] = Field(default={}, description="extra attributes copied to the output")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"{value!r} must be lower-case letters, digits and '_'")
        return value

    @field_validator("valid_if", mode="before")
    @classmethod
    def _parse_conditions(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return [ValidCondition.parse(v) if isinstance(v, str) else v for v in value]

    @model_validator(mode="after")
    def _check_files(self) -> VariableSpec:
        if (self.source_file is None) == (self.source_files_by_time is None):
            raise ValueError("give exactly one of 'source_file' and 'source_files_by_time'")
        if self.source_files_by_time is not None and self.dims[0] != "time":
            raise ValueError("'source_files_by_time' needs dims ['time', 'y', 'x']")
        if self.source_file is not None and self.dims[0] == "time":
            raise ValueError("dims ['time', 'y', 'x'] need 'source_files_by_time'")
        return self

    @property
    def files_by_time(self) -> dict[dt.date | None, str]:
        """The source files to read: {time step or None for static: file}."""
        if self.source_files_by_time is not None:
            return dict(sorted(self.source_files_by_time.items()))
        return {None: self.source_file}


class CubeSpec(_Strict):
    """The `properties` of cube.geojson."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data_id: str
    title: str
    description: str = ""
    version: str
    license: str | None = None
    time_range: tuple[dt.date, dt.date] | None = None
    spatial_ref: str
    spatial_bbox: tuple[float, float, float, float]
    spatial_res: tuple[float, float]
    variables: list[VariableSpec] = Field(min_length=1)
    sources: list[SourceSpec] = Field(min_length=1)
    metadata: dict[str, Any] = {}

    @field_validator("spatial_ref")
    @classmethod
    def _check_crs(cls, value: str) -> str:
        return SourceSpec._check_crs(value)

    @field_validator("spatial_bbox")
    @classmethod
    def _check_bbox(cls, value: tuple[float, float, float, float]) -> tuple:
        return _check_bounds(value)

    @field_validator("spatial_res")
    @classmethod
    def _check_res(cls, value: tuple[float, float], info: ValidationInfo) -> tuple:
        if value[0] != value[1]:
            raise ValueError("must be two equal numbers (square cells)")
        bbox = info.data.get("spatial_bbox")
        problem = resolution_problem(value[0], bbox) if bbox else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> CubeSpec:
        _unique([s.id for s in self.sources], "sources", "id")
        _unique([v.name for v in self.variables], "variables", "name")
        sources = {s.id: s for s in self.sources}
        for variable in self.variables:
            source = sources.get(variable.source)
            if source is None:
                raise ValueError(
                    f"variable {variable.name!r}: unknown source {variable.source!r} "
                    f"(known: {', '.join(sources)})"
                )
            _check_recipe(variable, source)
        for source in self.sources:
            if source.standin is not None:
                _check_standin_files(source, self.variables_of(source.id))
        return self

    def source(self, source_id: str) -> SourceSpec:
        return next(s for s in self.sources if s.id == source_id)

    def variables_of(self, source_id: str) -> list[VariableSpec]:
        return [v for v in self.variables if v.source == source_id]

    def select_sources(self, variable_names: list[str] | None = None) -> list[SourceSpec]:
        """The sources needed for these variables (all when None), in spec order."""
        if not variable_names:
            return list(self.sources)
        known = {v.name: v for v in self.variables}
        unknown = [n for n in variable_names if n not in known]
        if unknown:
            raise SpecError(
                f"unknown variable(s) {', '.join(unknown)}; the spec has: {', '.join(known)}"
            )
        needed = {known[n].source for n in variable_names}
        return [s for s in self.sources if s.id in needed]

    @property
    def series(self) -> str:
        """The cube's name without its version: `polar-100m-1x2048x2048` for
        `polar-100m-1x2048x2048-v1.1.0.zarr` (every version of it shares the series)."""
        stem = self.data_id.removesuffix(".zarr")
        return stem.removesuffix(f"-v{self.version}")

    def at_version(self, version: str) -> CubeSpec:
        """This spec as published as `version`: `<series>-v<version>.zarr`."""
        return self.model_copy(
            update={"data_id": f"{self.series}-v{version}.zarr", "version": version}
        )

    def at_format(self, zarr_format: int = 2, shards: int | None = None) -> CubeSpec:
        """This spec written as zarr `zarr_format`: 2 (the default) is itself; 3 names its
        own series, `-zarr3-shards<N>` before `-v<version>` (`polar-3km-1x2048x2048-zarr3-
        shards4-v1.1.0.zarr`), so that the versions of a series never mix formats. A shard
        holds `shards` × `shards` inner chunks (default `DEFAULT_SHARDS`)."""
        if zarr_format == 2:
            if shards is not None:
                raise SpecError("--shards is for --zarr-format 3 only")
            return self
        if zarr_format != 3:
            raise SpecError(f"zarr format {zarr_format}: 2 or 3")
        shards = DEFAULT_SHARDS if shards is None else int(shards)
        if shards < 1:
            raise SpecError(f"--shards {shards}: at least 1")
        if zarr_layout(self.data_id) != (2, None):
            return self  # already a zarr 3 series
        data_id = f"{self.series}-zarr3-shards{shards}-v{self.version}.zarr"
        return self.model_copy(update={"data_id": data_id})

    @property
    def zarr_layout(self) -> tuple[int, int | None]:
        """(zarr format, shards) its cube is written in (`at_format`): (2, None) or (3, N)."""
        return zarr_layout(self.data_id)

    def at_resolution(self, resolution: float | None) -> CubeSpec:
        """This spec on a grid of `resolution` metres (None: its own), its `data_id` naming
        that resolution, so that cubes of different resolutions never share a name:
        `polar-100m-…` at 1000 m becomes `polar-1km-…` (a name without the spec's own
        resolution label gets `-1km` before `.zarr`)."""
        own = self.spatial_res[0]
        if resolution is None or float(resolution) == own:
            return self
        label, own_label = resolution_label(resolution), resolution_label(own)
        stem, dot, suffix = self.data_id.rpartition(".")
        if not dot:
            stem, suffix = self.data_id, ""
        parts = stem.split("-")
        if own_label in parts:
            parts[parts.index(own_label)] = label
        else:
            parts.append(label)
        data_id = "-".join(parts) + (f".{suffix}" if dot else "")
        return self.model_copy(
            update={"data_id": data_id, "spatial_res": (float(resolution), float(resolution))}
        )


# A zarr 3 cube's series ends in `-zarr3-shards<N>` (`CubeSpec.at_format`): every key of its
# versions (`<series>-vX.Y.Z.zarr`, `.levels/…`, `.inputs/…`) says so, and the code that
# reads or writes one follows the name (`zarr_layout`).
DEFAULT_SHARDS = 4
_ZARR3_NAME = re.compile(r"-zarr3-shards(\d+)-v[^/]*?\.(?:zarr|levels|inputs)(?=/|$)")


def zarr_layout(name: str | Path) -> tuple[int, int | None]:
    """(zarr format, shards) of a cube version's object named by `name` (its cube, levels,
    inputs or anything below them, a key, a path or a URL): (3, N) in a `-zarr3-shards<N>`
    series, else (2, None)."""
    found = _ZARR3_NAME.findall(str(name).rstrip("/"))
    return (3, int(found[-1])) if found else (2, None)


def resolution_label(metres: float) -> str:
    """How a cube name says its resolution: `100m`, `250m`, `1km`, `3km`, `1500m`."""
    if metres >= 1000 and float(metres) % 1000 == 0:
        return f"{float(metres) / 1000:g}km"
    return f"{float(metres):g}m"


def resolution_problem(resolution: float, bbox: tuple[float, float, float, float]) -> str | None:
    """Why `resolution` (metres) cannot be the grid's cell size over `bbox`, or None."""
    if not resolution > 0:
        return "must be a positive number of metres"
    xmin, ymin, xmax, ymax = bbox
    for axis, extent in (("x", xmax - xmin), ("y", ymax - ymin)):
        cells = extent / resolution
        if abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
            return (
                f"{resolution:g} m does not divide the bbox {axis} extent {extent:.0f} m into "
                f"whole cells{_fitting_resolutions(bbox)}"
            )
    return None


def _fitting_resolutions(bbox: tuple[float, float, float, float]) -> str:
    """A hint: whole-metre resolutions that divide both extents."""
    width, height = round(bbox[2] - bbox[0]), round(bbox[3] - bbox[1])
    common = math.gcd(width, height)
    fitting = [r for r in range(50, common + 1, 50) if common % r == 0][:12]
    return f" (these fit: {', '.join(map(str, fitting))} m)" if fitting else ""


def _unique(values: list[str], what: str, key: str) -> None:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{what}: duplicate {key} {', '.join(duplicates)}")


def _check_recipe(variable: VariableSpec, source: SourceSpec) -> None:
    where = f"variable {variable.name!r} (source {source.id!r}, {source.source_format})"
    if source.source_format == "polygons":
        if variable.classes is None or variable.source_variable is None:
            raise ValueError(f"{where}: polygons need 'source_variable' and 'classes'")
        if variable.resampling is not None:
            raise ValueError(f"{where}: polygons are rasterized, 'resampling' must be null")
        return
    if variable.resampling is None:
        raise ValueError(f"{where}: 'resampling' must be 'linear' or 'nearest'")
    if variable.classes is not None:
        raise ValueError(f"{where}: 'classes' only applies to polygon sources")
    if source.source_format == "latlon_netcdf" and variable.source_variable is None:
        raise ValueError(f"{where}: 'source_variable' names the netCDF variable to read")


def _check_standin_files(source: SourceSpec, variables: list[VariableSpec]) -> None:
    """The files a stand-in is made of (those its variables read) must be writable as such."""
    where = f"source {source.id!r} (standin)"
    files = sorted({f for v in variables for f in v.files_by_time.values()})
    if source.compression_format is None and files not in ([], [source.file_name]):
        raise ValueError(
            f"{where}: without an archive the variables read the download itself, "
            f"{source.file_name!r}, not {', '.join(map(repr, files))}"
        )
    if source.source_format == "polygons":
        for name in files:
            if not name.lower().endswith((".shp", ".geojson")):
                raise ValueError(f"{where}: {name!r}: polygon stand-ins are .shp or .geojson")
            if name.lower().endswith(".shp") and source.compression_format is None:
                raise ValueError(f"{where}: a shapefile comes with .shx and .dbf: use an archive")
    if source.source_format == "gmt_netcdf":
        for variable in variables:
            if variable.source_variable not in (None, "z"):
                raise ValueError(f"{where}: {variable.name}: a GMT grid stand-in holds only 'z'")
    if source.source_format == "geotiff":
        for variable in variables:
            band = variable.source_variable
            if band is not None and not (band.isdigit() and int(band) >= 1):
                raise ValueError(f"{where}: {variable.name}: a GeoTIFF band is a number >= 1")


def load_spec(path: str | Path) -> CubeSpec:
    """Read and validate cube.geojson; raise SpecError naming the file and each bad field."""
    path = Path(path)
    try:
        document = json.loads(read_input_file(path, "spec file", SpecError))
    except json.JSONDecodeError as error:
        raise SpecError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("type") != "Feature":
        raise SpecError(f"{path}: must be a GeoJSON Feature with the cube in 'properties'")
    properties = document.get("properties")
    try:
        return CubeSpec.model_validate(properties)
    except ValidationError as error:
        raise SpecError(f"{path}: invalid spec: {_describe(error, properties)}") from None


def _describe(error: ValidationError, properties: Any) -> str:
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"properties.{_field_path(problem['loc'], properties)}: {message}")
    return "; ".join(lines)


def _field_path(loc: tuple, properties: Any) -> str:
    """`variables.3.units` -> `variables[3:ice_thickness].units` (names help more than indexes)."""
    parts: list[str] = []
    node = properties
    for key in loc:
        if isinstance(key, int):
            label = str(key)
            try:
                node = node[key]
                name = node.get("id") or node.get("name") if isinstance(node, dict) else None
                label = f"{key}:{name}" if name else label
            except (IndexError, KeyError, TypeError):
                node = None
            parts[-1] = f"{parts[-1]}[{label}]" if parts else f"[{label}]"
            continue
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "(root)"
