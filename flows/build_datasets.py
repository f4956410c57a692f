"""Flow: every source the cube needs becomes its own per-dataset cube on the cube's grid."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from polar_cube import dataset as ds
from polar_cube.compute import dask_cluster
from polar_cube.cube.summary import ProgressSpan, progress_text
from polar_cube.cube.upload import INPUTS_PREFIX
from polar_cube.flows.artifacts import DATASETS_PROGRESS_KEY, report_span
from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.sources.fetch import default_cache_dir, needed_files
from polar_cube.spec import CubeSpec, load_spec
from polar_cube.target_lock import TargetLock
from polar_cube.tasks.blocks import bucket_location
from polar_cube.tasks.datasets import (
    convert_source,
    resample_source,
    stage_source_in_bucket,
    write_dataset,
)
from polar_cube.tasks.download import download_source

DEFAULT_STORE = Path("data/datasets")


@dataclass(frozen=True)
class BuiltFromSource(ds.BuiltDataset):
    """A per-dataset cube, and whether this run downloaded its source (else the cache had it)."""

    downloaded: bool = False


def run_label(spec: CubeSpec | dict | str | None, resolution: float | None = None) -> str:
    """The cube's name at that resolution without `.zarr` (`polar-1km-…`): what the UI shows
    for a run (given the spec, its JSON as Prefect keeps a flow's parameters, or the path
    to it)."""
    try:
        if isinstance(spec, str | None):
            spec = load_spec(spec or "cube.geojson")
        if isinstance(spec, dict):
            spec = CubeSpec.model_validate(spec)
        return spec.at_resolution(resolution).data_id.removesuffix(".zarr")
    except Exception:  # the run itself reports a bad spec; the name must not fail first
        return "cube"


def _run_name() -> str:
    params = flow_run.parameters
    grid, only = params.get("grid"), params.get("only")
    resolution = grid.resolution if isinstance(grid, TargetGrid) else (grid or {}).get("resolution")
    name = f"datasets-{run_label(params.get('spec'), resolution)}"
    return name + (f"-only-{'-'.join(only)}" if only else "")


@flow(name="build-datasets", flow_run_name=_run_name, log_prints=True)
def build_datasets(
    spec: CubeSpec,
    grid: TargetGrid,
    only: list[str] | None = None,
    source_mirror: str | None = None,
    cache_dir: str | None = None,
    store_dir: str | None = None,
    dask_address: str | None = None,
    bucket_block: str | None = None,
    write_into_bucket: bool = False,
    progress: ProgressSpan | None = None,
) -> list[BuiltFromSource]:
    """Download every needed source at once, then build the per-dataset cubes one by one
    (one at a time keeps memory bounded; each write is parallel over chunks), on `grid`.

    With `bucket_block` every source is also staged into the bucket's `sources/<id>/`
    (alongside the builds, which read the local cache). With `write_into_bucket` too, for a
    cluster that shares nothing with this machine but the bucket, the workers read the
    staged sources and write each cube straight into `inputs/<id>.zarr` (the caller,
    `build-cube`, holds the bucket's lock): nothing they read or write is on this disk.
    `progress`: the part of the parent run's progress these cubes cover (`build-cube`'s
    progress artifact moves as each one is done).
    """
    logger = get_run_logger()
    store = Path(store_dir) if store_dir else DEFAULT_STORE
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    sources = spec.select_sources(only)
    staging = bucket_location(bucket_block) if bucket_block else None
    bucket = staging if write_into_bucket else None  # where the cubes go, if not `store`
    if write_into_bucket and not staging:
        raise ValueError("write_into_bucket needs a bucket_block")
    logger.info(
        "%s: %d source(s) -> %s at %g m (cache %s)",
        spec.data_id,
        len(sources),
        bucket.url(INPUTS_PREFIX) if bucket else store,
        grid.resolution,
        cache,
    )
    with (
        nullcontext() if bucket else TargetLock(StoreLocation.local(store)),
        dask_cluster(dask_address) as address,
    ):
        downloads = [
            download_source.submit(s, cache, source_mirror, needed_files(spec, s.id))
            for s in sources
        ]
        staged = [stage_source_in_bucket.submit(d, staging) for d in downloads] if staging else []
        total = len(downloads)
        cube_name = spec.at_resolution(grid.resolution).data_id
        mine = create_progress_artifact(
            progress=0.0,
            key=DATASETS_PROGRESS_KEY,
            description=_datasets_text(cube_name, 0, total),
        )
        built = []
        for download in staged if bucket else downloads:  # in the bucket: once staged
            built.append(_build_one(spec, download.result(), grid, store, address, bucket))
            done = len(built)
            text = _datasets_text(cube_name, done, total, built[-1].source_id)
            update_progress_artifact(mine, progress=100.0 * done / total, description=text)
            report_span(progress, done, total, built[-1].source_id)
        for stage in staged:
            stage.result()
    return built


def _datasets_text(cube_name: str, done: int, total: int, latest: str = "") -> str:
    percent = 100.0 * done / total if total else 100.0
    after = f" (latest: {latest})" if latest else ""
    return progress_text(percent, f"{cube_name}: {done} of {total} per-dataset cubes{after}")


def _build_one(
    spec: CubeSpec,
    fetched: ds.FetchedSource,
    grid: TargetGrid,
    store: Path,
    dask_address: str | None,
    bucket: StoreLocation | None,
) -> BuiltFromSource:
    """Convert, resample and write one source's cube unless an identical one exists (in the
    local store, or in the bucket's `inputs/`)."""
    source_id = fetched.source.id
    target = ds.dataset_target(source_id, store, bucket)
    if ds.dataset_is_current(target, spec, fetched, grid):
        kept = ds.built_dataset(spec, source_id, target, reused=True)
        get_run_logger().info("%s is up to date; reusing it", kept.path)
        return BuiltFromSource(**asdict(kept), downloaded=fetched.downloaded)
    converted = convert_source(spec, fetched)
    dataset = resample_source(spec, fetched, converted, grid)
    write_dataset(dataset, target, grid, dask_address)
    made = ds.built_dataset(spec, source_id, target, reused=False)
    return BuiltFromSource(**asdict(made), downloaded=fetched.downloaded)
