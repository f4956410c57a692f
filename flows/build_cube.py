"""The parent flow: sources -> per-dataset chunks written straight into a new cube version
in the bucket -> merged (metadata), patched, verified, its metadata checked (CF-1.10 and
ACDD-1.3, no worse than the last published version's), reported -> published by pointing
`latest` at it; its artifacts tell the story (progress through every phase, then the
summary, coverage table and links: `flows/artifacts.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from polar_cube.compute import dask_cluster, shares_nothing
from polar_cube.cube import target as steps
from polar_cube.cube.summary import BuildProgress, DatasetOutcome, RunSummary, build_phases
from polar_cube.cube.versions import next_version, read_catalog
from polar_cube.errors import PolarCubeError
from polar_cube.flows.artifacts import create_result_artifacts, progress_span, start_progress
from polar_cube.flows.build_datasets import build_datasets, run_label
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.preflight import check_build, check_cube_format
from polar_cube.servers.viewer import DEFAULT_PORT as VIEWER_PORT
from polar_cube.servers.viewer_config import viewer_url
from polar_cube.sources.fetch import DEFAULT_CACHE_DIR
from polar_cube.storage import reaching_storage
from polar_cube.target_lock import TargetLock
from polar_cube.tasks.cube import (
    carry_unchanged,
    check_staged_metadata,
    commit_icechunk,
    deep_verify_staged_cube,
    merge_cube,
    patch_cube,
    publish_cube,
    record_chunks,
    report_cube,
    verify_staged_cube,
    write_stac,
)

DEFAULT_OUTPUT = Path("data/cube")


@dataclass(frozen=True)
class BuiltCube:
    url: str  # the version's cube
    version: str
    quicklooks: list[str]
    stac_item: str
    reused: bool  # `latest` already was this cube: nothing new was published
    icechunk: str | None = None  # with cube_format "icechunk": the repository's URL


def resolve_location(bucket_block: str | None, output_dir: str | None) -> StoreLocation:
    """The bucket of an S3Bucket block (access checked), else a local folder."""
    if not bucket_block:
        return StoreLocation.local(output_dir or DEFAULT_OUTPUT)
    from polar_cube.tasks.blocks import bucket_location

    return bucket_location(bucket_block)


def _run_name() -> str:
    params = flow_run.parameters
    target = params.get("bucket_block") or "local-folder"
    on_dask = "-on-dask" if params.get("dask_address") else ""
    label = run_label(
        params.get("spec_path"),
        params.get("resolution"),
        params.get("zarr_format"),
        params.get("shards"),
    )
    return f"cube-{label}-to-{target}{on_dask}"


@flow(name="build-cube", flow_run_name=_run_name, log_prints=True)
def build_cube(
    spec_path: str = "cube.geojson",
    only: list[str] | None = None,
    resolution: float | None = None,
    source_mirror: str | None = None,
    cache_dir: str | None = None,
    bucket_block: str | None = None,
    output_dir: str | None = None,
    patch_path: str = "patch.yaml",
    dask_address: str | None = None,
    zarr_format: int = 2,
    shards: int | None = None,
    cube_format: str = "zarr",
    deep_verify: bool = False,
) -> BuiltCube:
    """Build a new version of the cube (`<series>-vX.Y.Z.zarr`, see `cube/versions.py`):
    every per-dataset cube's chunks (with statistics and overview levels) written straight
    into it, merge (metadata), patch, verify, the metadata gate (`cube/compliance.py`),
    report, STAC item, then publish it by pointing `latest` at it. Unchanged since `latest`:
    nothing is written or published.

    `dask_address`: the chunked array work (resampling, writing the per-dataset cubes with
    their statistics and levels) runs on this dask.distributed scheduler (`tcp://host:port`),
    or on a LocalCluster sized for this machine with `local`; by default on threads in this
    process. With a bucket, the sources are staged into its `sources/`. A cluster given by
    address with a bucket shares nothing with this machine but the bucket: its workers read
    the staged sources and write the per-dataset cubes straight into `inputs/` (nothing to
    upload afterwards).

    `zarr_format` 3: the cube (and its levels) as zarr 3, in shards of `shards` × `shards`
    chunks (default 4), as its own series `<name>-zarr3-shards<N>` (`CubeSpec.at_format`):
    its versions never mix with the zarr 2 ones. Zarr 2 (the default) is what GDAL 3.6 reads.

    `cube_format` "icechunk" (with zarr 3): each new version is also committed to the
    series' Icechunk repository `<series>.icechunk`, its chunks by reference to the version's
    objects, and tagged `v<version>` (`cube/icechunk_repo.py`).

    Every chunk object's sha256 is recorded as it is written, in the version's manifest
    `<stem>.chunks.json` (`cube/integrity.py`). `deep_verify` (the scheduled deployment sets
    it): before publishing, every chunk object is read again and compared with it.
    """
    progress, progress_id = start_progress(
        run_label(spec_path, resolution, zarr_format, shards), build_phases(cube_format)
    )
    try:
        return _build(
            progress,
            progress_id,
            spec_path=spec_path,
            only=only,
            resolution=resolution,
            source_mirror=source_mirror,
            cache_dir=cache_dir,
            bucket_block=bucket_block,
            output_dir=output_dir,
            patch_path=patch_path,
            dask_address=dask_address,
            zarr_format=zarr_format,
            shards=shards,
            cube_format=cube_format,
            deep_verify=deep_verify,
        )
    except PolarCubeError as error:  # bad input or a broken environment: one clear line
        get_run_logger().error("polar-cube: error: %s", error)
        progress.failed(error)
        raise
    except BaseException as error:
        progress.failed(error)
        raise


def _build(
    progress: BuildProgress,
    progress_id: str | None,
    *,
    spec_path: str,
    only: list[str] | None,
    resolution: float | None,
    source_mirror: str | None,
    cache_dir: str | None,
    bucket_block: str | None,
    output_dir: str | None,
    patch_path: str,
    dask_address: str | None,
    zarr_format: int = 2,
    shards: int | None = None,
    cube_format: str = "zarr",
    deep_verify: bool = False,
) -> BuiltCube:
    """The body of `build_cube`, moving `progress` through its phases."""
    logger = get_run_logger()
    progress.start("check")
    # bad input fails here, before hours of work (the CLI checks the same before starting)
    # a deployment's run checks its folders too (parameters named as in the flow's signature)
    folders = {"cache_dir": cache_dir or DEFAULT_CACHE_DIR}
    if not bucket_block:
        folders["output_dir"] = output_dir or DEFAULT_OUTPUT
    checked = check_build(
        spec_path,
        resolution=resolution,
        only=only,
        patch_path=patch_path,
        folders=folders,
        cube_folder="output_dir",
    )
    check_cube_format(cube_format, zarr_format)
    spec, grid, patch = checked.spec.at_format(zarr_format, shards), checked.grid, checked.patch
    location = resolve_location(bucket_block, output_dir)
    # workers that cannot see this machine's disk read the sources from the bucket
    stage_sources = bool(bucket_block) and shares_nothing(dask_address)

    with (
        reaching_storage(location.root, location.storage_options),
        TargetLock(location),
        dask_cluster(dask_address) as address,
    ):
        catalog = read_catalog(location, spec.series)
        latest = catalog.latest_version
        # a new version (a killed build's is resumed: the same number, nothing was published)
        draft_spec = spec.at_version(next_version(catalog, spec.version))
        draft = VersionKeys(draft_spec.data_id)
        logger.info(
            "building %s into %s (latest: %s)",
            draft.stem,
            location.root,
            latest.cube if latest else "none published",
        )
        progress.start("datasets")
        built = build_datasets(
            spec=spec,
            grid=grid,
            only=only,
            source_mirror=source_mirror,
            cache_dir=cache_dir,
            dask_address=address,
            bucket_block=bucket_block,
            output_dir=None if bucket_block else str(Path(location.root)),
            version=draft.cube,
            latest=latest.cube if latest else None,
            stage_sources=stage_sources,
            progress=progress_span(progress, progress_id, "datasets", "per-dataset cubes"),
            **({"zarr_format": zarr_format, "shards": shards} if zarr_format != 2 else {}),
        )
        fingerprints = {item.source_id: item.fingerprint for item in built}
        # with --only, the other sources stay as `latest` has them
        others = [s.id for s in spec.sources if s.id not in fingerprints]
        kept = steps.sources_in(location, latest.keys, others) if latest and others else {}
        fingerprints |= kept
        current = steps.current_version(location, spec, grid, patch, fingerprints)
        metadata = None  # the metadata gate's report, when a new version is built
        drawing = None  # the report, drawn while the new version's checks run
        if current:
            logger.info("%s is already current; nothing to publish", location.url(current.cube))
            published = spec.at_version(current.version)
            for phase in ("carry", "merge", "patch", "verify", "metadata", "publish"):
                progress.skip(phase, "the latest version is already current")
        else:
            published = draft_spec
            carried = {b.source_id: VersionKeys(b.carried_from) for b in built if b.carried_from}
            carried |= {source_id: latest.keys for source_id in kept}
            if carried:
                progress.start("carry")
                carry_unchanged(location, spec, carried, draft)
            else:
                progress.skip("carry", "every source was written into this version")
            progress.start("merge")
            staged = merge_cube(location, published, grid, patch, address)
            progress.start("patch")
            patch_cube(location, published, staged, patch, patch_path)
            progress.start("verify")
            # the report (quicklooks drawn from the levels: seconds of one core) needs the
            # patched metadata only; it is drawn on a task-runner thread beside the checks
            drawing = report_cube.submit(location, published)
            try:
                verify_staged_cube(location, staged, published, grid)
                record_chunks(location, published)
                if deep_verify:
                    deep_verify_staged_cube(location, published, staged)
                progress.start("metadata")
                metadata = check_staged_metadata(location, staged, latest.cube if latest else None)
            finally:
                drawing.wait()  # a failed check fails the build once the drawing is done
        progress.start("report")
        report = drawing.result() if drawing else report_cube(location, published)
        if current:  # a published version is never rewritten, its STAC item neither
            progress.skip("stac", "the latest version's STAC item is kept")
            stac_item = location.url(steps.stac_key(published))
        else:
            progress.start("stac")
            stac_item = write_stac(location, published, grid, report.quicklooks)
            progress.start("publish")
            publish_cube(location, published, staged, patch)
        icechunk = None
        if cube_format == "icechunk":  # after the catalog: a rerun commits what a kill missed
            progress.start("icechunk")
            icechunk = commit_icechunk(location, published)
    reused = current is not None
    progress.finish(f"{'reused' if reused else 'published'} {published.data_id}")
    summary = RunSummary(
        title=spec.title,
        cube_name=published.data_id,
        cube_url=location.url(published.data_id),
        resolution=grid.resolution,
        grid_shape=grid.shape,
        datasets=[
            DatasetOutcome(
                b.source_id,
                getattr(b, "downloaded", False),
                b.reused,
                getattr(b, "source_sha256", ""),
                getattr(b, "replaced_sha256", None),
            )
            for b in built
        ],
        cube_reused=reused,
        stats=report.stats,
        long_names={v.name: v.long_name for v in spec.variables},
        timings=progress.timing_rows(),
        total_seconds=progress.finished,
        quicklooks_url=report.folder,
        quicklooks=report.quicklooks,
        thumbnails=report.thumbnails,
        report_reused=report.reused,
        levels_url=location.url(steps.levels_key(published)),
        stac_url=stac_item,
        viewer_url=viewer_url(
            f"http://127.0.0.1:{VIEWER_PORT}", published.data_id.removesuffix(".zarr")
        ),
        viewer_command=_view_command(bucket_block, output_dir, published.data_id),
        metadata=metadata,
    )
    create_result_artifacts(summary, report)
    return BuiltCube(
        url=location.url(published.data_id),
        version=published.version,
        quicklooks=report.quicklooks,
        stac_item=stac_item,
        reused=reused,
        icechunk=icechunk,
    )


def _view_command(bucket_block: str | None, output_dir: str | None, cube_name: str) -> str:
    where = (
        f"--bucket-block {bucket_block}"
        if bucket_block
        else f"--cube-dir {output_dir or DEFAULT_OUTPUT}"
    )
    return f"polar-cube view {where} --cube-id {cube_name}"
