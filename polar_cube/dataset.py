"""From a downloaded source to its per-dataset cube: convert, resample, describe, write.

`convert_source` reads each variable's file(s) with the reader for the source format;
`resample_layers` puts them on the target grid; `describe_dataset` adds CF attributes and
provenance; `write_dataset` writes the zarr, its statistics and its overview levels
atomically. The flow `build-datasets` chains them as Prefect tasks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr
from pyproj import CRS, Transformer

from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.rasterize import PolygonLayer, rasterize_layer, read_polygons
from polar_cube.resample import resample_layer
from polar_cube.sources.fetch import FetchedSource
from polar_cube.sources.readers import SourceFormatError, SourceLayer, open_source
from polar_cube.spec import CubeSpec, VariableSpec, zarr_layout
from polar_cube.version import software_version
from polar_cube.zarr_store import (
    CF_CONVENTIONS,
    FINGERPRINT_ATTR,
    SplitTarget,
    add_grid_coords,
    chunks_part,
    sibling_levels,
    stored_fingerprint,
    stored_levels_fingerprint,
    write_zarr_atomically,
    write_zarr_split,
)

Layer = SourceLayer | PolygonLayer
# What a per-dataset cube holds besides its values; a cube written without them (by an
# earlier version) has another fingerprint, so it is rebuilt rather than reused.
OUTPUT_LAYOUT = (
    "zarr2-consolidated; blosc lz4 7; polar_cube_stats 1; levels 1 (2x2 mean/mode, 512 tile); "
    "CF-1.10 (float32 flag_values with NCZarr type hints, x/y/time axis, int32 time, "
    "latitude_of_projection_origin); ACDD-1.3 coverage_content_type"
)


def output_layout(spec: CubeSpec) -> str:
    """`OUTPUT_LAYOUT`, or for a zarr 3 series (`CubeSpec.at_format`) what it holds instead."""
    zarr_format, shards = zarr_layout(spec.data_id)
    if zarr_format == 2:
        return OUTPUT_LAYOUT
    return OUTPUT_LAYOUT.replace("zarr2-consolidated", f"zarr3-consolidated shards {shards}")


@dataclass(frozen=True)
class ConvertedVariable:
    """A variable's source layers, one per time step (`None` for a static variable)."""

    variable: VariableSpec
    layers: dict[dt.date | None, Layer]


