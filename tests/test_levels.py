"""Overview levels written by the sources' builds straight into the version and merged
(metadata only): xcube opens the published `<stem>.levels`, their chunks are the builds'
writes, never decoded, an interrupted merge is redone, and the report reads only metadata
and levels."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube import target as steps
from polar_cube.cube.merge import MergeError
from polar_cube.cube.report import make_report
from polar_cube.cube.verify import levels_problems, stored_stats, variable_stats
from polar_cube.dataset import InVersion, write_dataset
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.location import StoreLocation, remote_files
from polar_cube.zarr_store import add_grid_coords
from tests.conftest import layer_count
from tests.test_merge import chunk_files, fail_writes_after, refuse_chunk_codec
from tests.test_verify import SPEC, TIMES, field
from tests.test_writing_pass import reference_halving

GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 1500, 256)  # 1302 x 1414: 3 levels
KEYS = VersionKeys(SPEC.data_id)
STEM = KEYS.stem
LEVEL_SHAPES = [(1414, 1302), (707, 651), (354, 326)]


def source_dataset(source_id: str) -> xr.Dataset:
    """A per-dataset cube of one source's variables, as the pipeline describes it."""
    variables = {}
    for variable in SPEC.variables_of(source_id):
        if variable.dims[0] == "time":
            data = np.stack([field(variable.name, step, GRID) for step in range(len(TIMES))])
        else:
            data = field(variable.name, grid=GRID)
        attrs = {"units": variable.units, "long_name": variable.long_name, **variable.attrs}
        attrs["source_sha256"] = f"{source_id}-sha256"
        variables[variable.name] = (variable.dims, data, attrs)
    coords = (
        {"time": TIMES} if any(v.dims[0] == "time" for v in SPEC.variables_of(source_id)) else {}
    )
    dataset = add_grid_coords(xr.Dataset(variables, coords=coords), GRID)
    dataset.attrs = {
        "source": f"https://example.org/{source_id}",
        "polar_cube_inputs_sha256": source_id,
    }
    return dataset


@pytest.fixture(scope="module")
def drafted(tmp_path_factory) -> StoreLocation:
    """Every source written into the first version, nothing merged (a template)."""
    location = StoreLocation.local(tmp_path_factory.mktemp("levels-draft") / "store")
    for source in SPEC.sources:
        write_dataset(source_dataset(source.id), InVersion(location, KEYS, source.id), GRID)
    return location


def copied(drafted: StoreLocation, root: Path) -> StoreLocation:
    shutil.copytree(drafted.root, root)
    return StoreLocation.local(root)


def publish(location: StoreLocation) -> None:
    steps.publish_staged_cube(location, SPEC, steps.stage_merged_cube(location, SPEC, GRID), {})


@pytest.fixture(scope="module")
def published(drafted, tmp_path_factory) -> StoreLocation:
    location = copied(drafted, tmp_path_factory.mktemp("levels-store") / "store")
    publish(location)
    return location


def test_xcube_opens_the_published_levels(published):
    from xcube.core.store import new_data_store

    levels = new_data_store("file", root=published.root).open_data(
        f"{STEM}.levels", data_type="mldataset"
    )
    assert levels.num_levels == 3
    shapes = [levels.get_dataset(i)["magnetic_anomaly"].shape for i in range(3)]
    assert shapes == LEVEL_SHAPES
    assert [levels.get_dataset(i)["thw_70"].shape for i in range(3)] == [
        (2, *shape) for shape in LEVEL_SHAPES
    ]
    cube = xr.open_zarr(published.path(SPEC.data_id), consolidated=True)
    level_0, level_1 = levels.get_dataset(0), levels.get_dataset(1)
    np.testing.assert_array_equal(level_0["ice_thickness"].values, cube["ice_thickness"].values)
    for name in ("magnetic_anomaly", "ice_thickness", "supraglacial_lakes"):
        expected = reference_halving(cube[name].values, categorical=name == "supraglacial_lakes")
        np.testing.assert_allclose(level_1[name].values, expected, rtol=1e-6, equal_nan=True)
    for step in range(2):
        expected = reference_halving(cube["thw_70"].isel(time=step).values, categorical=True)
        np.testing.assert_array_equal(level_1["thw_70"].isel(time=step).values, expected)
    for axis in ("x", "y"):  # the centres of the 2 x 2 windows
        np.testing.assert_allclose(level_1[axis].values, cube[axis].coarsen({axis: 2}).mean())


