"""Merge, patch, publish (kill-safe), versions and carrying, the reuse fingerprints and
`StoreLocation` on a local-folder store, as plain library calls: no Prefect, no download, no
S3 server.

Three per-dataset cubes of a three-source subset of the repo spec (a static layer, another
static layer, four lake masks on two time steps) on a 3 km grid (651 x 707 cells, 3 x 3
chunks, two levels) are written by the library's own writer straight into a cube version
(`InVersion`), as `build-cube` writes them; `rebuild` then does what `build-cube` does next
(flows/build_cube.py): nothing if `latest` is current, else carry the unchanged sources into
the next version, merge, patch, check and publish it. The kill-safety test SIGKILLs a real
child process paused at each step of the carry, the merge, the patch and the publish. The
S3 variants are in the slow set (`test_s3.py`, `test_cube_flow.py`).
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
from polar_cube.cube.carry import carry_sources
from polar_cube.cube.merge import MergeError
from polar_cube.cube.patching import PATCH_ATTR, PatchError, load_patch, patch_digest
from polar_cube.cube.verify import check_store_layout, verify_cube, verify_levels
from polar_cube.cube.versions import (
    PublishedVersion,
    catalog_key,
    latest_cube,
    next_version,
    read_catalog,
)
from polar_cube.dataset import (
    FetchedSource,
    InVersion,
    dataset_fingerprint,
    dataset_is_current,
    write_dataset,
)
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.levels import ZLEVELS, level_name
from polar_cube.location import StoreLocation, remote_files
from polar_cube.spec import CubeSpec, load_spec
from polar_cube.zarr_store import (
    FINGERPRINT_ATTR,
    NCZARR_ATTR,
    add_grid_coords,
    stored_fingerprint,
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
SERIES = SPEC.series
# the first version (the spec's own), and the next two a changed build publishes
V1, V2, V3 = (SPEC.at_version(v) for v in (SPEC.version, "1.1.1", "1.1.2"))
DRAFT = VersionKeys(SPEC.data_id)  # the first build's version, before it is published
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


def fetched(source_id: str = "magnetic_anomaly", sha256: str = "a" * 64, spec=SPEC):
    source = spec.source(source_id)
    return FetchedSource(source, Path("/nowhere"), f"https://example.org/{source_id}", sha256)


def source_fetched(source_id: str, version: int = 1) -> FetchedSource:
    """What downloading the source gives when its file is at `version`."""
    return fetched(source_id, sha256=f"{version:064d}")


def source_fingerprint(source_id: str, version: int = 1) -> str:
    return dataset_fingerprint(SPEC, source_fetched(source_id, version), GRID)


def source_dataset(
    source_id: str, version: int = 1, grid: TargetGrid = GRID, fingerprint: str | None = None
) -> xr.Dataset:
    """The per-dataset cube of one source as `describe_dataset` lays it out, carrying the
    fingerprint of its build from the source at `version`."""
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
        FINGERPRINT_ATTR: fingerprint or source_fingerprint(source_id, version),
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


def write_sources(location: StoreLocation, keys: VersionKeys, inputs: dict[str, int]) -> None:
    """Each source's build from its file at version `inputs[id]`, written straight into the
    version `keys` (chunks into its cube and levels, metadata into its `.inputs/`)."""
    for source_id, version in inputs.items():
        dataset = source_dataset(source_id, version)
        write_dataset(dataset, InVersion(location, keys, source_id), GRID)


def build_sources(
    location: StoreLocation,
    draft: VersionKeys,
    latest: PublishedVersion | None,
    inputs: dict[str, int],
) -> dict[str, VersionKeys]:
    """Phase 2 of `build-cube` (flows/build_datasets.py `_build_one`) for each source from
    its file at version `inputs[id]` (default 1): kept if the draft has it (an interrupted
    run wrote it), to be carried if `latest` has it from the same inputs, else written into
    the draft. Returns {source id: the version to carry it from}."""
    carried = {}
    for source_id in SOURCES:
        version = inputs.get(source_id, 1)
        got = source_fetched(source_id, version)
        if dataset_is_current(InVersion(location, draft, source_id), SPEC, got, GRID):
            continue
        earlier = latest and InVersion(location, latest.keys, source_id)
        if earlier and dataset_is_current(earlier, SPEC, got, GRID):
            carried[source_id] = latest.keys
        else:
            write_sources(location, draft, {source_id: version})
    return carried


def rebuild(
    location: StoreLocation,
    patch_path: Path,
    inputs: dict[str, int] | None = None,
    spec_version: str = SPEC.version,
) -> PublishedVersion | None:
    """`build-cube` without Prefect (flows/build_cube.py), each source's file at version
    `inputs[id]` (default 1), the spec at `spec_version`: the sources built into the next
    version; unless `latest` is current, the unchanged ones carried into it, then merged,
    patched, checked and published. The version it published, or None."""
    inputs = inputs or {}
    spec = SPEC.at_version(spec_version)
    patch = load_patch(patch_path)
    catalog = read_catalog(location, SERIES)
    draft = spec.at_version(next_version(catalog, spec.version))
    keys = VersionKeys(draft.data_id)
    carried = build_sources(location, keys, catalog.latest_version, inputs)
    fingerprints = {s: source_fingerprint(s, inputs.get(s, 1)) for s in SOURCES}
    if steps.current_version(location, spec, GRID, patch, fingerprints):
        return None
    if carried:
        carry_sources(location, spec, carried, keys)
    staged = steps.stage_merged_cube(location, draft, GRID, patch)
    steps.patch_staged_cube(location, staged, patch, patch_path)
    check_cube(location, draft)
    return steps.publish_staged_cube(location, draft, staged, patch)


def check_cube(location: StoreLocation, spec: CubeSpec) -> None:
    """The version's cube and levels against the spec (tasks/cube.py's checks)."""
    keys = VersionKeys(spec.data_id)
    where = location.url(keys.cube)
    check_store_layout(location.mapper(keys.cube), where)
    verify_cube(steps.open_cube(location, keys.cube), spec, GRID, where)
    fingerprint = steps.zarr_attrs(location, keys.cube)[FINGERPRINT_ATTR]
    verify_levels(
        location.mapper(keys.levels),
        spec,
        GRID,
        location.url(keys.levels),
        fingerprint=fingerprint,
        cube_name=keys.cube,
    )


def chunk_files(folder: Path) -> dict[str, Path]:
    """{key: file} of the chunk objects below a zarr folder (no metadata)."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".link")
    }