def dataset_fingerprint(spec: CubeSpec, fetched: FetchedSource, grid: TargetGrid) -> str:
    """Hash of everything a per-dataset cube depends on: recipe, source bytes, grid, code."""
    recipe = {
        "source": fetched.source.model_dump(mode="json"),
        "variables": [v.model_dump(mode="json") for v in spec.variables_of(fetched.source.id)],
        "source_sha256": fetched.sha256,
        "grid": [grid.crs, list(grid.bbox), grid.resolution, grid.chunk_size],
        "software": software_version(),
        "layout": output_layout(spec),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def convert_source(spec: CubeSpec, fetched: FetchedSource) -> list[ConvertedVariable]:
    """Open every file the source's variables need, lazily, with the format's reader.

    A reader's SourceFormatError is re-raised naming the source and its URL in front of the
    file, e.g. `heat_flow (https://…/GHF.nc): /cache/…/GHF.nc is truncated: …`.
    """
    source = fetched.source
    converted = []
    for variable in spec.variables_of(source.id):
        layers: dict[dt.date | None, Layer] = {}
        for time, relative_path in variable.files_by_time.items():
            layers[time] = _read_layer(fetched, relative_path, variable)
            _check_overlap(layers[time], spec, f"{source.id} ({fetched.url})", relative_path)
        converted.append(ConvertedVariable(variable, layers))
    return converted


def _read_layer(fetched: FetchedSource, relative_path: str, variable: VariableSpec) -> Layer:
    source = fetched.source
    where = f"{source.id} ({fetched.url})"
    path = fetched.folder / relative_path
    if not path.is_file():
        raise SourceFormatError(
            f"{where}: variable {variable.name!r} needs {relative_path!r}, "
            f"which is not in {fetched.folder}"
        )
    try:
        if source.source_format == "polygons":
            return read_polygons(
                path,
                variable.source_variable,
                variable.classes,
                variable.background,
                source.source_crs,
            )
        remote = fetched.staged.child(relative_path) if fetched.staged else None
        return open_source(
            path, source.source_format, variable.source_variable, source.source_crs, remote
        )
    except SourceFormatError as error:
        raise SourceFormatError(f"{where}: {error}") from None


def layer_bounds(layer: Layer) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of a layer in its own CRS: grid cells' edges, or polygons'."""
    if isinstance(layer, PolygonLayer):
        return tuple(float(v) for v in layer.frame.total_bounds)
    edges = []
    for axis in ("x", "y"):
        centres = layer.data[axis].values
        half = abs(float(centres[-1] - centres[0])) / max(len(centres) - 1, 1) / 2
        edges.append((float(centres.min()) - half, float(centres.max()) + half))
    (xmin, xmax), (ymin, ymax) = edges
    return xmin, ymin, xmax, ymax


def _check_overlap(layer: Layer, spec: CubeSpec, where: str, relative_path: str) -> None:
    """A layer that misses the cube's region (properties.spatial_bbox) entirely is the wrong
    file, or in another CRS than its spec entry's `source_crs`: refused, not resampled into
    an empty variable. Polygons are already in the cube's CRS."""
    crs = spec.spatial_ref if isinstance(layer, PolygonLayer) else layer.crs
    region = Transformer.from_crs(spec.spatial_ref, crs, always_xy=True).transform_bounds(
        *spec.spatial_bbox, densify_pts=21
    )
    xmin, ymin, xmax, ymax = layer_bounds(layer)
    shifts = (0.0, -360.0, 360.0) if CRS(crs).is_geographic else (0.0,)  # 0…360 longitudes
    if (
        ymin < region[3]
        and ymax > region[1]
        and any(xmin + shift < region[2] and xmax + shift > region[0] for shift in shifts)
    ):
        return
    raise SourceFormatError(
        f"{where}: {relative_path}: its bounds x {xmin:.6g}…{xmax:.6g}, y {ymin:.6g}…{ymax:.6g} "
        f"({crs}) lie outside the cube's region x {region[0]:.6g}…{region[2]:.6g}, "
        f"y {region[1]:.6g}…{region[3]:.6g} (properties.spatial_bbox): the wrong file, or not "
        "in the spec's source_crs?"
    )


def resample_layers(converted: list[ConvertedVariable], grid: TargetGrid) -> xr.Dataset:
    """Lazy dataset of every variable on `grid`; time-stepped variables stacked on `time`."""
    arrays = {}
    for item in converted:
        steps = [_to_grid(layer, item.variable, grid) for layer in item.layers.values()]
        if item.variable.dims[0] == "time":
            times = pd.DatetimeIndex([pd.Timestamp(t) for t in item.layers])
            arrays[item.variable.name] = xr.concat(steps, dim=pd.Index(times, name="time"))
        else:
            arrays[item.variable.name] = steps[0]
    return xr.Dataset(arrays)


def _to_grid(layer: Layer, variable: VariableSpec, grid: TargetGrid) -> xr.DataArray:
    if isinstance(layer, PolygonLayer):
        return rasterize_layer(layer, grid)
    return resample_layer(layer, grid, variable.resampling, variable.valid_if)


def processing_steps(item: ConvertedVariable, grid: TargetGrid) -> list[str]:
    """Human-readable provenance, generated from the recipe (never typed by hand)."""
    variable = item.variable
    first = next(iter(item.layers.values()))
    steps = [first.description]
    if len(item.layers) > 1:
        steps.append(f"Stacked {len(item.layers)} files on time")
    if variable.valid_if:
        rules = " and ".join(str(c) for c in variable.valid_if)
        steps.append(f"Masked source values not satisfying {rules} (set to NaN)")
    if isinstance(first, PolygonLayer):
        classes = ", ".join(f"{name}={code}" for name, code in variable.classes.items())
        steps.append(
            f"Rasterized at cell centres onto {grid.resolution:g} m {grid.crs} "
            f"({classes}, none={variable.background:g})"
        )
    else:
        how = "bilinear interpolation" if variable.resampling == "linear" else "nearest neighbour"
        via = "" if first.crs == grid.crs else f" from {first.crs}"
        steps.append(f"Resampled{via} to {grid.resolution:g} m {grid.crs} by {how}")
    return steps


def describe_dataset(
    dataset: xr.Dataset,
    spec: CubeSpec,
    fetched: FetchedSource,
    converted: list[ConvertedVariable],
    grid: TargetGrid,
) -> xr.Dataset:
    """CF attributes and provenance for each variable and the dataset (CF 1.10: value-typed
    attributes such as `flag_values` get the variables' float32, see `add_grid_coords`)."""
    source = fetched.source
    for item in converted:
        variable = item.variable
        attrs = {
            "long_name": variable.long_name,
            "units": variable.units,
            "standard_name": variable.standard_name,
            "coverage_content_type": variable.coverage_content_type,
            "description": variable.description,
            "source": fetched.url,
            "source_file": sorted(set(variable.files_by_time.values())),
            "source_sha256": fetched.sha256,
            "original_name": variable.source_variable or "",
            "processing_steps": processing_steps(item, grid),
            "references": source.references,
            "acknowledgement": source.acknowledgement,
            "license": source.license,
            **variable.attrs,
        }
        dataset[variable.name].attrs = {k: v for k, v in attrs.items() if v is not None}
    dataset = add_grid_coords(dataset, grid)
    dataset.attrs = {
        "title": f"{spec.title}: {source.name}",
        "Conventions": CF_CONVENTIONS,
        "source": fetched.url,
        "history": f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ} built by {software_version()}",
        "polar_cube_source_id": source.id,
        "spatial_ref": grid.crs,
        "spatial_res": grid.resolution,
        FINGERPRINT_ATTR: dataset_fingerprint(spec, fetched, grid),
    }
    return dataset


