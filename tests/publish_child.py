"""A child process for tests/test_publish_kill.py: builds and publishes the next version of
a small three-source cube into a store, through the library's own steps (no Prefect), as
`build-cube` composes them. Run: `python -m tests.publish_child '<json>'` with the json
{"root", "storage_options", "shift"}; `shift` moves every value (another content, another
version). It prints `DRAFT <version>` when it starts writing, `PUBLISHING` just before the
publish, `PUBLISHED <version>` or `CURRENT <version>`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from polar_cube.cube import target as steps
from polar_cube.cube.patching import load_patch
from polar_cube.cube.versions import next_version, read_catalog
from polar_cube.dataset import InVersion, write_dataset
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.spec import load_spec
from polar_cube.zarr_store import FINGERPRINT_ATTR, add_grid_coords

REPO = Path(__file__).resolve().parents[1]
FULL_SPEC = load_spec(REPO / "cube.geojson")
SOURCES = ("magnetic_anomaly", "curie_depth_200km", "subglacial_lakes_thwaites")
SPEC = FULL_SPEC.model_copy(
    update={
        "sources": [FULL_SPEC.source(s) for s in SOURCES],
        "variables": [v for v in FULL_SPEC.variables if v.source in SOURCES],
    }
).at_resolution(3000)
GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 3000, 256)  # 651 x 707: 3 x 3 chunks
TIMES = pd.DatetimeIndex(sorted(FULL_SPEC.variables_of(SOURCES[2])[0].source_files_by_time))


def layer(name: str, shift: int, step: int = 0) -> np.ndarray:
    """Deterministic float32 values of variable `name` in the version made with `shift`."""
    ny, nx = GRID.shape
    rows, columns = np.mgrid[0:ny, 0:nx]
    values = (shift * 1000.0 + len(name) + step + rows * 0.5 - columns * 0.25).astype("float32")
    values[:10, :20] = np.nan
    return values


def expected(name: str, shift: int) -> np.ndarray:
    variable = next(v for v in SPEC.variables if v.name == name)
    if variable.dims[0] == "time":
        return np.stack([layer(name, shift, s) for s in range(len(TIMES))])
    return layer(name, shift)


def source_dataset(source_id: str, shift: int) -> xr.Dataset:
    variables = {}
    for variable in SPEC.variables_of(source_id):
        attrs = {"units": variable.units, "long_name": variable.long_name, **variable.attrs}
        attrs["source_sha256"] = f"{source_id}-{shift}"
        variables[variable.name] = (variable.dims, expected(variable.name, shift), attrs)
    timed = any(v.dims[0] == "time" for v in SPEC.variables_of(source_id))
    dataset = add_grid_coords(xr.Dataset(variables, coords={"time": TIMES} if timed else {}), GRID)
    dataset.attrs = {
        "source": f"https://example.org/{source_id}",
        "polar_cube_source_id": source_id,
        FINGERPRINT_ATTR: f"{source_id}-shift-{shift}",
    }
    return dataset


def build_and_publish(location: StoreLocation, shift: int, patch_path: Path) -> str:
    patch = load_patch(patch_path)
    fingerprints = {s: f"{s}-shift-{shift}" for s in SOURCES}
    current = steps.current_version(location, SPEC, GRID, patch, fingerprints)
    if current:
        print(f"CURRENT {current.version}", flush=True)
        return current.version
    draft = SPEC.at_version(next_version(read_catalog(location, SPEC.series), SPEC.version))
    print(f"DRAFT {draft.version}", flush=True)
    keys = VersionKeys(draft.data_id)
    for source_id in SOURCES:
        write_dataset(source_dataset(source_id, shift), InVersion(location, keys, source_id), GRID)
    staged = steps.stage_merged_cube(location, draft, GRID, patch)
    steps.patch_staged_cube(location, staged, patch, patch_path)
    print("PUBLISHING", flush=True)
    steps.publish_staged_cube(location, draft, staged, patch)
    print(f"PUBLISHED {draft.version}", flush=True)
    return draft.version


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    where = StoreLocation(request["root"], request.get("storage_options") or {})
    build_and_publish(where, int(request["shift"]), Path(request["patch"]))