def version_files(location: StoreLocation, spec: CubeSpec) -> dict[str, tuple]:
    """{key: (bytes, mtime, inode)} of every object of a version (all its `VersionKeys`)."""
    root = Path(location.root)
    found = {}
    for key in VersionKeys(spec.data_id).all_keys():
        for path in [root / key, *(root / key).rglob("*")]:
            if path.is_file():
                stat = path.stat()
                found[path.relative_to(root).as_posix()] = (
                    path.read_bytes(),
                    stat.st_mtime_ns,
                    stat.st_ino,
                )
    return found


def mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# --- the stores ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafted_store(tmp_path_factory) -> StoreLocation:
    """The three sources written into the first version, nothing merged or published (a
    template: tests copy it)."""
    location = StoreLocation.local(tmp_path_factory.mktemp("core-draft") / "store")
    write_sources(location, DRAFT, dict.fromkeys(SOURCES, 1))
    return location


@pytest.fixture(scope="module")
def published_store(drafted_store, tmp_path_factory) -> StoreLocation:
    """The first version merged, patched with the "old" patch and published (a template)."""
    folder = tmp_path_factory.mktemp("core-published")
    location = copy_store(drafted_store, folder / "store")
    assert rebuild(location, write_patch(folder, OLD_TITLE)).version == V1.version
    return location


@pytest.fixture(scope="module")
def rebuilt_store(published_store, tmp_path_factory) -> StoreLocation:
    """The published store with a rebuilt magnetic anomaly (its file at version 2) written
    into the next version, as a build does before it carries, merges and publishes (a
    template)."""
    location = copy_store(published_store, tmp_path_factory.mktemp("core-rebuilt") / "store")
    write_sources(location, VersionKeys(V2.data_id), {"magnetic_anomaly": 2})
    return location


@pytest.fixture
def store(drafted_store, tmp_path) -> StoreLocation:
    return copy_store(drafted_store, tmp_path / "store")


# --- merge --------------------------------------------------------------------------------


