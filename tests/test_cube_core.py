"""Merge, patch, publish (kill-safe), the reuse fingerprints and `StoreLocation` on a
local-folder store, as plain library calls: no Prefect, no download, no S3 server.

Three per-dataset cubes of a three-source subset of the repo spec (a static layer, another
static layer, four lake masks on two time steps) are written once by the library's own
writer on a 3 km grid (651 x 707 cells, 3 x 3 chunks, two levels) and uploaded into each
test's store. The kill-safety tests SIGKILL a real child process paused at each step of the
merge, the patch and the publish. The S3 variants are in the slow set (`test_s3.py`,
`test_cube_flow.py`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from polar_cube.cube import target as steps
from polar_cube.cube.merge import MergeError, input_key, input_levels_key
from polar_cube.cube.patching import PATCH_ATTR, PatchError, load_patch, patch_digest
from polar_cube.cube.publish import STAGING_PREFIX, withdraw
from polar_cube.cube.upload import remote_files, upload_cube
from polar_cube.cube.verify import check_store_layout, verify_cube, verify_levels
from polar_cube.dataset import (
    FetchedSource,
    dataset_fingerprint,
    dataset_is_current,
    write_dataset,
)
from polar_cube.grid import TargetGrid
from polar_cube.levels import ZLEVELS, level_name
from polar_cube.location import StoreLocation
from polar_cube.spec import load_spec
from polar_cube.zarr_store import (
    FINGERPRINT_ATTR,
    NCZARR_ATTR,
    add_grid_coords,
    stored_levels_fingerprint,
)
from tests.conftest import REPO

FULL_SPEC = load_spec(REPO / "cube.geojson")
SOURCES = ("magnetic_anomaly", "curie_depth_200km", "subglacial_lakes_thwaites")
SPEC = FULL_SPEC.model_copy(
    update={
        "sources": [FULL_SPEC.source(s) for s in SOURCES],
        "variables": [v for v in FULL_SPEC.variables if v.source in SOURCES],
    }
)
GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 3000, 256)  # 651 x 707: 3 x 3 chunks
TIMES = pd.DatetimeIndex(sorted(FULL_SPEC.variables_of(SOURCES[2])[0].source_files_by_time))
LEVELS = f"{SPEC.data_id.removesuffix('.zarr')}.levels"
OLD_TITLE, NEW_TITLE = "Polar Data Cube (old)", "Polar Data Cube (new)"
PATCH = """\
zarr_consolidated_format: 1
metadata:
  .zattrs:
    title: {title}
  magnetic_anomaly/.zattrs: {{color_bar_name: RdBu_r}}
