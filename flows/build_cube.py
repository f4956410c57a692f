"""The parent flow: sources -> per-dataset cubes -> bucket -> one merged, patched,
verified cube published under the spec's data_id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from polar_cube.compute import dask_cluster, shares_nothing
from polar_cube.cube import target as steps
from polar_cube.flows.build_datasets import build_datasets, run_label
from polar_cube.location import StoreLocation
from polar_cube.preflight import check_build
from polar_cube.storage import reaching_storage
from polar_cube.target_lock import TargetLock
from polar_cube.tasks.cube import (
    merge_cube,
    patch_cube,
    publish_cube,
    report_cube,
    upload_dataset,
    verify_staged_cube,
    verify_stored_cube,
    write_stac,
)

DEFAULT_OUTPUT = Path("data/cube")


@dataclass(frozen=True)
class BuiltCube:
    url: str
    quicklooks: list[str]
    stac_item: str
    reused: bool


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
    label = run_label(params.get("spec_path"), params.get("resolution"))
    return f"cube-{label}-to-{target}{on_dask}"


@flow(name="build-cube", flow_run_name=_run_name, log_prints=True)
def build_cube(
    spec_path: str = "cube.geojson",
    only: list[str] | None = None,
    resolution: float | None = None,
    source_mirror: str | None = None,
    cache_dir: str | None = None,
    datasets_dir: str | None = None,
    bucket_block: str | None = None,
    output_dir: str | None = None,
    patch_path: str = "patch.yaml",
    dask_address: str | None = None,
) -> BuiltCube:
    """Build every per-dataset cube (with its statistics and overview levels), upload them,
    merge, patch, verify, publish (the cube and `<stem>.levels/`), report.

    `dask_address`: the chunked array work (resampling, writing the per-dataset cubes with
    their statistics and levels) runs on this dask.distributed scheduler (`tcp://host:port`),
    or on a LocalCluster sized for this machine with `local`; by default on threads in this
    process. With a bucket, the sources are staged into its `sources/`. A cluster given by
    address with a bucket shares nothing with this machine but the bucket: its workers read
    the staged sources and write the per-dataset cubes straight into `inputs/` (nothing to
    upload afterwards).
    """
    logger = get_run_logger()
    # bad input fails here, before hours of work (the CLI checks the same before starting)
    checked = check_build(spec_path, resolution=resolution, only=only, patch_path=patch_path)
    spec, grid, patch = checked.spec, checked.grid, checked.patch
    location = resolve_location(bucket_block, output_dir)
    logger.info("publishing %s to %s", spec.data_id, location.root)
    # workers that cannot see this machine's disk read sources from and write into the bucket
    write_into_bucket = bool(bucket_block) and shares_nothing(dask_address)

    with (
        reaching_storage(location.root, location.storage_options),
        TargetLock(location),
        dask_cluster(dask_address) as address,
    ):
        built = build_datasets(
            spec=spec,
            grid=grid,
            only=only,
            source_mirror=source_mirror,
            cache_dir=cache_dir,
            store_dir=datasets_dir,
            dask_address=address,
            bucket_block=bucket_block,  # the sources are staged into it
            write_into_bucket=write_into_bucket,
        )
        uploads = [
            upload_dataset.submit(Path(item.path), location) for item in built if not item.in_bucket
        ]
        for upload in uploads:
            upload.result()

        reused = steps.cube_is_current(location, spec, grid, patch)
        if reused:
            logger.info("%s is already current; nothing to rebuild", location.url(spec.data_id))
        else:
            staged = merge_cube(location, spec, grid, patch, address)
            patch_cube(location, spec, staged, patch, patch_path)
            verify_staged_cube(location, staged, spec, grid)
            publish_cube(location, spec, staged)
        verify_stored_cube(location, spec.data_id, spec, grid)
        quicklooks = report_cube(location, spec)
        stac_item = write_stac(location, spec, grid, quicklooks)
    return BuiltCube(
        url=location.url(spec.data_id), quicklooks=quicklooks, stac_item=stac_item, reused=reused
    )