@dataclass(frozen=True)
class InVersion:
    """A source's cube inside a cube version being built: its metadata (attributes,
    statistics, fingerprint) at `<stem>.inputs/<id>.zarr`, its chunks in the version's
    cube and levels, where they stay (`keys.VersionKeys`)."""

    location: StoreLocation
    keys: VersionKeys
    source_id: str

    @property
    def metadata(self) -> StoreLocation:
        return self.location.child(self.keys.input_key(self.source_id))

    @property
    def chunks(self) -> SplitTarget:
        return SplitTarget(
            self.location.child(self.keys.cube), self.location.child(self.keys.levels)
        )

    @property
    def url(self) -> str:
        return self.location.url(self.keys.cube)


@dataclass(frozen=True)
class BuiltDataset:
    source_id: str
    path: str  # a local folder (`--datasets-only`), or the version's cube it was written into
    variables: list[str]
    reused: bool
    fingerprint: str = ""
    carried_from: str | None = None  # unchanged: its chunks are in this earlier version


def dataset_path(store: Path, source_id: str) -> Path:
    return Path(store) / f"{source_id}.zarr"


def built_dataset(
    spec: CubeSpec,
    fetched: FetchedSource,
    target: Path | InVersion,
    grid: TargetGrid,
    *,
    reused: bool,
    carried_from: str | None = None,
) -> BuiltDataset:
    """What a build of `fetched` into `target` made (or found current and kept)."""
    source_id = fetched.source.id
    return BuiltDataset(
        source_id,
        target.url if isinstance(target, InVersion) else str(target),
        [v.name for v in spec.variables_of(source_id)],
        reused=reused,
        fingerprint=dataset_fingerprint(spec, fetched, grid),
        carried_from=carried_from,
    )


def dataset_is_current(
    target: Path | InVersion, spec: CubeSpec, fetched: FetchedSource, grid: TargetGrid
) -> bool:
    """A complete cube at `target` (a local folder, or a source's part of a version), and
    its levels, were built from exactly these inputs (in a version: with the digests of its
    chunks recorded): reuse them."""
    fingerprint = dataset_fingerprint(spec, fetched, grid)
    metadata = target.metadata if isinstance(target, InVersion) else StoreLocation.local(target)
    return (
        stored_fingerprint(metadata) == fingerprint
        and stored_levels_fingerprint(sibling_levels(metadata)) == fingerprint
        and (not isinstance(target, InVersion) or chunks_part(metadata).exists())
    )


def write_dataset(dataset: xr.Dataset, target: Path | InVersion, grid: TargetGrid) -> None:
    """The writing pass: the cube, its statistics and its `.levels`; into a local folder
    (swapped in whole), or straight into a version being built (its metadata markers last)."""
    if isinstance(target, InVersion):
        shards = zarr_layout(target.keys.cube)[1]  # a zarr 3 series' version: sharded
        write_zarr_split(dataset, target.metadata, target.chunks, grid.chunk_size, shards)
    else:
        write_zarr_atomically(dataset, target, grid.chunk_size)
