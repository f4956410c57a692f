"""Flow: every source the cube needs becomes its own per-dataset cube on the cube's grid."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from polar_cube.dataset import BuiltDataset, dataset_fingerprint, dataset_path
from polar_cube.fetch import default_cache_dir
from polar_cube.grid import TargetGrid
from polar_cube.spec import load_spec
from polar_cube.zarr_store import stored_fingerprint
from tasks.datasets import convert_source, resample_source, write_dataset
from tasks.download import download_source

DEFAULT_STORE = Path("data/datasets")


def _run_name() -> str:
    params = flow_run.parameters
    resolution = params.get("resolution")
    only = params.get("only")
    name = f"datasets-{Path(params.get('spec_path') or 'cube.geojson').stem}"
    name += f"-{resolution:g}m" if resolution else ""
    return name + (f"-only-{'-'.join(only)}" if only else "")


@flow(name="build-datasets", flow_run_name=_run_name, log_prints=True)
def build_datasets(
    spec_path: str = "cube.geojson",
    only: list[str] | None = None,
    resolution: float | None = None,
    source_mirror: str | None = None,
    cache_dir: str | None = None,
    store_dir: str | None = None,
) -> list[BuiltDataset]:
    """Download every needed source at once, then build the per-dataset cubes one by one
    (one at a time keeps memory bounded; each write is parallel over chunks)."""
    logger = get_run_logger()
    spec = load_spec(spec_path)
    grid = TargetGrid.from_spec(spec, resolution)
    store = Path(store_dir) if store_dir else DEFAULT_STORE
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    sources = spec.select_sources(only)
    logger.info(
        "%s: %d source(s) -> %s at %g m (cache %s)",
        spec.data_id,
        len(sources),
        store,
        grid.resolution,
        cache,
    )
    downloads = [download_source.submit(s, cache, source_mirror) for s in sources]
    built = []
    for download in downloads:
        fetched = download.result()
        target = dataset_path(store, fetched.source.id)
        names = [v.name for v in spec.variables_of(fetched.source.id)]
        if stored_fingerprint(target) == dataset_fingerprint(spec, fetched, grid):
            logger.info("%s is up to date; reusing it", target)
            built.append(BuiltDataset(fetched.source.id, target, names, reused=True))
            continue
        converted = convert_source(spec, fetched)
        dataset = resample_source(spec, fetched, converted, grid)
        write_dataset(dataset, target, grid)
        built.append(BuiltDataset(fetched.source.id, target, names, reused=False))
    return built
