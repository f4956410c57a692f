"""Carry, merge, patch, verify, check the metadata, publish and report: thin tasks over
`polar_cube.cube.target` (and `polar_cube.cube.compliance`).

The tasks create no artifacts: `build-cube` makes the run's artifacts from what they return,
in its own body, so that they belong to the parent flow run (`polar_cube.flows.artifacts`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from polar_cube.compute import dask_compute
from polar_cube.cube import target as steps
from polar_cube.cube.carry import carry_sources
from polar_cube.cube.compliance import MetadataGateError, MetadataReport, check_version, gate
from polar_cube.cube.icechunk_repo import commit_by_reference
from polar_cube.cube.integrity import DeepReport, deep_verify, refuse_damaged_draft, write_manifest
from polar_cube.cube.report import CubeReport, current_report
from polar_cube.cube.stac import cube_stac_item, write_stac_item
from polar_cube.cube.verify import (
    CubeCheckError,
)
from polar_cube.cube.versions import PublishedVersion
from polar_cube.errors import writing_to
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, icechunk_key
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec
from polar_cube.storage import reaching_storage
from polar_cube.tasks.retry import retry_if_transient


@contextmanager
def _writing(location: StoreLocation, url: str) -> Iterator[None]:
    """A full disk, a read-only folder or an unreachable bucket met inside, named by `url`."""
    with writing_to(url), reaching_storage(url, location.storage_options):
        yield


@task(
    task_run_name="carry-into-{into.stem}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def carry_unchanged(
    location: StoreLocation, spec: CubeSpec, origins: dict[str, VersionKeys], into: VersionKeys
) -> int:
    """Copy the unchanged sources' objects from the versions that have them (server-side)."""
    started = time.monotonic()
    with _writing(location, location.url(into.cube)):
        copied = carry_sources(location, spec, origins, into)
    get_run_logger().info(
        "%s: %d unchanged source(s) (%s), %d chunk objects copied in %.1f s",
        location.url(into.cube),
        len(origins),
        ", ".join(f"{s} from {k.stem}" for s, k in origins.items()),
        copied,
        time.monotonic() - started,
    )
    return copied


