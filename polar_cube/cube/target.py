"""Phase 3–4 as plain steps: merge a version's cube, patch it, check it, publish it, report.

Everything happens under a `StoreLocation` (a local folder or an s3:// prefix); a build
writes one new version (`keys.VersionKeys`, e.g. `polar-100m-1x2048x2048-v1.1.1`):

    <root>/<stem>.zarr                 the cube: chunks written by the sources' builds
    <root>/<stem>.levels/              its overview levels; `0.link` points at the cube
    <root>/<stem>.inputs/<id>.zarr     each source's metadata (no chunks)
    <root>/<stem>.quicklooks/          one PNG per variable, stats.json, summary.md
    <root>/<stem>.stac-item.json       a STAC item describing the cube
    <root>/<series>.versions.json      the published versions and `latest` (`versions.py`)

The merge writes only metadata next to the chunks; publishing is one write of the catalog.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import xarray as xr
import zarr

from polar_cube.cube.integrity import write_manifest
from polar_cube.cube.merge import (
    consolidate,
    cube_fingerprint,
    input_fingerprints,
    open_inputs,
    read_levels_record,
    write_merged_cube,
    write_merged_levels,
)
from polar_cube.cube.patching import PATCH_ATTR, apply_patch, patch_digest, patch_metadata
from polar_cube.cube.verify import (
    CubeCheckError,
    check_store_layout,
    verify_cube,
    verify_levels,
)
from polar_cube.cube.versions import (
    PublishedVersion,
    latest_is_current,
    publish_version,
    read_catalog,
)
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.levels import FINGERPRINT_KEY, ZLEVELS, level_name
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec, zarr_layout
from polar_cube.zarr3_shards import ZARR_JSON
from polar_cube.zarr_store import (
    FINGERPRINT_ATTR,
    stored_attrs,
    stored_attrs_v3,
    stored_fingerprint,
)


@dataclass(frozen=True)
class StagedCube:
    """A version's cube and levels, merged (and then patched) but not yet published."""

    key: str
    fingerprint: str
    reused: bool  # complete from an interrupted run of the same build: nothing rewritten
    levels_key: str


def quicklooks_key(spec: CubeSpec) -> str:
    return VersionKeys(spec.data_id).quicklooks


def levels_key(spec: CubeSpec) -> str:
    """The overview levels: `<stem>.levels` next to the cube."""
    return VersionKeys(spec.data_id).levels


def stac_key(spec: CubeSpec) -> str:
    return VersionKeys(spec.data_id).stac_item


def zarr_attrs(location: StoreLocation, key: str) -> dict:
    """Global attributes of a complete (consolidated) cube at `key`; {} when there is none.
    (A zarr 3 series' cube, `spec.zarr_layout`: from its root `zarr.json`.)"""
    if zarr_layout(key)[0] == 3:
        path = location.path(key, ZARR_JSON)
        return stored_attrs_v3(location.fs.cat_file(path) if location.fs.exists(path) else None)
    path = location.path(key, ".zmetadata")
    return stored_attrs(location.fs.cat_file(path) if location.fs.exists(path) else None)


def completion_marker(key: str) -> str:
    """What marks the zarr at `key` complete, removed to unmark it: its consolidated
    metadata, `.zmetadata` (zarr 2) or the root `zarr.json` holding it (zarr 3)."""
    return ZARR_JSON if zarr_layout(key)[0] == 3 else ".zmetadata"


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


def levels_fingerprint(location: StoreLocation, key: str) -> str | None:
    """The inputs fingerprint of complete overview levels at `key` (None if incomplete)."""
    return read_levels_record(location, key).get(FINGERPRINT_KEY)


def current_version(
    location: StoreLocation,
    spec: CubeSpec,
    grid: TargetGrid,
    patch: dict,
    fingerprints: dict[str, str],
) -> PublishedVersion | None:
    """The published `latest` version, if it is exactly what merging these per-dataset
    cubes ({source id: fingerprint}) and patching them with `patch` would publish (and the
    spec does not ask for a newer version): nothing to merge or publish."""
    return latest_is_current(
        read_catalog(location, spec.series),
        cube_fingerprint(spec, grid, fingerprints),
        patch_digest(patch),
        spec.version,
    )


