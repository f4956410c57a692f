"""Phase 3–4 as plain steps: stage the merged cube, patch it, publish it, report on it.

Everything happens under a `StoreLocation` (a local folder or an s3:// prefix):

    <root>/inputs/<source id>.zarr       per-dataset cubes (uploaded)
    <root>/inputs/<source id>.levels/    their overview levels (xcube's multi-level layout)
    <root>/.staging/<data_id>.<hash>     the merged cube while it is built and patched
    <root>/.staging/<stem>.levels.<hash> its merged overview levels
    <root>/.staging/<…>.chunk-sources.json  on S3: the inputs' chunks each of them publishes
    <root>/<data_id>                     the published cube
    <root>/<stem>.levels/                its overview levels; `0.link` points at the cube
    <root>/<stem>.quicklooks/            one PNG per variable, stats.json, summary.md
    <root>/<stem>.stac-item.json         a STAC item describing the cube
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import xarray as xr
import zarr

from polar_cube.cube.merge import (
    copy_merged_cube,
    copy_merged_levels,
    cube_fingerprint,
    open_inputs,
    read_levels_record,
)
from polar_cube.cube.patching import PATCH_ATTR, apply_patch, patch_digest, patch_metadata
from polar_cube.cube.publish import (
    chunk_sources_key,
    publish,
    remove_stale_staging,
    staging_key,
    withdraw,
)
from polar_cube.cube.verify import CubeCheckError
from polar_cube.grid import TargetGrid
from polar_cube.levels import FINGERPRINT_KEY, ZLEVELS, level_name, levels_name
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec
from polar_cube.zarr_store import FINGERPRINT_ATTR, stored_attrs


@dataclass(frozen=True)
class StagedCube:
    key: str
    fingerprint: str
    reused: bool  # an identical staged cube (and levels) from an interrupted run was found
    levels_key: str  # its overview levels, staged next to it


@dataclass(frozen=True)
class PublishedCube:
    url: str
    key: str
    fingerprint: str
    quicklooks_url: str
    reused: bool  # the published cube was already current; nothing was rewritten


def quicklooks_key(spec: CubeSpec) -> str:
    return f"{spec.data_id.removesuffix('.zarr')}.quicklooks"


def levels_key(spec: CubeSpec) -> str:
    """The published overview levels: `<stem>.levels` next to the cube."""
    return levels_name(spec.data_id)


def stac_key(spec: CubeSpec) -> str:
    return f"{spec.data_id.removesuffix('.zarr')}.stac-item.json"


def zarr_attrs(location: StoreLocation, key: str) -> dict:
    """Global attributes of a complete (consolidated) cube at `key`; {} when there is none."""
    path = location.path(key, ".zmetadata")
    return stored_attrs(location.fs.cat_file(path) if location.fs.exists(path) else None)


def open_cube(location: StoreLocation, key: str) -> xr.Dataset:
    return xr.open_zarr(location.mapper(key), consolidated=True, chunks={})


def open_overviews(location: StoreLocation, key: str) -> list[xr.Dataset]:
    """Levels 1… of the complete overview levels at `key`, finest first, opened lazily ([]
    when the grid fits one tile and there is only level 0). CubeCheckError if incomplete."""
    record = read_levels_record(location, key)
    if not record:
        raise CubeCheckError(f"{location.url(key)}: no complete overview levels ({ZLEVELS})")
    return [
        xr.open_zarr(location.mapper(key, level_name(level)), consolidated=True, chunks={})
        for level in range(1, int(record.get("num_levels", 1)))
    ]


def current_fingerprint(location: StoreLocation, spec: CubeSpec, grid: TargetGrid) -> str:
    return cube_fingerprint(spec, grid, open_inputs(location, spec))


def levels_fingerprint(location: StoreLocation, key: str) -> str | None:
    """The inputs fingerprint of complete overview levels at `key` (None if incomplete)."""
    return read_levels_record(location, key).get(FINGERPRINT_KEY)


def is_published(location: StoreLocation, spec: CubeSpec, fingerprint: str, patch: dict) -> bool:
    """The published cube and its levels were built from these inputs, the cube carries
    this patch."""
    attrs = zarr_attrs(location, spec.data_id)
    return (
        attrs.get(FINGERPRINT_ATTR) == fingerprint
        and attrs.get(PATCH_ATTR) == patch_digest(patch)
        and levels_fingerprint(location, levels_key(spec)) == fingerprint
    )


def cube_is_current(location: StoreLocation, spec: CubeSpec, grid: TargetGrid, patch: dict) -> bool:
    """The published cube and its levels are what merging the current inputs and patching
    them with `patch` would make: nothing to merge or publish."""
    return is_published(location, spec, current_fingerprint(location, spec, grid), patch)


def stage_merged_cube(
    location: StoreLocation, spec: CubeSpec, grid: TargetGrid, patch: dict | None = None
) -> StagedCube:
    """Merge the inputs and their overview levels into staging names (reusing identical
    complete ones) by copying their stored chunk objects, never decoding them.

    `patch`: the patch the staged cube is about to get. A staged cube that an interrupted
    run patched with another one is merged again: a patch sets and deletes attributes, it
    cannot take back what an earlier patch set.
    """
    inputs = open_inputs(location, spec)
    fingerprint = cube_fingerprint(spec, grid, inputs)
    key = staging_key(spec.data_id, fingerprint)
    staged_levels = staging_key(levels_key(spec), fingerprint)
    remove_stale_staging(location, spec.data_id, keep=key)
    remove_stale_staging(location, levels_key(spec), keep=staged_levels)
    attrs = zarr_attrs(location, key)
    cube_reused = attrs.get(FINGERPRINT_ATTR) == fingerprint and (
        patch is None or attrs.get(PATCH_ATTR) in (None, patch_digest(patch))
    )
    if not cube_reused:
        if location.exists(key):
            location.fs.rm(location.path(key), recursive=True)  # an interrupted write
        copy_merged_cube(location, key, inputs, spec, grid)
        mark_complete(location, key, fingerprint)
    levels_reused = levels_fingerprint(location, staged_levels) == fingerprint
    if not levels_reused:
        if location.exists(staged_levels):
            location.fs.rm(location.path(staged_levels), recursive=True)
        copy_merged_levels(location, staged_levels, inputs, spec, grid, fingerprint)
    return StagedCube(key, fingerprint, cube_reused and levels_reused, staged_levels)


def mark_complete(location: StoreLocation, key: str, fingerprint: str) -> None:
    """Set the fingerprint attribute once every chunk is written: it marks a complete cube."""
    group = zarr.open_group(location.mapper(key), mode="r+", zarr_format=2)
    group.attrs[FINGERPRINT_ATTR] = fingerprint
    zarr.consolidate_metadata(location.mapper(key), zarr_format=2)


def patch_staged_cube(
    location: StoreLocation, staged: StagedCube, patch: dict, patch_path: str | Path
) -> bool:
    """Apply the patch unless this exact patch is already applied; True if applied now."""
    if zarr_attrs(location, staged.key).get(PATCH_ATTR) == patch_digest(patch):
        return False
    metadata = patch_metadata(patch, open_cube(location, staged.key), patch_path)
    apply_patch(location, staged.key, metadata)
    return True


def discard_staged_cube(location: StoreLocation, staged: StagedCube) -> None:
    """Remove a staged cube (and its levels) that failed its checks, so a rerun rebuilds it."""
    for staged_key in (staged.key, staged.levels_key):
        for key in (staged_key, chunk_sources_key(staged_key)):
            if location.exists(key):
                location.fs.rm(location.path(key), recursive=True)


def publish_staged_cube(location: StoreLocation, spec: CubeSpec, staged: StagedCube) -> str:
    """Publish the cube, then its levels. The old levels are withdrawn first, so they never
    pair with the new cube; until the new ones are complete the levels are not openable."""
    withdraw(location, levels_key(spec))
    url = publish(location, staged.key, spec.data_id)
    publish(location, staged.levels_key, levels_key(spec))
    return url


def save_report(location: StoreLocation, spec: CubeSpec, stats: list, summary: str) -> None:
    """stats.json and summary.md next to the quicklooks."""
    folder = quicklooks_key(spec)
    with location.fs.open(location.path(folder, "stats.json"), "w") as f:
        json.dump([asdict(s) for s in stats], f, indent=1)
    with location.fs.open(location.path(folder, "summary.md"), "w") as f:
        f.write(summary)
