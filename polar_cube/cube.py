"""Phase 3–4 as plain steps: stage the merged cube, patch it, publish it, report on it.

Everything happens under a `StoreLocation` (a local folder or an s3:// prefix):

    <root>/inputs/<source id>.zarr       per-dataset cubes (uploaded)
    <root>/.staging/<data_id>.<hash>     the merged cube while it is built and patched
    <root>/<data_id>                     the published cube
    <root>/<stem>.quicklooks/            one PNG per variable, stats.json, summary.md
    <root>/<stem>.stac-item.json         a STAC item describing the cube
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import xarray as xr
import zarr

from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.merge import copy_merged_cube, cube_fingerprint, open_inputs
from polar_cube.patching import PATCH_ATTR, apply_patch, patch_digest, patch_metadata
from polar_cube.publish import publish, remove_stale_staging, staging_key
from polar_cube.spec import CubeSpec
from polar_cube.zarr_store import FINGERPRINT_ATTR, stored_attrs


@dataclass(frozen=True)
class StagedCube:
    key: str
    fingerprint: str
    reused: bool  # an identical staged cube from an interrupted run was found


@dataclass(frozen=True)
class PublishedCube:
    url: str
    key: str
    fingerprint: str
    quicklooks_url: str
    reused: bool  # the published cube was already current; nothing was rewritten


def quicklooks_key(spec: CubeSpec) -> str:
    return f"{spec.data_id.removesuffix('.zarr')}.quicklooks"


def stac_key(spec: CubeSpec) -> str:
    return f"{spec.data_id.removesuffix('.zarr')}.stac-item.json"


def zarr_attrs(location: StoreLocation, key: str) -> dict:
    """Global attributes of a complete (consolidated) cube at `key`; {} when there is none."""
    path = location.path(key, ".zmetadata")
    return stored_attrs(location.fs.cat_file(path) if location.fs.exists(path) else None)


def open_cube(location: StoreLocation, key: str) -> xr.Dataset:
    return xr.open_zarr(location.mapper(key), consolidated=True, chunks={})


def current_fingerprint(location: StoreLocation, spec: CubeSpec, grid: TargetGrid) -> str:
    return cube_fingerprint(spec, grid, open_inputs(location, spec))


def is_published(location: StoreLocation, spec: CubeSpec, fingerprint: str, patch: dict) -> bool:
    """The published cube was built from these inputs and carries this patch."""
    attrs = zarr_attrs(location, spec.data_id)
    return attrs.get(FINGERPRINT_ATTR) == fingerprint and attrs.get(PATCH_ATTR) == patch_digest(
        patch
    )


def stage_merged_cube(location: StoreLocation, spec: CubeSpec, grid: TargetGrid) -> StagedCube:
    """Merge the inputs into the staging name (reusing an identical complete one) by copying
    their stored chunk objects, never decoding them."""
    inputs = open_inputs(location, spec)
    fingerprint = cube_fingerprint(spec, grid, inputs)
    key = staging_key(spec.data_id, fingerprint)
    remove_stale_staging(location, spec.data_id, keep=key)
    if zarr_attrs(location, key).get(FINGERPRINT_ATTR) == fingerprint:
        return StagedCube(key, fingerprint, reused=True)
    if location.exists(key):
        location.fs.rm(location.path(key), recursive=True)  # an interrupted write
    copy_merged_cube(location, key, inputs, spec, grid)
    mark_complete(location, key, fingerprint)
    return StagedCube(key, fingerprint, reused=False)


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
    """Remove a staged cube that failed its checks, so a rerun rebuilds it."""
    if location.exists(staged.key):
        location.fs.rm(location.path(staged.key), recursive=True)


def publish_staged_cube(location: StoreLocation, spec: CubeSpec, staged: StagedCube) -> str:
    return publish(location, staged.key, spec.data_id)


def save_report(location: StoreLocation, spec: CubeSpec, stats: list, summary: str) -> None:
    """stats.json and summary.md next to the quicklooks."""
    folder = quicklooks_key(spec)
    with location.fs.open(location.path(folder, "stats.json"), "w") as f:
        json.dump([asdict(s) for s in stats], f, indent=1)
    with location.fs.open(location.path(folder, "summary.md"), "w") as f:
        f.write(summary)
