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
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pyproj import CRS
from pyproj.exceptions import CRSError

SourceFormat = Literal["gmt_netcdf", "geotiff", "latlon_netcdf", "polygons"]
ResamplingMethod = Literal["linear", "nearest"]

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "!=": operator.ne,
}
_CONDITION = re.compile(r"^\s*(>=|<=|>|<|!=)\s*([-+]?\d+(\.\d*)?([eE][-+]?\d+)?)\s*$")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecError(ValueError):
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

    @property
    def file_name(self) -> str:
        """The downloaded file's name: the last segment of the URL or path."""
        return re.split(r"[/\\]", self.download_url.split("?")[0].rstrip("/"))[-1]


class VariableSpec(_Strict):
    """One cube variable and the recipe that makes it from its source."""

    name: str
    long_name: str
    standard_name: str | None = None
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
        xmin, ymin, xmax, ymax = value
        if not (xmin < xmax and ymin < ymax):
            raise ValueError("must be [xmin, ymin, xmax, ymax] with min < max")
        return value

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


def load_spec(path: str | Path) -> CubeSpec:
    """Read and validate cube.geojson; raise SpecError naming the file and each bad field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
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
                name = node.get("name") or node.get("id") if isinstance(node, dict) else None
                label = f"{key}:{name}" if name else label
            except (IndexError, KeyError, TypeError):
                node = None
            parts[-1] = f"{parts[-1]}[{label}]" if parts else f"[{label}]"
            continue
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "(root)"