"""


def layer(name: str, step: int = 0, version: int = 1, grid: TargetGrid = GRID) -> np.ndarray:
    """A deterministic float32 layer: classes 0/1 for the lake masks (unmapped north), a
    plane elsewhere; `version` shifts the magnetic anomaly (a rebuilt input)."""
    ny, nx = grid.shape
    rows, columns = np.mgrid[0:ny, 0:nx]
    if name.startswith("thw"):
        values = ((rows // 40 + columns // 60 + step + len(name)) % 2).astype("float32")
        values[rows > ny * 3 // 4] = np.nan
    else:
        shift = 1000.0 * (version - 1) if name == "magnetic_anomaly" else 0.0
        values = (shift + len(name) + rows * 0.5 - columns * 0.25).astype("float32")
        values[:10, :20] = np.nan
    return values


def source_dataset(
    source_id: str, version: int = 1, grid: TargetGrid = GRID, fingerprint: str | None = None
) -> xr.Dataset:
    """The per-dataset cube of one source as `describe_dataset` lays it out."""
    variables = {}
    for variable in SPEC.variables_of(source_id):
        if variable.dims[0] == "time":
            data = np.stack([layer(variable.name, s, version, grid) for s in range(len(TIMES))])
        else:
            data = layer(variable.name, version=version, grid=grid)
        attrs = {"units": variable.units, "long_name": variable.long_name, **variable.attrs}
        attrs["source_sha256"] = f"{source_id}-sha256-v{version}"
        variables[variable.name] = (variable.dims, data, attrs)
    timed = any(v.dims[0] == "time" for v in SPEC.variables_of(source_id))
    dataset = xr.Dataset(variables, coords={"time": TIMES} if timed else {})
    dataset = add_grid_coords(dataset, grid)
    dataset.attrs = {
        "source": f"https://example.org/{source_id}",
        "polar_cube_source_id": source_id,
        FINGERPRINT_ATTR: fingerprint or f"{source_id}-v{version}",
    }
    return dataset


def expected_values(name: str, version: int = 1) -> np.ndarray:
    variable = next(v for v in SPEC.variables if v.name == name)
    if variable.dims[0] == "time":
        return np.stack([layer(name, s, version) for s in range(len(TIMES))])
    return layer(name, version=version)


def copy_store(template: StoreLocation, root: Path) -> StoreLocation:
    shutil.copytree(template.root, root)
    return StoreLocation.local(root)


def write_patch(folder: Path, title: str, extra: str = "") -> Path:
    path = folder / f"patch-{abs(hash((title, extra)))}.yaml"
    path.write_text(PATCH.format(title=title) + extra)
    return path


def rebuild(location: StoreLocation, patch_path: Path) -> bool:
    """Phase 4 of `build-cube` without Prefect (flows/build_cube.py): unless the published
    cube is current, stage the merge, patch it, check it and publish it. True if it
    published."""
    patch = load_patch(patch_path)
    if steps.cube_is_current(location, SPEC, GRID, patch):
        return False
    staged = steps.stage_merged_cube(location, SPEC, GRID, patch)
    steps.patch_staged_cube(location, staged, patch, patch_path)
    check_cube(location, staged.key, staged.levels_key)
    steps.publish_staged_cube(location, SPEC, staged)
    return True


def check_cube(location: StoreLocation, key: str, levels_key: str) -> None:
    where = location.url(key)
    check_store_layout(location.mapper(key), where)
    verify_cube(steps.open_cube(location, key), SPEC, GRID, where)
    fingerprint = steps.zarr_attrs(location, key)[FINGERPRINT_ATTR]
    verify_levels(
        location.mapper(levels_key),
        SPEC,
        GRID,
        location.url(levels_key),
        fingerprint=fingerprint,
        cube_name=SPEC.data_id,
    )


def chunk_files(folder: Path) -> dict[str, Path]:
    """{key: file} of the chunk objects below a zarr folder (no metadata)."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".link")
    }


def leftovers(location: StoreLocation) -> list[str]:
    """Hidden swap folders and staged objects in the store root."""
    root = Path(location.root)
    hidden = [p.name for p in root.glob(".*.old-*")] + [p.name for p in root.glob(".*.tmp-*")]
    staging = root / STAGING_PREFIX
    return sorted(hidden + ([p.name for p in staging.iterdir()] if staging.is_dir() else []))