def test_the_published_levels_are_the_builds_chunks_never_decoded_nor_moved(
    drafted, tmp_path, monkeypatch
):
    location = copied(drafted, tmp_path / "store")
    before = chunk_files(location, KEYS, SPEC)
    level_chunks = [path for path in before if ".levels/" in str(path)]
    assert {path.parent.parent.name for path in level_chunks} == {"1.zarr", "2.zarr"}
    assert len(level_chunks) > 2 * len(SPEC.variables)
    refuse_chunk_codec(monkeypatch)
    publish(location)
    assert chunk_files(location, KEYS, SPEC) == before  # same files, times and bytes
    for source in SPEC.sources:  # the sources' levels in `.inputs/` hold no chunk
        stored = remote_files(location, KEYS.input_levels_key(source.id))
        names = {v.name for v in SPEC.variables_of(source.id)}
        assert ".zlevels" in stored and not [
            k for k in stored if not is_metadata(k) and k.split("/")[-2] in names
        ], source.id
    assert (Path(location.root) / f"{STEM}.levels" / "0.link").read_text() == f"../{SPEC.data_id}"
    with pytest.raises(AssertionError, match="decoded"):  # the guard above was live
        xr.open_zarr(location.mapper(KEYS.levels, "1.zarr"))["magnetic_anomaly"].load()


def test_the_published_levels_pass_their_checks_and_problems_are_named(published):
    fingerprint = steps.zarr_attrs(published, SPEC.data_id)["polar_cube_inputs_sha256"]
    mapper = published.mapper(f"{STEM}.levels")
    options = dict(fingerprint=fingerprint, cube_name=SPEC.data_id)
    assert levels_problems(mapper, SPEC, GRID, **options) == []
    broken = dict(mapper.items())
    broken["0.link"] = b"../elsewhere.zarr"
    del broken["2.zarr/.zmetadata"]
    assert levels_problems(broken, SPEC, GRID, **options) == [
        f"0.link: '../elsewhere.zarr', expected '../{SPEC.data_id}'",
        "2.zarr: missing or without consolidated metadata",
    ]
    del broken[".zlevels"]
    assert levels_problems(broken, SPEC, GRID, **options) == [
        ".zlevels: missing, the overview levels are not complete"
    ]


def test_an_interrupted_levels_merge_is_redone(drafted, tmp_path, monkeypatch):
    location = copied(drafted, tmp_path / "store")
    written = fail_writes_after(monkeypatch, 50, location.path(KEYS.levels))
    with pytest.raises(ConnectionError, match="simulated"):
        steps.stage_merged_cube(location, SPEC, GRID)
    monkeypatch.undo()
    assert len(written) == 50 and location.exists(KEYS.levels, "1.zarr", ".zmetadata")
    assert not location.exists(KEYS.levels, "2.zarr", ".zmetadata")
    assert steps.levels_fingerprint(location, KEYS.levels) is None  # not taken as complete
    fingerprint = steps.zarr_attrs(location, KEYS.cube)["polar_cube_inputs_sha256"]

    staged = steps.stage_merged_cube(location, SPEC, GRID)
    assert staged.levels_key == KEYS.levels and not staged.reused
    assert staged.fingerprint == fingerprint
    assert steps.levels_fingerprint(location, KEYS.levels) == fingerprint
    assert steps.stage_merged_cube(location, SPEC, GRID).reused


def test_inputs_without_their_levels_are_refused(drafted, tmp_path):
    location = copied(drafted, tmp_path / "store")
    Path(location.path(KEYS.input_levels_key("magnetic_anomaly"), ".zlevels")).unlink()
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(location, SPEC, GRID)
    assert str(refused.value) == (
        f"{location.url(KEYS.input_levels_key('magnetic_anomaly'))}: overview levels missing, "
        f"incomplete or not from the build of {location.url(KEYS.input_key('magnetic_anomaly'))}"
        "; build it again (`polar-cube build` without --only)"
    )
    assert not location.exists(KEYS.cube, ".zmetadata")


def test_the_report_reads_metadata_and_levels_never_the_full_cube(published, tmp_path):
    location = copied(published, tmp_path / "store")
    cube = steps.open_cube(location, SPEC.data_id)
    recomputed = variable_stats(cube, SPEC)
    corrupted = 0
    for variable in SPEC.variables:  # any read of a full-resolution chunk now fails
        for chunk in Path(location.path(SPEC.data_id, variable.name)).glob("[0-9]*"):
            chunk.write_bytes(b"not a blosc frame")
            corrupted += 1
    assert corrupted > len(SPEC.variables)
    with pytest.raises(RuntimeError):  # the guard above is live
        steps.open_cube(location, SPEC.data_id)["magnetic_anomaly"].load()

    report = make_report(location, SPEC)
    assert [(s.name, s.time) for s in report.stats] == [(s.name, s.time) for s in recomputed]
    for mine, full in zip(report.stats, recomputed, strict=True):
        assert (mine.valid_fraction, mine.minimum, mine.maximum) == (
            full.valid_fraction,
            full.minimum,
            full.maximum,
        )
        assert mine.mean == pytest.approx(full.mean, rel=1e-12)
    assert len(report.quicklooks) == layer_count(SPEC)
    for url in report.quicklooks:
        assert Path(url).read_bytes().startswith(b"\x89PNG")
    assert stored_stats(cube, SPEC, "cube") == report.stats
    record = json.loads(Path(location.path(KEYS.quicklooks, "report.json")).read_text())
    assert record["cube"]["fingerprint"] == cube.attrs["polar_cube_inputs_sha256"]
