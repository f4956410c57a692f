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
from polar_cube.flows.artifacts import DATASETS_PROGRESS_KEY, report_span
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
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
    """A per-dataset cube, and whether this run downloaded its source (else the cache had it);
    when new bytes at the same URL replaced the cached copy, both checksums."""

    downloaded: bool = False
    source_sha256: str = ""
    replaced_sha256: str | None = None


def run_label(
    spec: CubeSpec | dict | str | None,
    resolution: float | None = None,
    zarr_format: int | None = 2,
    shards: int | None = None,
) -> str:
    """The cube's name at that resolution without `.zarr` (`polar-1km-…`; zarr 3:
    `polar-1km-…-zarr3-shards4-…`): what the UI shows for a run (given the spec, its JSON as
    Prefect keeps a flow's parameters, or the path to it)."""
    try:
        if isinstance(spec, str | None):
            spec = load_spec(spec or "cube.geojson")
        if isinstance(spec, dict):
            spec = CubeSpec.model_validate(spec)
        spec = spec.at_resolution(resolution)
        if zarr_format and zarr_format != 2:
            spec = spec.at_format(zarr_format, shards)
        return spec.data_id.removesuffix(".zarr")
    except Exception:  # the run itself reports a bad spec; the name must not fail first
        return "cube"


def _run_name() -> str:
    params = flow_run.parameters
    grid, only = params.get("grid"), params.get("only")
    resolution = grid.resolution if isinstance(grid, TargetGrid) else (grid or {}).get("resolution")
    label = run_label(
        params.get("spec"), resolution, params.get("zarr_format"), params.get("shards")
    )
    name = f"datasets-{label}"
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
    output_dir: str | None = None,
    version: str | None = None,
    latest: str | None = None,
    stage_sources: bool = False,
    progress: ProgressSpan | None = None,
    zarr_format: int = 2,
    shards: int | None = None,
) -> list[BuiltFromSource]:
    """Download every needed source at once, then build the per-dataset cubes one by one
    (one at a time keeps memory bounded; each write is parallel over chunks), on `grid`.

    `version` (a cube name `<series>-vX.Y.Z.zarr`): each source's chunks are written straight
    into that version in the bucket of `bucket_block` (else the folder `output_dir`) as the
    resampling produces them, its metadata into `<stem>.inputs/` (the caller, `build-cube`,
    holds the target's lock); a source whose cube in the version `latest` was built from
    the same inputs is not built again (`carried_from`: `build-cube` copies it or finds the
    whole cube current). Without `version` (`--datasets-only`), into `store_dir`.
    `stage_sources`: stage every source into the bucket's `sources/<id>/` first and read it
    from there (for a cluster that shares nothing with this machine but the bucket).
    `progress`: the part of the parent run's progress these cubes cover.
    `zarr_format` 3 (with `version`): zarr 3 in shards of `shards` × `shards` chunks, the
    spec's zarr 3 series (`CubeSpec.at_format`; a spec already naming one is kept).
    """
    spec = spec.at_format(zarr_format, shards) if zarr_format != 2 else spec
    if zarr_format != 2 and not version:
        raise ValueError("zarr_format 3 is for a cube version, not --datasets-only")
    logger = get_run_logger()
    store = Path(store_dir) if store_dir else DEFAULT_STORE
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    sources = spec.select_sources(only)
    target = _target_location(bucket_block, output_dir) if version else None
    staging = bucket_location(bucket_block) if stage_sources and bucket_block else None
    if stage_sources and not staging:
        raise ValueError("stage_sources needs a bucket_block")
    logger.info(
        "%s: %d source(s) -> %s at %g m (cache %s)",
        spec.data_id,
        len(sources),
        target.url(version) if target and version else store,
        grid.resolution,
        cache,
    )
    with (
        nullcontext() if target else TargetLock(StoreLocation.local(store)),
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
        for download in staged or downloads:  # with staging: once staged
            fetched = download.result()
            if target and version:
                into = ds.InVersion(target, VersionKeys(version), fetched.source.id)
                earlier = (
                    ds.InVersion(target, VersionKeys(latest), fetched.source.id) if latest else None
                )
            else:
                into, earlier = ds.dataset_path(store, fetched.source.id), None
            built.append(_build_one(spec, fetched, grid, into, earlier, address))
            done = len(built)
            text = _datasets_text(cube_name, done, total, built[-1].source_id)
            update_progress_artifact(mine, progress=100.0 * done / total, description=text)
            report_span(progress, done, total, built[-1].source_id)
    return built


def _target_location(bucket_block: str | None, output_dir: str | None) -> StoreLocation:
    if bucket_block:
        return bucket_location(bucket_block)
    if not output_dir:
        raise ValueError("a version is built into a bucket_block or an output_dir")
    return StoreLocation.local(output_dir)


def _datasets_text(cube_name: str, done: int, total: int, latest: str = "") -> str:
    percent = 100.0 * done / total if total else 100.0
    after = f" (latest: {latest})" if latest else ""
    return progress_text(percent, f"{cube_name}: {done} of {total} per-dataset cubes{after}")


def _provenance(fetched: ds.FetchedSource) -> dict:
    return {
        "downloaded": fetched.downloaded,
        "source_sha256": fetched.sha256,
        "replaced_sha256": fetched.replaced_sha256,
    }


def _build_one(
    spec: CubeSpec,
    fetched: ds.FetchedSource,
    grid: TargetGrid,
    into: Path | ds.InVersion,
    earlier: ds.InVersion | None,
    dask_address: str | None,
) -> BuiltFromSource:
    """Convert, resample and write one source's cube unless an identical one exists: in
    `into` (an interrupted run's) or in the `earlier` version (then it is carried over)."""
    if ds.dataset_is_current(into, spec, fetched, grid):
        kept = ds.built_dataset(spec, fetched, into, grid, reused=True)
        get_run_logger().info("%s: %s is up to date; reusing it", fetched.source.id, kept.path)
        return BuiltFromSource(**asdict(kept), **_provenance(fetched))
    if earlier and ds.dataset_is_current(earlier, spec, fetched, grid):
        kept = ds.built_dataset(
            spec, fetched, into, grid, reused=True, carried_from=earlier.keys.cube
        )
        get_run_logger().info("%s: unchanged since %s", fetched.source.id, earlier.keys.stem)
        return BuiltFromSource(**asdict(kept), **_provenance(fetched))
    converted = convert_source(spec, fetched)
    dataset = resample_source(spec, fetched, converted, grid)
    write_dataset(dataset, into, grid, dask_address)
    made = ds.built_dataset(spec, fetched, into, grid, reused=False)
    return BuiltFromSource(**asdict(made), **_provenance(fetched))