# --- the stores ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """The per-dataset cubes (and their levels), written by the library's writer; `v2/`
    holds a rebuilt magnetic anomaly with other values."""
    folder = tmp_path_factory.mktemp("core-datasets")
    for source_id in SOURCES:
        write_dataset(source_dataset(source_id), folder / f"{source_id}.zarr", GRID)
    write_dataset(
        source_dataset("magnetic_anomaly", 2), folder / "v2" / "magnetic_anomaly.zarr", GRID
    )
    return folder


@pytest.fixture(scope="module")
def inputs_store(datasets, tmp_path_factory) -> StoreLocation:
    """A store holding only the uploaded inputs (a template: tests copy it)."""
    location = StoreLocation.local(tmp_path_factory.mktemp("core-inputs") / "store")
    for source_id in SOURCES:
        upload_cube(datasets / f"{source_id}.zarr", location)
    return location


@pytest.fixture(scope="module")
def published_store(inputs_store, tmp_path_factory) -> StoreLocation:
    """The inputs merged, patched with the "old" patch and published (a template)."""
    folder = tmp_path_factory.mktemp("core-published")
    location = copy_store(inputs_store, folder / "store")
    assert rebuild(location, write_patch(folder, OLD_TITLE))
    return location


@pytest.fixture
def store(inputs_store, tmp_path) -> StoreLocation:
    return copy_store(inputs_store, tmp_path / "store")


# --- merge --------------------------------------------------------------------------------


def test_the_merged_cube_has_every_variable_on_the_grid_and_the_inputs_chunk_files(
    published_store,
):
    location = published_store
    cube = steps.open_cube(location, SPEC.data_id)
    assert sorted(cube.data_vars) == sorted(["crs", *(v.name for v in SPEC.variables)])
    np.testing.assert_array_equal(cube["x"].values, GRID.x)
    np.testing.assert_array_equal(cube["y"].values, GRID.y)
    assert list(pd.DatetimeIndex(cube["time"].values)) == list(TIMES)
    linked = 0
    for variable in SPEC.variables:
        data = cube[variable.name]
        assert data.dims == tuple(variable.dims) and data.attrs["grid_mapping"] == "crs"
        np.testing.assert_array_equal(data.values, expected_values(variable.name))
        for level, key in ((0, SPEC.data_id), (1, f"{LEVELS}/{level_name(1)}")):
            source = Path(location.path(input_key(variable.source)))
            if level:
                source = Path(location.path(input_levels_key(variable.source), level_name(1)))
            inputs = chunk_files(source / variable.name)
            merged = chunk_files(Path(location.path(key, variable.name)))
            assert inputs and merged.keys() == inputs.keys(), (variable.name, level)
            for name, path in merged.items():  # hard links: the very same bytes on disk
                assert os.path.samefile(path, inputs[name]), path
            linked += len(merged)
    assert linked > 3 * len(SPEC.variables)
    check_cube(location, SPEC.data_id, LEVELS)
    assert (Path(location.path(LEVELS, "0.link")).read_text()) == f"../{SPEC.data_id}"
    assert leftovers(location) == []


OTHER_GRIDS = {
    "resolution": (
        TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 7000, 256),
        "x has 279 cells, the grid 651\n"
        "  inputs/magnetic_anomaly.zarr: y has 303 cells, the grid 707",
    ),
    "shift": (
        TargetGrid(
            SPEC.spatial_ref,
            (
                SPEC.spatial_bbox[0] + 1500,
                SPEC.spatial_bbox[1],
                SPEC.spatial_bbox[2] + 1500,
                SPEC.spatial_bbox[3],
            ),
            3000,
            256,
        ),
        "x differs from the grid (index 0: -2.5995e+06 vs -2.601e+06)",
    ),
    "crs": (
        TargetGrid("EPSG:3976", SPEC.spatial_bbox, 3000, 256),
        "CRS WGS 84 / NSIDC Sea Ice Polar Stereographic South is not EPSG:3031",
    ),
}


@pytest.mark.parametrize("case", sorted(OTHER_GRIDS))
def test_an_input_on_another_grid_is_refused_naming_it_before_anything_is_staged(
    store, tmp_path, case
):
    grid, problem = OTHER_GRIDS[case]
    cube = write_dataset(
        source_dataset("magnetic_anomaly", grid=grid), tmp_path / "magnetic_anomaly.zarr", grid
    )
    upload_cube(cube, store)
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(store, SPEC, GRID)
    assert str(refused.value) == (
        "inputs do not share the cube's grid:\n  inputs/magnetic_anomaly.zarr: " + problem
    )
    assert [p for p in Path(store.root, STAGING_PREFIX).rglob("*") if p.is_file()] == []


def test_a_missing_input_is_named(store):
    store.fs.rm(store.path(input_key("curie_depth_200km"), ".zmetadata"))
    with pytest.raises(MergeError, match=r"inputs/curie_depth_200km.zarr: missing or incomplete"):
        steps.stage_merged_cube(store, SPEC, GRID)


# --- patch --------------------------------------------------------------------------------


PATCH_WITH_DELETIONS = """\
zarr_consolidated_format: 1
metadata:
  .zattrs:
    title: Patched title
    product_version: __delete__
  magnetic_anomaly/.zattrs: {color_bar_name: RdBu_r}
  curie_depth_200km/.zattrs: {comment: negative km}
  thw_70/.zattrs: {valid_range: [0, 1], source_sha256: __delete__}