def test_the_merged_cube_has_every_variable_on_the_grid_and_the_chunks_its_sources_wrote(
    store,
):
    """The sources' builds wrote the chunks into the version; the merge writes only
    metadata next to them: every chunk file is untouched, the inputs hold no chunk."""
    chunks_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in all_chunks(store)}
    assert len(chunks_before) > 3 * len(SPEC.variables)
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    assert (staged.key, staged.levels_key) == (DRAFT.cube, DRAFT.levels) and not staged.reused
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in all_chunks(store)} == chunks_before

    cube = steps.open_cube(store, DRAFT.cube)
    assert sorted(cube.data_vars) == sorted(["crs", *(v.name for v in SPEC.variables)])
    np.testing.assert_array_equal(cube["x"].values, GRID.x)
    np.testing.assert_array_equal(cube["y"].values, GRID.y)
    assert list(pd.DatetimeIndex(cube["time"].values)) == list(TIMES)
    level_1 = xr.open_zarr(store.mapper(DRAFT.levels, level_name(1)), consolidated=True)
    for variable in SPEC.variables:
        data = cube[variable.name]
        assert data.dims == tuple(variable.dims) and data.attrs["grid_mapping"] == "crs"
        np.testing.assert_array_equal(data.values, expected_values(variable.name))
        assert level_1[variable.name].shape[-2:] == (354, 326)
        assert np.isfinite(level_1[variable.name].values).any(), variable.name
        for inputs in (DRAFT.input_key(variable.source), DRAFT.input_levels_key(variable.source)):
            stored = remote_files(store, inputs)
            assert stored and variable_chunks(stored) == [], inputs
    assert cube.attrs[FINGERPRINT_ATTR] == staged.fingerprint
    check_cube(store, SPEC)
    assert Path(store.path(DRAFT.levels, "0.link")).read_text() == f"../{DRAFT.cube}"
    assert read_catalog(store, SERIES).latest is None  # merged, not published


def variable_chunks(stored: dict[str, int]) -> list[str]:
    """The keys of spec variables' chunks among `stored` keys (coordinates and metadata
    are not)."""
    names = {v.name for v in SPEC.variables}
    return [k for k in stored if "/" in k and not is_metadata(k) and k.split("/")[-2] in names]


def all_chunks(location: StoreLocation) -> list[Path]:
    """The chunk files of the spec's variables in the draft's cube and levels."""
    return [
        path
        for key in (DRAFT.cube, f"{DRAFT.levels}/{level_name(1)}")
        for variable in SPEC.variables
        for path in chunk_files(Path(location.path(key, variable.name))).values()
    ]


