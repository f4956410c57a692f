"""Convert, resample and write one per-dataset cube."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import xarray as xr
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from polar_cube import dataset as ds
from polar_cube.compute import dask_compute
from polar_cube.errors import writing_to
from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.sources.staging import stage_source
from polar_cube.spec import CubeSpec
from polar_cube.tasks.retry import retry_if_transient
from polar_cube.zarr_store import levels_path


@task(
    task_run_name="stage-{fetched.source.id}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def stage_source_in_bucket(fetched: ds.FetchedSource, location: StoreLocation) -> ds.FetchedSource:
    """Copy the source's files into `<root>/sources/<id>/` (unless there already); the
    returned source's layers will read from there."""
    started = time.monotonic()
    with writing_to(location.url("sources", fetched.source.id)):
        staged = stage_source(fetched, location)
    get_run_logger().info(
        "%s: %d file(s), %.1f MB %s in %.1f s",
        staged.location.root,
        staged.files,
        staged.bytes / 1e6,
        "already there, skipped" if staged.skipped else "staged and checked",
        time.monotonic() - started,
    )
    return dataclasses.replace(fetched, staged=staged.location)


@task(task_run_name="convert-{fetched.source.id}", cache_policy=NO_CACHE)
def convert_source(spec: CubeSpec, fetched: ds.FetchedSource) -> list[ds.ConvertedVariable]:
    converted = ds.convert_source(spec, fetched)
    for item in converted:
        first = next(iter(item.layers.values()))
        get_run_logger().info("%s: %s", item.variable.name, first.description)
    return converted


@task(task_run_name="resample-{fetched.source.id}", cache_policy=NO_CACHE)
def resample_source(
    spec: CubeSpec,
    fetched: ds.FetchedSource,
    converted: list[ds.ConvertedVariable],
    grid: TargetGrid,
) -> xr.Dataset:
    """Plan the chunked resampling (lazy: the work runs while writing)."""
    dataset = ds.resample_layers(converted, grid)
    get_run_logger().info(
        "planned %s on a %dx%d grid at %g m (%d chunks per layer)",
        ", ".join(dataset.data_vars),
        grid.width,
        grid.height,
        grid.resolution,
        len(grid.chunks()[0]) * len(grid.chunks()[1]),
    )
    return ds.describe_dataset(dataset, spec, fetched, converted, grid)


def _write_run_name() -> str:
    target = task_run.parameters["target"]
    if isinstance(target, Path):
        return f"write-{target.name}"
    return f"write-{target.source_id}"


@task(
    task_run_name=_write_run_name,
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_if_transient,
)
def write_dataset(
    dataset: xr.Dataset,
    target: Path | ds.InVersion,
    grid: TargetGrid,
    dask_address: str | None = None,
) -> None:
    """The chunked work happens here (on the dask cluster at `dask_address`, if given): one
    pass writes the cube, its statistics and its overview levels, into a local folder or
    straight into a version being built (`target` an `InVersion`: its chunks are PUT as the
    resampling produces them)."""
    started = time.monotonic()
    where = str(target) if isinstance(target, Path) else target.url
    with writing_to(where), dask_compute(dask_address):
        ds.write_dataset(dataset, target, grid)
    if isinstance(target, ds.InVersion):
        get_run_logger().info(
            "wrote %s's chunks into %s and its levels in %.1f s",
            target.source_id,
            target.url,
            time.monotonic() - started,
        )
        return
    levels = levels_path(target)
    get_run_logger().info(
        "wrote %s (%.1f MB) and %s (%.1f MB) in %.1f s",
        target,
        _size(target) / 1e6,
        levels.name,
        _size(levels) / 1e6,
        time.monotonic() - started,
    )


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