"""


def test_the_patch_sets_and_deletes_attributes_with_xcube_semantics(store, tmp_path):
    patch_path = tmp_path / "patch.yaml"
    patch_path.write_text(PATCH_WITH_DELETIONS)
    patch = load_patch(patch_path)
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    chunks_before = chunk_files(Path(store.path(staged.key)))
    generated = steps.zarr_attrs(store, staged.key)
    assert generated["product_version"] == SPEC.version and PATCH_ATTR not in generated

    assert steps.patch_staged_cube(store, staged, patch, patch_path)
    cube = steps.open_cube(store, staged.key)
    assert cube.attrs["title"] == "Patched title"
    assert "product_version" not in cube.attrs  # __delete__
    assert cube.attrs["history"] == generated["history"]  # what the patch does not name stays
    assert cube.attrs[PATCH_ATTR] == patch_digest(patch)
    assert cube.attrs["processing_software"].startswith("polar-datacube ")
    assert cube.attrs[FINGERPRINT_ATTR] == staged.fingerprint  # still marked complete
    assert cube["magnetic_anomaly"].attrs["color_bar_name"] == "RdBu_r"
    assert cube["curie_depth_200km"].attrs["comment"] == "negative km"
    thw_70 = cube["thw_70"].attrs
    assert "source_sha256" not in thw_70 and thw_70["units"] == "1"
    assert thw_70["valid_range"] == [0.0, 1.0]
    stored = json.loads(Path(store.path(staged.key, "thw_70", ".zattrs")).read_text())
    assert stored[NCZARR_ATTR]["types"]["valid_range"] == "<f4"  # typed as the variable
    consolidated = steps.zarr_attrs(store, staged.key)  # what readers of the cube get
    assert consolidated["title"] == "Patched title" and "product_version" not in consolidated
    assert chunk_files(Path(store.path(staged.key))) == chunks_before  # no chunk rewritten
    np.testing.assert_array_equal(cube["thw_70"].values, expected_values("thw_70"))

    assert not steps.patch_staged_cube(store, staged, patch, patch_path)  # already applied
    check_cube(store, staged.key, staged.levels_key)


def test_a_patch_naming_a_variable_the_cube_lacks_is_refused_and_nothing_patched(store, tmp_path):
    patch_path = tmp_path / "patch.yaml"
    patch_path.write_text(
        "zarr_consolidated_format: 1\nmetadata:\n  thw_7/.zattrs: {color_bar_name: GnBu}\n"
    )
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    before = steps.zarr_attrs(store, staged.key)
    with pytest.raises(PatchError) as refused:
        steps.patch_staged_cube(store, staged, load_patch(patch_path), patch_path)
    assert str(refused.value) == (
        f"{patch_path}: entries for variables the cube does not have: thw_7 (it has: crs, "
        "curie_depth_200km, magnetic_anomaly, thw_124, thw_142, thw_170, thw_70, time, x, y)"
    )
    assert steps.zarr_attrs(store, staged.key) == before


BAD_PATCHES = {
    "not YAML": (
        "zarr_consolidated_format: 1\nmetadata: {.zattrs: {title: [1, 2}\n",
        "not valid YAML at line 2, column 34: expected ',' or ']', but got '}'",
    ),
    "entry not a mapping": (
        "zarr_consolidated_format: 1\nmetadata:\n  magnetic_anomaly/.zattrs: red\n",
        'Invalid metadata format: entry "magnetic_anomaly/.zattrs" is not an object',
    ),
    "not attributes": (
        "zarr_consolidated_format: 1\nmetadata:\n  magnetic_anomaly/.zarray: {chunks: [1]}\n",
        'Ignoring metadata entry "magnetic_anomaly/.zarray": can only patch "*/.zattrs"',
    ),
    "no format": ("metadata:\n  .zattrs: {title: x}\n", "Invalid consolidated metadata format"),
    "no metadata": ("zarr_consolidated_format: 1\n", "Invalid metadata format"),
}


@pytest.mark.parametrize("case", sorted(BAD_PATCHES))
def test_a_bad_patch_file_is_refused_naming_the_file_and_the_entry(tmp_path, case):
    text, message = BAD_PATCHES[case]
    patch_path = tmp_path / "patch.yaml"
    patch_path.write_text(text)
    with pytest.raises(PatchError) as refused:
        load_patch(patch_path)
    assert str(refused.value) == f"{patch_path}: {message}"


def test_a_missing_patch_file_is_named(tmp_path):
    with pytest.raises(PatchError, match=r"nowhere.yaml: patch file not found"):
        load_patch(tmp_path / "nowhere.yaml")


# --- publish ------------------------------------------------------------------------------


def published_state(location: StoreLocation) -> tuple[str, str]:
    """What a reader finds at the published names: ("old" | "new" | "none") for the cube and
    for its levels. Fails on anything else: a cube or levels that open but are not whole,
    mixed versions, or levels paired with another cube than the published one."""
    cube_state, fingerprint = "none", None
    if location.exists(SPEC.data_id, ".zmetadata"):
        cube = xr.open_zarr(location.mapper(SPEC.data_id), consolidated=True, chunks=None)
        cube_state = {OLD_TITLE: "old", NEW_TITLE: "new"}[cube.attrs["title"]]
        version = 1 if cube_state == "old" else 2
        for variable in SPEC.variables:
            np.testing.assert_array_equal(
                cube[variable.name].values, expected_values(variable.name, version)
            )
        fingerprint = cube.attrs[FINGERPRINT_ATTR]
    levels_state = "none"
    record = steps.levels_fingerprint(location, LEVELS)
    if record is not None:
        assert record == fingerprint, "complete levels next to another cube (or none)"
        level = xr.open_zarr(location.mapper(LEVELS, level_name(1)), consolidated=True, chunks=None)
        magnetic = level["magnetic_anomaly"].values
        corner = float(magnetic[-1, -1])  # far from the NaN corner: the versions differ by 1000
        levels_state = "old" if corner < 500 else "new"
        assert levels_state == cube_state
    return cube_state, levels_state


def run_until_paused(root: str, patch_path: str, stop: tuple[str, int], paused: str) -> None:
    """In a child process: `rebuild`, paused for good just before the `stop`-th event of its
    kind (`link`: a chunk linked into the staged cube; `patch`: xcube's re-consolidation
    after it set the attributes; `rename`/`rmtree`: a step of publishing), having written
    `paused`. The test then SIGKILLs it."""
    import zarr

    kind, number = stop

    def say(message: str) -> None:  # whole or not at all (os.replace is not hooked)
        Path(f"{paused}.tmp").write_text(message)
        os.replace(f"{paused}.tmp", paused)

    counts = dict.fromkeys(("link", "patch", "rename", "rmtree"), 0)
    publishing = False

    def pause_before(event: str) -> None:
        counts[event] += 1
        if counts[event] == number and event == kind:
            say(f"{event} {number}")
            time.sleep(600)

    def hooked(event, original, only_when=lambda: True):
        def call(*args, **kwargs):
            if only_when():
                pause_before(event)
            return original(*args, **kwargs)

        return call

    os.link = hooked("link", os.link)
    os.rename = hooked("rename", os.rename, lambda: publishing)
    shutil.rmtree = hooked("rmtree", shutil.rmtree, lambda: publishing)
    zarr.consolidate_metadata = hooked(
        "patch",
        zarr.consolidate_metadata,
        lambda: sys._getframe(2).f_code.co_name == "_patch_dataset",
    )
    publish = steps.publish_staged_cube

    def publish_then_flag(*args):
        nonlocal publishing
        publishing = True
        return publish(*args)

    steps.publish_staged_cube = publish_then_flag
    rebuild(StoreLocation.local(root), Path(patch_path))
    say("finished without reaching the stop")


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported this module once (no import per kill)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "xcube.cli.patch"])
    return context


# (stop, what a reader finds right after the kill: cube, levels)
KILL_POINTS = {
    "merging": (("link", 20), ("old", "old")),
    "patching": (("patch", 1), ("old", "old")),
    "old levels withdrawn": (("rmtree", 1), ("old", "none")),
    "between the cube's renames": (("rename", 3), ("none", "none")),
    "new cube in, old not yet removed": (("rmtree", 2), ("new", "none")),
    "before the new levels": (("rename", 4), ("new", "none")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_publish_killed_at_any_step_never_shows_a_partial_cube_and_a_rerun_completes_it(
    published_store, datasets, tmp_path, forkserver, point
):
    stop, expected = KILL_POINTS[point]
    location = copy_store(published_store, tmp_path / "store")
    assert published_state(location) == ("old", "old")
    upload_cube(datasets / "v2" / "magnetic_anomaly.zarr", location)  # a rebuilt input
    new_patch, paused = write_patch(tmp_path, NEW_TITLE), tmp_path / "paused"

    child = forkserver.Process(
        target=run_until_paused, args=(location.root, str(new_patch), stop, str(paused))
    )
    child.start()
    deadline = time.monotonic() + 120
    while not paused.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert paused.exists(), f"the child did not reach {stop} (exit code {child.exitcode})"
    assert paused.read_text() == f"{stop[0]} {stop[1]}"
    assert child.exitcode == -signal.SIGKILL

    assert published_state(location) == expected
    assert rebuild(location, new_patch)  # the rerun resumes and completes the publish
    assert published_state(location) == ("new", "new")
    assert steps.is_published(
        location, SPEC, steps.current_fingerprint(location, SPEC, GRID), load_patch(new_patch)
    )
    assert leftovers(location) == []
    assert not rebuild(location, new_patch)


def test_publishing_replaces_the_cube_whole_and_withdraws_what_it_replaces(
    published_store, datasets, tmp_path
):
    location = copy_store(published_store, tmp_path / "store")
    upload_cube(datasets / "v2" / "magnetic_anomaly.zarr", location)
    staged = steps.stage_merged_cube(location, SPEC, GRID)
    new_patch = write_patch(tmp_path, NEW_TITLE)
    steps.patch_staged_cube(location, staged, load_patch(new_patch), new_patch)
    assert published_state(location) == ("old", "old")  # staging shows nothing
    steps.publish_staged_cube(location, SPEC, staged)
    assert published_state(location) == ("new", "new")
    assert not location.exists(staged.key) and not location.exists(staged.levels_key)
    withdraw(location, LEVELS)
    assert published_state(location) == ("new", "none")
    assert leftovers(location) == []


# --- reuse --------------------------------------------------------------------------------


def mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_the_published_cube_is_reused_until_the_patch_or_an_input_changes(
    published_store, datasets, tmp_path
):
    location = copy_store(published_store, tmp_path / "store")
    old_patch, new_patch = write_patch(tmp_path, OLD_TITLE), write_patch(tmp_path, NEW_TITLE)
    fingerprint = steps.current_fingerprint(location, SPEC, GRID)
    assert steps.is_published(location, SPEC, fingerprint, load_patch(old_patch))
    before = mtimes(Path(location.root))
    assert not rebuild(location, old_patch)
    assert mtimes(Path(location.root)) == before  # nothing rewritten

    assert not steps.is_published(location, SPEC, fingerprint, load_patch(new_patch))
    assert rebuild(location, new_patch)  # the same inputs, another patch: republished
    cube = steps.open_cube(location, SPEC.data_id)
    assert cube.attrs["title"] == NEW_TITLE and cube.attrs[FINGERPRINT_ATTR] == fingerprint
    np.testing.assert_array_equal(
        cube["magnetic_anomaly"].values, expected_values("magnetic_anomaly")
    )
    assert steps.is_published(location, SPEC, fingerprint, load_patch(new_patch))
    assert not steps.is_published(location, SPEC, fingerprint, load_patch(old_patch))

    upload_cube(datasets / "v2" / "magnetic_anomaly.zarr", location)  # an input changed
    changed = steps.current_fingerprint(location, SPEC, GRID)
    assert changed != fingerprint
    assert not steps.is_published(location, SPEC, changed, load_patch(new_patch))
    assert rebuild(location, new_patch)
    assert published_state(location) == ("new", "new")
    assert steps.is_published(location, SPEC, changed, load_patch(new_patch))

    Path(location.path(LEVELS, ZLEVELS)).unlink()  # incomplete levels: not current
    assert not steps.is_published(location, SPEC, changed, load_patch(new_patch))
    assert rebuild(location, new_patch)
    assert published_state(location) == ("new", "new")


def test_a_complete_staged_cube_is_reused_and_an_incomplete_one_rebuilt(store):
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    assert not staged.reused
    again = steps.stage_merged_cube(store, SPEC, GRID)
    assert again.reused and again.key == staged.key
    Path(store.path(staged.levels_key, ZLEVELS)).unlink()
    assert not steps.stage_merged_cube(store, SPEC, GRID).reused
    Path(store.path(staged.key, ".zmetadata")).unlink()
    rebuilt = steps.stage_merged_cube(store, SPEC, GRID)
    assert not rebuilt.reused and steps.zarr_attrs(store, rebuilt.key)[FINGERPRINT_ATTR]


def test_staged_cubes_of_earlier_inputs_and_discarded_ones_are_removed(store, datasets):
    first = steps.stage_merged_cube(store, SPEC, GRID)  # a run stopped after merging
    upload_cube(datasets / "v2" / "magnetic_anomaly.zarr", store)
    second = steps.stage_merged_cube(store, SPEC, GRID)
    assert second.key != first.key and not second.reused
    assert not store.exists(first.key) and not store.exists(first.levels_key)
    assert steps.levels_fingerprint(store, second.levels_key) == second.fingerprint
    steps.discard_staged_cube(store, second)  # as when it fails its checks
    assert leftovers(store) == []
    third = steps.stage_merged_cube(store, SPEC, GRID)
    assert third.key == second.key and not third.reused


def test_a_patch_edited_after_an_interrupted_run_replaces_the_earlier_patch(store, tmp_path):
    first = write_patch(tmp_path, OLD_TITLE, "  thw_70/.zattrs: {comment: only in the first}\n")
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    steps.patch_staged_cube(store, staged, load_patch(first), first)  # then the run is killed
    edited = write_patch(tmp_path, NEW_TITLE)
    assert rebuild(store, edited)
    cube = steps.open_cube(store, SPEC.data_id)
    assert cube.attrs["title"] == NEW_TITLE
    assert "comment" not in cube["thw_70"].attrs


# --- per-dataset reuse fingerprints --------------------------------------------------------


def fetched(source_id: str = "magnetic_anomaly", sha256: str = "a" * 64, spec=SPEC):
    source = spec.source(source_id)
    return FetchedSource(source, Path("/nowhere"), f"https://example.org/{source_id}", sha256)


def spec_with(name: str, **changes):
    variables = [v.model_copy(update=changes) if v.name == name else v for v in SPEC.variables]
    return SPEC.model_copy(update={"variables": variables})


@pytest.fixture(scope="module")
def current_cube(tmp_path_factory) -> Path:
    """A per-dataset cube carrying the fingerprint of `fetched()` with SPEC on GRID."""
    fingerprint = dataset_fingerprint(SPEC, fetched(), GRID)
    target = tmp_path_factory.mktemp("core-current") / "magnetic_anomaly.zarr"
    write_dataset(source_dataset("magnetic_anomaly", fingerprint=fingerprint), target, GRID)
    return target


def test_a_per_dataset_cube_is_current_only_for_the_same_recipe_source_and_grid(current_cube):
    assert dataset_is_current(current_cube, SPEC, fetched(), GRID)
    source = SPEC.source("magnetic_anomaly")
    moved = source.model_copy(update={"download_url": "https://example.org/elsewhere.tif"})
    other_source = SPEC.model_copy(
        update={"sources": [moved if s.id == source.id else s for s in SPEC.sources]}
    )
    changed = {
        "its variable's units": (spec_with("magnetic_anomaly", units="mT"), fetched(), GRID),
        "its variable's masking": (
            spec_with(
                "magnetic_anomaly", valid_if=FULL_SPEC.variables_of("curie_depth_200km")[0].valid_if
            ),
            fetched(),
            GRID,
        ),
        "the source's bytes": (SPEC, fetched(sha256="b" * 64), GRID),
        "the source's URL": (other_source, fetched(spec=other_source), GRID),
        "the resolution": (
            SPEC,
            fetched(),
            TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 7000, 256),
        ),
        "the chunking": (SPEC, fetched(), dataclasses.replace(GRID, chunk_size=128)),
    }
    for what, (spec, fetched_source, grid) in changed.items():
        assert not dataset_is_current(current_cube, spec, fetched_source, grid), what
    # another source's entry is not part of this cube's recipe
    assert dataset_is_current(
        current_cube, spec_with("curie_depth_200km", units="m"), fetched(), GRID
    )


@pytest.mark.parametrize("broken", [".zmetadata", "levels/.zlevels", "levels"])
def test_an_incomplete_per_dataset_cube_is_not_current(current_cube, tmp_path, broken):
    cube = tmp_path / current_cube.name
    shutil.copytree(current_cube, cube)
    levels = cube.with_name("magnetic_anomaly.levels")
    shutil.copytree(current_cube.with_name(levels.name), levels)
    assert dataset_is_current(cube, SPEC, fetched(), GRID)
    if broken == "levels":
        shutil.rmtree(levels)
    else:
        (levels / ZLEVELS if broken.startswith("levels/") else cube / broken).unlink()
    assert not dataset_is_current(cube, SPEC, fetched(), GRID)


def test_levels_of_another_build_make_a_per_dataset_cube_not_current(current_cube, tmp_path):
    cube = tmp_path / current_cube.name
    shutil.copytree(current_cube, cube)
    other = source_dataset("magnetic_anomaly", fingerprint="another build")
    write_dataset(other, tmp_path / "other" / cube.name, GRID)
    levels = tmp_path / "magnetic_anomaly.levels"
    shutil.copytree(tmp_path / "other" / levels.name, levels)
    assert stored_levels_fingerprint(levels) == "another build"  # complete, but not this cube's
    assert not dataset_is_current(cube, SPEC, fetched(), GRID)


def test_a_per_dataset_cube_written_into_a_store_location_is_current_there(tmp_path):
    """The bucket path (`write_zarr_in_place`, markers last) on a local-folder location."""
    location = StoreLocation.local(tmp_path / "bucket").child("inputs", "magnetic_anomaly.zarr")
    fingerprint = dataset_fingerprint(SPEC, fetched(), GRID)
    write_dataset(source_dataset("magnetic_anomaly", fingerprint=fingerprint), location, GRID)
    assert dataset_is_current(location, SPEC, fetched(), GRID)
    assert not dataset_is_current(location, SPEC, fetched(sha256="c" * 64), GRID)
    Path(location.path(".zmetadata")).unlink()  # as an interrupted write leaves it
    assert not dataset_is_current(location, SPEC, fetched(), GRID)


# --- StoreLocation ------------------------------------------------------------------------


def test_a_local_location_joins_paths_and_creates_folders_as_it_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = StoreLocation.local("store")
    assert location.root == str(tmp_path / "store") and location.is_local
    assert location.url("inputs/", "/a.zarr", "") == f"{tmp_path}/store/inputs/a.zarr"
    assert location.path("inputs", "a.zarr") == f"{tmp_path}/store/inputs/a.zarr"
    child = location.child("inputs", "a.zarr")
    assert child.root == location.url("inputs", "a.zarr") and child.is_local
    assert child.url(".zmetadata") == location.url("inputs", "a.zarr", ".zmetadata")

    assert not location.exists("inputs") and remote_files(location, "inputs") == {}
    location.fs.pipe_file(location.path("inputs", "a.zarr", "x", "0.0"), b"1234")
    child.mapper()[".zgroup"] = b"{}"
    assert location.exists("inputs") and child.exists("x", "0.0")
    assert remote_files(location, "inputs") == {"a.zarr/x/0.0": 4, "a.zarr/.zgroup": 2}
    assert sorted(child.mapper()) == [".zgroup", "x/0.0"]

    location.fs.rm(location.path("inputs", "a.zarr", "x"), recursive=True)
    assert not child.exists("x") and child.exists(".zgroup")
    withdraw(location, "inputs/a.zarr")  # renamed away, then removed
    assert not location.exists("inputs", "a.zarr") and os.listdir(location.path("inputs")) == []
    withdraw(location, "inputs/a.zarr")  # nothing there: nothing to do


def test_file_urls_are_local_and_s3_prefixes_are_not(tmp_path):
    as_url = StoreLocation(f"file://{tmp_path}/store/")
    assert as_url.is_local and as_url.path("a") == f"{tmp_path}/store/a"
    as_url.fs.pipe_file(as_url.path("a", "b"), b"x")
    assert (tmp_path / "store" / "a" / "b").read_bytes() == b"x"
    bucket = StoreLocation("s3://polar-cube/cubes/", {"key": "K", "secret": "S3CR3T"})
    assert not bucket.is_local
    assert bucket.url("inputs", "a.zarr") == "s3://polar-cube/cubes/inputs/a.zarr"
    assert bucket.path("inputs", "a.zarr") == "polar-cube/cubes/inputs/a.zarr"
    assert bucket.child("inputs").storage_options == bucket.storage_options
    assert "S3CR3T" not in repr(bucket) and "S3CR3T" not in repr(bucket.child("inputs"))
    assert bucket == StoreLocation("s3://polar-cube/cubes/")  # the options are not compared