OTHER_GRIDS = {
    "resolution": (
        TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 7000, 256),
        "x has 279 cells, the grid 651\n  {input}: y has 303 cells, the grid 707",
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
def test_an_input_on_another_grid_is_refused_naming_it_before_any_metadata_is_written(store, case):
    grid, problem = OTHER_GRIDS[case]
    into = InVersion(store, DRAFT, "magnetic_anomaly")
    write_dataset(source_dataset("magnetic_anomaly", grid=grid), into, grid)
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(store, SPEC, GRID)
    input_key = DRAFT.input_key("magnetic_anomaly")
    assert str(refused.value) == (
        f"inputs do not share the cube's grid:\n  {input_key}: " + problem.format(input=input_key)
    )
    for key in (DRAFT.cube, DRAFT.levels):  # chunks only: the merge wrote nothing
        stored = remote_files(store, key)
        assert stored and not [k for k in stored if is_metadata(k)], key


def test_a_missing_input_is_named(store):
    store.fs.rm(store.path(DRAFT.input_key("curie_depth_200km"), ".zmetadata"))
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(store, SPEC, GRID)
    assert str(refused.value) == (
        f"{store.url(DRAFT.input_key('curie_depth_200km'))}: missing or incomplete; "
        "build it first (`polar-cube build` without --only)"
    )


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
    staged = steps.stage_merged_cube(store, SPEC, GRID, patch)
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
    check_cube(store, SPEC)


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
    """What a reader finds through `latest`: (the version, "old" | "new"). Fails on anything
    else: a cube or levels that do not open whole, values other than that build's, or
    levels of another cube."""
    cube_name = latest_cube(location, SERIES)
    keys = VersionKeys(cube_name)
    cube = xr.open_zarr(location.mapper(cube_name), consolidated=True, chunks=None)
    state = {OLD_TITLE: "old", NEW_TITLE: "new"}[cube.attrs["title"]]
    inputs = 1 if state == "old" else 2
    for variable in SPEC.variables:
        np.testing.assert_array_equal(
            cube[variable.name].values, expected_values(variable.name, inputs)
        )
    assert steps.levels_fingerprint(location, keys.levels) == cube.attrs[FINGERPRINT_ATTR]
    assert Path(location.path(keys.levels, "0.link")).read_text() == f"../{cube_name}"
    level = xr.open_zarr(location.mapper(keys.levels, level_name(1)), consolidated=True)
    corner = float(level["magnetic_anomaly"].values[-1, -1])  # the inputs differ by 1000
    assert (corner < 500) == (state == "old"), corner
    return cube.attrs["product_version"], state


def run_until_paused(root: str, patch_path: str, stop: tuple[str, int], paused: str) -> None:
    """In a child process: `rebuild` with the rebuilt magnetic anomaly, paused for good just
    before the `stop`-th event of its kind, having written `paused`; the test then SIGKILLs
    it. Events: `link` (a carried object linked into the new version), `write` (an object
    the merge writes), `consolidate` (the merge consolidating the cube, then a level),
    `patch` (xcube's re-consolidation after setting the attributes), `replace` (renaming
    the new catalog over the old one), `published` (the publish returned)."""
    import fsspec.implementations.local
    import zarr

    kind, number = stop
    replace = os.replace

    def say(message: str) -> None:  # whole or not at all (with the unhooked os.replace)
        Path(f"{paused}.tmp").write_text(message)
        replace(f"{paused}.tmp", paused)

    counts = dict.fromkeys(("link", "write", "consolidate", "patch", "replace", "published"), 0)
    phase = ""

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

    def during(name):
        return lambda: phase == name

    local = fsspec.implementations.local.LocalFileSystem
    os.link = hooked("link", os.link, during("carry"))
    local.pipe_file = hooked("write", local.pipe_file, during("merge"))
    zarr.consolidate_metadata = hooked(
        "patch",
        hooked("consolidate", zarr.consolidate_metadata, during("merge")),
        lambda: sys._getframe(2).f_code.co_name == "_patch_dataset",
    )
    os.replace = hooked("replace", os.replace, during("publish"))

    def entering(name, original):
        def call(*args, **kwargs):
            nonlocal phase
            phase = name
            result = original(*args, **kwargs)
            phase = ""
            if name == "publish":
                pause_before("published")
            return result

        return call

    global carry_sources
    carry_sources = entering("carry", carry_sources)
    steps.stage_merged_cube = entering("merge", steps.stage_merged_cube)
    steps.publish_staged_cube = entering("publish", steps.publish_staged_cube)
    rebuild(StoreLocation.local(root), Path(patch_path), {"magnetic_anomaly": 2})
    say(f"finished without reaching the stop: {counts}")


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported this module once (no import per kill)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "xcube.cli.patch"])
    return context