@task(
    task_run_name="merge-{spec.data_id}",
    retries=1,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def merge_cube(
    location: StoreLocation,
    spec: CubeSpec,
    grid: TargetGrid,
    patch: dict,
    dask_address: str | None = None,
) -> steps.StagedCube:
    """Merge the version's per-dataset cubes into its cube and overview levels (metadata)."""
    started = time.monotonic()
    with _writing(location, location.url(spec.data_id)), dask_compute(dask_address):
        staged = steps.stage_merged_cube(location, spec, grid, patch)
    get_run_logger().info(
        "%s and %s %s in %.1f s",
        location.url(staged.key),
        location.url(staged.levels_key),
        "reused (merged by an earlier run)" if staged.reused else "merged",
        time.monotonic() - started,
    )
    return staged


@task(
    task_run_name="patch-{spec.data_id}",
    retries=1,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def patch_cube(
    location: StoreLocation, spec: CubeSpec, staged: steps.StagedCube, patch: dict, patch_path: str
) -> bool:
    """Apply the patch file to the merged cube (once)."""
    with _writing(location, location.url(staged.key)):
        applied = steps.patch_staged_cube(location, staged, patch, patch_path)
    get_run_logger().info(
        "%s with %s", "patched" if applied else "already patched", Path(patch_path).name
    )
    return applied


@task(task_run_name="verify-{staged.key}", cache_policy=NO_CACHE)
def verify_staged_cube(
    location: StoreLocation, staged: steps.StagedCube, spec: CubeSpec, grid: TargetGrid
) -> None:
    """Check the merged cube and levels before they are published; failing ones are
    unmarked (merged again by the next run)."""
    try:
        steps.check_cube_and_levels(location, staged.key, staged.levels_key, spec, grid)
    except CubeCheckError:
        steps.discard_staged_cube(location, staged)
        raise
    get_run_logger().info(
        "%s and its levels match the spec (%d variables)",
        location.url(staged.key),
        len(spec.variables),
    )


@task(task_run_name="check-metadata-{staged.key}", cache_policy=NO_CACHE)
def check_staged_metadata(
    location: StoreLocation, staged: steps.StagedCube, baseline: str | None
) -> MetadataReport:
    """CF-1.10 and ACDD-1.3 on the new version, compared with the published `baseline`;
    worse metadata fails before publishing, the staged cube unmarked (merged again)."""
    started = time.monotonic()
    report = check_version(location, staged.key, baseline)
    try:
        gate(report)
    except MetadataGateError:
        steps.discard_staged_cube(location, staged)
        raise
    counts = report.counts()
    get_run_logger().info(
        "%s: CF-1.10 %d errors, %d warnings; ACDD-1.3 %d highly recommended, %d recommended "
        "missing; none new%s (%.1f s)",
        location.url(staged.key),
        counts[("cf:1.10", "error")],
        counts[("cf:1.10", "warning")],
        counts[("acdd:1.3", "highly recommended")],
        counts[("acdd:1.3", "recommended")],
        f" since {baseline}" if baseline else "",
        time.monotonic() - started,
    )
    return report


@task(task_run_name="record-chunks-{spec.data_id}", cache_policy=NO_CACHE)
def record_chunks(location: StoreLocation, spec: CubeSpec) -> int:
    """Combine the sources' chunk digests into the version's manifest `<stem>.chunks.json`."""
    keys = VersionKeys(spec.data_id)
    with _writing(location, location.url(keys.manifest)):
        count = write_manifest(location, keys, [source.id for source in spec.sources])
    get_run_logger().info("recorded %d chunk objects in %s", count, location.url(keys.manifest))
    return count


@task(task_run_name="deep-verify-{spec.data_id}", cache_policy=NO_CACHE)
def deep_verify_staged_cube(
    location: StoreLocation, spec: CubeSpec, staged: steps.StagedCube
) -> DeepReport:
    """Read every chunk object of the version again and compare it with its manifest before
    publishing it; a damaged or missing one fails the run, naming each."""
    started = time.monotonic()
    report = deep_verify(location, VersionKeys(spec.data_id))
    if report.problems:
        steps.discard_staged_cube(location, staged)
        raise refuse_damaged_draft(location, spec, report)
    get_run_logger().info(
        "deep-verified %d chunks of %d variables of %s in %.1f s",
        report.chunks,
        report.variables,
        location.url(staged.key),
        time.monotonic() - started,
    )
    return report


@task(
    task_run_name="publish-{spec.data_id}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def publish_cube(
    location: StoreLocation, spec: CubeSpec, staged: steps.StagedCube, patch: dict
) -> PublishedVersion:
    """Point `latest` at the new version: one write of the catalog."""
    started = time.monotonic()
    with _writing(location, location.url(spec.series)):
        published = steps.publish_staged_cube(location, spec, staged, patch)
    get_run_logger().info(
        "published %s as latest of %s in %.2f s",
        location.url(published.cube),
        spec.series,
        time.monotonic() - started,
    )
    return published


@task(
    task_run_name="commit-{spec.data_id}-to-icechunk",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def commit_icechunk(location: StoreLocation, spec: CubeSpec) -> str:
    """Commit the published version `spec` to the series' Icechunk repository, its chunks
    by reference, tagged `v<version>` (nothing to do if that tag exists). Returns its URL."""
    started = time.monotonic()
    repo_key, tag = icechunk_key(spec.series), f"v{spec.version}"
    with _writing(location, location.url(repo_key)):
        snapshot = commit_by_reference(
            location, repo_key, spec.data_id, tag, f"{spec.data_id}: {spec.title}"
        )
    logger = get_run_logger()
    if snapshot is None:
        logger.info("%s has %s already", location.url(repo_key), tag)
    else:
        logger.info(
            "committed %s to %s as %s (snapshot %s) in %.2f s",
            spec.data_id,
            location.url(repo_key),
            tag,
            snapshot,
            time.monotonic() - started,
        )
    return location.url(repo_key)


@task(task_run_name="report-{spec.data_id}", cache_policy=NO_CACHE)
def report_cube(location: StoreLocation, spec: CubeSpec) -> CubeReport:
    """Statistics, quicklooks and their thumbnails, saved next to the cube (reused when they
    already describe the published cube). The statistics come from the cube's metadata, the
    quicklooks from its overview levels."""
    folder = location.url(steps.quicklooks_key(spec))
    with _writing(location, folder):
        report = current_report(location, spec)
    get_run_logger().info(
        "%s %d quicklooks in %s",
        "kept" if report.reused else "wrote",
        len(report.quicklooks),
        folder,
    )
    return report


@task(task_run_name="stac-{spec.data_id}", cache_policy=NO_CACHE)
def write_stac(
    location: StoreLocation, spec: CubeSpec, grid: TargetGrid, quicklooks: list[str]
) -> str:
    """A validated STAC item for the version's cube, next to it."""
    cube = steps.open_cube(location, spec.data_id)
    item = cube_stac_item(cube, spec, grid, location.url(spec.data_id), quicklook_urls=quicklooks)
    with _writing(location, location.url(steps.stac_key(spec))):
        url = write_stac_item(item, location.url(steps.stac_key(spec)), location.storage_options)
    get_run_logger().info("wrote the STAC item %s (%d assets)", url, len(item["assets"]))
    return url