def sources_in(location: StoreLocation, keys: VersionKeys, source_ids: list[str]) -> dict:
    """{source id: fingerprint} of those of `source_ids` the version `keys` holds complete."""
    found = {}
    for source_id in source_ids:
        fingerprint = stored_fingerprint(location.child(keys.input_key(source_id)))
        if fingerprint:
            found[source_id] = fingerprint
    return found


def stage_merged_cube(
    location: StoreLocation, spec: CubeSpec, grid: TargetGrid, patch: dict | None = None
) -> StagedCube:
    """Merge the sources of the version `spec` names (`spec.at_version`) into its cube and
    levels: only metadata is written, next to the chunks their builds wrote. A cube and
    levels merged from the same inputs by an interrupted run are kept.

    `patch`: the patch the cube is about to get. A cube that an interrupted run patched
    with another one is merged again: a patch sets and deletes attributes, it cannot take
    back what an earlier patch set.
    """
    keys = VersionKeys(spec.data_id)
    inputs = open_inputs(location, spec, keys)
    fingerprint = cube_fingerprint(spec, grid, input_fingerprints(inputs))
    attrs = zarr_attrs(location, keys.cube)
    cube_reused = attrs.get(FINGERPRINT_ATTR) == fingerprint and (
        patch is None or attrs.get(PATCH_ATTR) in (None, patch_digest(patch))
    )
    if not cube_reused:
        _unmark(location, keys.cube, completion_marker(keys.cube))
        write_merged_cube(location, keys, inputs, spec, grid)
        mark_complete(location, keys.cube, fingerprint)
    levels_reused = levels_fingerprint(location, keys.levels) == fingerprint
    if not levels_reused:
        _unmark(location, keys.levels, ZLEVELS)
        write_merged_levels(location, keys, inputs, spec, grid, fingerprint)
    return StagedCube(keys.cube, fingerprint, cube_reused and levels_reused, keys.levels)


def _unmark(location: StoreLocation, key: str, marker: str) -> None:
    if location.exists(key, marker):
        location.fs.rm_file(location.path(key, marker))


def mark_complete(location: StoreLocation, key: str, fingerprint: str) -> None:
    """Set the fingerprint attribute once every chunk is written: it marks a complete cube."""
    group = zarr.open_group(location.mapper(key), mode="r+", zarr_format=zarr_layout(key)[0])
    group.attrs[FINGERPRINT_ATTR] = fingerprint
    consolidate(location, key)


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
    """Unmark a merged cube (and levels) that failed its checks, so a rerun merges it
    again; the chunks stay, they are the sources' (fingerprinted) builds."""
    _unmark(location, staged.key, completion_marker(staged.key))
    _unmark(location, staged.levels_key, ZLEVELS)


def publish_staged_cube(
    location: StoreLocation, spec: CubeSpec, staged: StagedCube, patch: dict
) -> PublishedVersion:
    """Publish the version: one write of the catalog points `latest` at it, right after its
    chunk manifest is (re)written from the sources' records (`cube.integrity`): the catalog
    never names a version without one, nor with a stale one."""
    write_manifest(location, VersionKeys(spec.data_id), [source.id for source in spec.sources])
    return publish_version(
        location,
        spec,
        staged.fingerprint,
        patch_digest(patch),
        [v.name for v in spec.variables],
    )


def save_report(location: StoreLocation, spec: CubeSpec, stats: list, summary: str) -> None:
    """stats.json and summary.md next to the quicklooks."""
    folder = quicklooks_key(spec)
    with location.fs.open(location.path(folder, "stats.json"), "w") as f:
        json.dump([asdict(s) for s in stats], f, indent=1)
    with location.fs.open(location.path(folder, "summary.md"), "w") as f:
        f.write(summary)


def check_cube_and_levels(
    location: StoreLocation, key: str, levels_key: str, spec: CubeSpec, grid: TargetGrid
) -> None:
    """The cube at `key` and its overview levels at `levels_key` against the spec and grid
    (metadata and coordinates only); CubeCheckError listing every problem."""
    where = location.url(key)
    zarr_format = zarr_layout(key)[0]  # a zarr 3 series' (`CubeSpec.at_format`)
    check_store_layout(location.mapper(key), where, zarr_format)
    verify_cube(open_cube(location, key), spec, grid, where)
    verify_levels(
        location.mapper(levels_key),
        spec,
        grid,
        location.url(levels_key),
        fingerprint=zarr_attrs(location, key).get(FINGERPRINT_ATTR),
        cube_name=spec.data_id,
        zarr_format=zarr_format,
    )