OLD, NEW = (V1.version, "old"), (V2.version, "new")
# (stop, what a reader finds through `latest` right after the kill)
KILL_POINTS = {
    "carrying the unchanged sources": (("link", 20), OLD),
    "merge started": (("write", 1), OLD),
    "the cube's metadata half written": (("write", 20), OLD),
    "the cube merged, not yet marked complete": (("consolidate", 1), OLD),
    "the levels' metadata half written": (("write", 40), OLD),
    "the levels merged, not yet marked complete": (("consolidate", 2), OLD),
    "patching": (("patch", 1), OLD),
    "the new catalog written, not yet in place": (("replace", 1), OLD),
    "published": (("published", 1), NEW),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_build_killed_at_any_step_leaves_latest_whole_and_a_rerun_completes_it(
    rebuilt_store, tmp_path, forkserver, point
):
    stop, expected = KILL_POINTS[point]
    location = copy_store(rebuilt_store, tmp_path / "store")
    assert published_state(location) == OLD
    published_v1 = version_files(location, V1)
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
    rerun = rebuild(location, new_patch, {"magnetic_anomaly": 2})  # resumes the same version
    assert (rerun.version if rerun else None) == (None if expected == NEW else V2.version)
    assert published_state(location) == NEW
    assert [v.version for v in read_catalog(location, SERIES).versions] == [V1.version, "1.1.1"]
    assert rebuild(location, new_patch, {"magnetic_anomaly": 2}) is None
    assert version_files(location, V1) == published_v1  # never touched
    stored = sorted(p.name for p in Path(location.root).iterdir())  # a killed catalog
    assert (
        stored
        == sorted(  # write's temporary file is removed by the next write
            [catalog_key(SERIES)]
            + [
                key
                for spec in (V1, V2)
                for keys in [VersionKeys(spec.data_id)]
                for key in (*keys.all_keys()[:3], keys.manifest)  # no quicklooks, no STAC here
            ]
        )
    )


def test_a_publish_never_modifies_a_published_version(rebuilt_store, tmp_path):
    """Publishing the next version (a source rebuilt, the others carried, another patch)
    leaves every object of the published one as it was: bytes, mtime and inode."""
    location = copy_store(rebuilt_store, tmp_path / "store")
    before = version_files(location, V1)
    assert len(before) > 3 * len(SPEC.variables)
    catalog = read_catalog(location, SERIES)
    published = rebuild(location, write_patch(tmp_path, NEW_TITLE), {"magnetic_anomaly": 2})
    assert published.version == V2.version
    assert version_files(location, V1) == before
    assert read_catalog(location, SERIES).find(V1.version) == catalog.find(V1.version)
    old = steps.open_cube(location, V1.data_id)  # still opens, with its own values
    assert old.attrs["title"] == OLD_TITLE
    for variable in SPEC.variables:
        np.testing.assert_array_equal(old[variable.name].values, expected_values(variable.name))
    shared = {path.stat().st_ino for path in Path(location.root, V1.data_id).rglob("*")}
    new_cube = Path(location.path(V2.data_id))
    for path in new_cube.rglob("*"):  # the new version's metadata is its own
        if path.is_file() and is_metadata(path.name):
            assert path.stat().st_ino not in shared and path.stat().st_nlink == 1, path


def test_a_changed_patch_or_input_publishes_the_next_version_and_an_unchanged_rerun_nothing(
    published_store, tmp_path
):
    location = copy_store(published_store, tmp_path / "store")
    old_patch, new_patch = write_patch(tmp_path, OLD_TITLE), write_patch(tmp_path, NEW_TITLE)
    first = read_catalog(location, SERIES).latest_version
    assert first.version == V1.version and latest_cube(location, SERIES) == V1.data_id
    before = mtimes(Path(location.root))
    assert rebuild(location, old_patch) is None
    assert mtimes(Path(location.root)) == before  # nothing written, not even a draft

    second = rebuild(location, new_patch)  # the same inputs, another patch
    assert second.version == V2.version and latest_cube(location, SERIES) == V2.data_id
    assert second.fingerprint == first.fingerprint and second.patch != first.patch
    cube = steps.open_cube(location, V2.data_id)
    assert cube.attrs["title"] == NEW_TITLE and cube.attrs["product_version"] == V2.version
    assert cube.attrs[FINGERPRINT_ATTR] == first.fingerprint
    np.testing.assert_array_equal(
        cube["magnetic_anomaly"].values, expected_values("magnetic_anomaly")
    )
    assert rebuild(location, new_patch) is None

    third = rebuild(location, new_patch, {"magnetic_anomaly": 2})  # an input changed
    assert third.version == V3.version and latest_cube(location, SERIES) == V3.data_id
    assert third.fingerprint != second.fingerprint
    cube = steps.open_cube(location, V3.data_id)
    np.testing.assert_array_equal(
        cube["magnetic_anomaly"].values, expected_values("magnetic_anomaly", 2)
    )
    np.testing.assert_array_equal(cube["thw_70"].values, expected_values("thw_70"))
    before = mtimes(Path(location.root))
    assert rebuild(location, new_patch, {"magnetic_anomaly": 2}) is None
    assert mtimes(Path(location.root)) == before

    bumped = rebuild(location, new_patch, {"magnetic_anomaly": 2}, spec_version="1.2.0")
    assert bumped.version == "1.2.0" and bumped.fingerprint == third.fingerprint
    assert latest_cube(location, SERIES) == SPEC.at_version("1.2.0").data_id
    assert rebuild(location, new_patch, {"magnetic_anomaly": 2}, spec_version="1.2.0") is None
    catalog = read_catalog(location, SERIES)
    assert [v.version for v in catalog.versions] == ["1.1.0", "1.1.1", "1.1.2", "1.2.0"]


def test_an_unchanged_source_is_carried_into_the_new_version_by_hard_links(rebuilt_store, tmp_path):
    location = copy_store(rebuilt_store, tmp_path / "store")
    published = rebuild(location, write_patch(tmp_path, OLD_TITLE), {"magnetic_anomaly": 2})
    assert published.version == V2.version
    old, new = VersionKeys(V1.data_id), VersionKeys(V2.data_id)
    carried = 0
    for variable in SPEC.variables:
        for key_old, key_new in (
            (old.cube, new.cube),
            (f"{old.levels}/{level_name(1)}", f"{new.levels}/{level_name(1)}"),
        ):
            before = chunk_files(Path(location.path(key_old, variable.name)))
            after = chunk_files(Path(location.path(key_new, variable.name)))
            assert before and after.keys() == before.keys(), (variable.name, key_new)
            linked = {name for name in after if os.path.samefile(after[name], before[name])}
            if variable.source == "magnetic_anomaly":  # rebuilt: its own new chunks
                assert linked == set(), key_new
            else:  # carried: the very same files
                assert linked == set(after), key_new
                carried += len(linked)
    assert carried > 3 * len(SPEC.variables)
    for source_id in SOURCES:
        metadata = InVersion(location, new, source_id).metadata
        version = 2 if source_id == "magnetic_anomaly" else 1
        assert stored_fingerprint(metadata) == source_fingerprint(source_id, version)
    cube = steps.open_cube(location, new.cube)
    for variable in SPEC.variables:
        version = 2 if variable.source == "magnetic_anomaly" else 1
        np.testing.assert_array_equal(
            cube[variable.name].values, expected_values(variable.name, version)
        )
    level_1 = xr.open_zarr(location.mapper(new.levels, level_name(1)), consolidated=True)
    thw = level_1["thw_70"].values
    assert set(np.unique(thw[np.isfinite(thw)])) == {0.0, 1.0}  # carried mode levels
    check_cube(location, V2)


# --- resuming an interrupted build --------------------------------------------------------


def test_a_complete_merged_cube_is_reused_and_an_incomplete_one_merged_again(store):
    staged = steps.stage_merged_cube(store, SPEC, GRID)
    assert not staged.reused
    before = mtimes(Path(store.root))
    again = steps.stage_merged_cube(store, SPEC, GRID)
    assert again.reused and again == dataclasses.replace(staged, reused=True)
    assert mtimes(Path(store.root)) == before  # nothing rewritten
    Path(store.path(staged.levels_key, ZLEVELS)).unlink()
    assert not steps.stage_merged_cube(store, SPEC, GRID).reused
    assert steps.levels_fingerprint(store, staged.levels_key) == staged.fingerprint
    Path(store.path(staged.key, ".zmetadata")).unlink()
    merged = steps.stage_merged_cube(store, SPEC, GRID)
    assert not merged.reused and steps.zarr_attrs(store, merged.key)[FINGERPRINT_ATTR]


def test_a_source_rebuilt_into_a_merged_draft_is_merged_again_and_a_discarded_one_too(store):
    first = steps.stage_merged_cube(store, SPEC, GRID)  # a run stopped after merging
    write_sources(store, DRAFT, {"magnetic_anomaly": 2})  # the next run's build
    second = steps.stage_merged_cube(store, SPEC, GRID)
    assert second.key == first.key and not second.reused
    assert second.fingerprint != first.fingerprint
    assert steps.levels_fingerprint(store, second.levels_key) == second.fingerprint
    cube = steps.open_cube(store, second.key)
    assert cube.attrs[FINGERPRINT_ATTR] == second.fingerprint
    np.testing.assert_array_equal(
        cube["magnetic_anomaly"].values, expected_values("magnetic_anomaly", 2)
    )
    steps.discard_staged_cube(store, second)  # as when it fails its checks
    assert not store.exists(second.key, ".zmetadata")
    assert steps.levels_fingerprint(store, second.levels_key) is None
    assert all_chunks(store)  # the sources' chunks stay
    third = steps.stage_merged_cube(store, SPEC, GRID)
    assert third.key == second.key and not third.reused
    assert third.fingerprint == second.fingerprint


def test_a_variable_dropped_from_the_spec_after_an_interrupted_run_leaves_the_draft(store):
    """The draft was merged (then the run was killed, or its checks failed) and the spec
    edited: what the earlier merge wrote for the dropped variable is not merged again."""
    steps.discard_staged_cube(store, steps.stage_merged_cube(store, SPEC, GRID))
    dropped = SPEC.model_copy(
        update={"variables": [v for v in SPEC.variables if v.name != "thw_170"]}
    )
    staged = steps.stage_merged_cube(store, dropped, GRID)
    assert "thw_170" not in steps.open_cube(store, staged.key).data_vars
    check_cube(store, dropped)
    for key in (DRAFT.cube, f"{DRAFT.levels}/{level_name(1)}"):
        assert not store.exists(key, "thw_170") and store.exists(key, "thw_70", ".zarray"), key
    level_1 = xr.open_zarr(store.mapper(DRAFT.levels, level_name(1)), consolidated=True)
    assert sorted(level_1.data_vars) == sorted(["crs", *(v.name for v in dropped.variables)])


def test_a_patch_edited_after_an_interrupted_run_replaces_the_earlier_patch(store, tmp_path):
    first = write_patch(tmp_path, OLD_TITLE, "  thw_70/.zattrs: {comment: only in the first}\n")
    staged = steps.stage_merged_cube(store, SPEC, GRID, load_patch(first))
    steps.patch_staged_cube(store, staged, load_patch(first), first)  # then the run is killed
    assert steps.open_cube(store, staged.key)["thw_70"].attrs["comment"] == "only in the first"
    edited = write_patch(tmp_path, NEW_TITLE)
    published = rebuild(store, edited)
    assert published.version == V1.version  # the draft, finished: nothing was published
    cube = steps.open_cube(store, latest_cube(store, SERIES))
    assert cube.attrs["title"] == NEW_TITLE
    assert cube.attrs[PATCH_ATTR] == patch_digest(load_patch(edited))
    assert "comment" not in cube["thw_70"].attrs


# --- per-dataset reuse fingerprints --------------------------------------------------------


def spec_with(name: str, **changes):
    variables = [v.model_copy(update=changes) if v.name == name else v for v in SPEC.variables]
    return SPEC.model_copy(update={"variables": variables})


@pytest.fixture(scope="module")
def current_cube(tmp_path_factory) -> Path:
    """A per-dataset cube (`--datasets-only`: a local folder) carrying the fingerprint of
    `fetched()` with SPEC on GRID."""
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
    assert dataset_is_current(current_cube, SPEC.at_version("2.0.0"), fetched(), GRID)


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


def test_a_source_written_into_a_version_is_current_there_and_leaves_the_others_alone(
    tmp_path,
):
    """`write_zarr_split`: the source's metadata (markers last) in `.inputs/`, its chunks in
    the version's cube and levels; rewriting it replaces its own chunks only."""
    location = StoreLocation.local(tmp_path / "bucket")
    write_sources(location, DRAFT, {"magnetic_anomaly": 1, "curie_depth_200km": 1})
    into = InVersion(location, DRAFT, "magnetic_anomaly")
    assert into.url == location.url(DRAFT.cube)
    assert dataset_is_current(into, SPEC, source_fetched("magnetic_anomaly"), GRID)
    assert not dataset_is_current(into, SPEC, source_fetched("magnetic_anomaly", 2), GRID)
    assert not dataset_is_current(
        into, SPEC, source_fetched("magnetic_anomaly", 1), dataclasses.replace(GRID, chunk_size=128)
    )
    for key in (DRAFT.input_key("magnetic_anomaly"), DRAFT.input_levels_key("magnetic_anomaly")):
        stored = remote_files(location, key)
        assert ".zmetadata" in stored or ".zlevels" in stored, key
        assert variable_chunks(stored) == [], key
    cube = Path(location.path(DRAFT.cube))
    curie = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cube / "curie_depth_200km").iterdir()
    }
    magnetic = {name: p.read_bytes() for name, p in chunk_files(cube / "magnetic_anomaly").items()}
    assert curie and len(magnetic) == 9
    (cube / "magnetic_anomaly" / "7.7").write_bytes(b"a chunk of an earlier write")

    write_sources(location, DRAFT, {"magnetic_anomaly": 2})  # the source rebuilt
    assert dataset_is_current(into, SPEC, source_fetched("magnetic_anomaly", 2), GRID)
    assert {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cube / "curie_depth_200km").iterdir()
    } == curie
    rewritten = chunk_files(cube / "magnetic_anomaly")
    assert rewritten.keys() == magnetic.keys()  # the stale chunk is gone
    assert all(rewritten[name].read_bytes() != magnetic[name] for name in magnetic)

    Path(into.metadata.path(".zmetadata")).unlink()  # as an interrupted write leaves it
    assert not dataset_is_current(into, SPEC, source_fetched("magnetic_anomaly", 2), GRID)


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
