"""Overview levels through upload, chunk-copy merge and publish: xcube opens the published
`<stem>.levels`, the merged levels are the inputs' chunk objects, an interrupted merge is
redone, and the report reads only metadata and levels."""

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube import merge
from polar_cube.cube import target as steps
from polar_cube.cube.merge import MergeError
from polar_cube.cube.publish import copy_objects
from polar_cube.cube.report import make_report
from polar_cube.cube.upload import upload_cube
from polar_cube.cube.verify import levels_problems, stored_stats, variable_stats
from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.zarr_store import add_grid_coords, write_zarr_atomically
from tests.conftest import layer_count
from tests.test_merge import chunk_objects, refuse_chunk_codec
from tests.test_verify import SPEC, TIMES, field
from tests.test_writing_pass import reference_halving

GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 1500, 256)  # 1302 x 1414: 3 levels
STEM = SPEC.data_id.removesuffix(".zarr")
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
def datasets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("levels-inputs")
    for source in SPEC.sources:
        write_zarr_atomically(source_dataset(source.id), folder / f"{source.id}.zarr", 256)
    return folder


def uploaded(datasets: Path, root: Path) -> StoreLocation:
    location = StoreLocation.local(root)
    for cube in sorted(datasets.glob("*.zarr")):
        upload_cube(cube, location)
    return location


@pytest.fixture(scope="module")
def published(datasets, tmp_path_factory) -> StoreLocation:
    location = uploaded(datasets, tmp_path_factory.mktemp("levels-store"))
    steps.publish_staged_cube(location, SPEC, steps.stage_merged_cube(location, SPEC, GRID))
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


def test_published_levels_are_the_inputs_chunk_objects_never_decoded(
    datasets, tmp_path, monkeypatch
):
    location = uploaded(datasets, tmp_path / "store")
    refuse_chunk_codec(monkeypatch)
    staged = steps.stage_merged_cube(location, SPEC, GRID)
    steps.publish_staged_cube(location, SPEC, staged)
    copied = 0
    for level in (1, 2):
        for variable in SPEC.variables:
            source = f"inputs/{variable.source}.levels/{level}.zarr"
            expected = chunk_objects(location, source, variable.name)
            target = f"{STEM}.levels/{level}.zarr"
            assert chunk_objects(location, target, variable.name) == expected, variable.name
            for name in expected:
                assert os.path.samefile(
                    location.path(target, variable.name, name),
                    location.path(source, variable.name, name),
                )
            copied += len(expected)
    assert copied > 2 * len(SPEC.variables)
    assert (Path(location.root) / f"{STEM}.levels" / "0.link").read_text() == f"../{SPEC.data_id}"
    assert not list(Path(location.root, ".staging").iterdir())


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


def test_an_interrupted_levels_merge_is_redone(datasets, tmp_path, monkeypatch):
    location = uploaded(datasets, tmp_path / "store")
    copied = []

    def copy_then_fail(where, pairs):
        for pair in pairs:
            if ".levels" in pair[1] and sum(".levels" in t for _, t in copied) == 3:
                raise ConnectionError("connection lost (simulated) in the levels")
            copy_objects(where, [pair])
            copied.append(pair)

    monkeypatch.setattr(merge, "copy_objects", copy_then_fail)
    with pytest.raises(ConnectionError, match="simulated"):
        steps.stage_merged_cube(location, SPEC, GRID)
    monkeypatch.undo()
    fingerprint = steps.current_fingerprint(location, SPEC, GRID)
    levels_key = f".staging/{STEM}.levels.{fingerprint[:16]}"
    assert location.exists(levels_key, "1.zarr")
    assert steps.levels_fingerprint(location, levels_key) is None  # not taken as complete

    staged = steps.stage_merged_cube(location, SPEC, GRID)
    assert staged.levels_key == levels_key and not staged.reused
    assert steps.levels_fingerprint(location, levels_key) == fingerprint
    assert steps.stage_merged_cube(location, SPEC, GRID).reused


def test_inputs_without_their_levels_are_refused(datasets, tmp_path):
    location = uploaded(datasets, tmp_path / "store")
    Path(location.path("inputs/magnetic_anomaly.levels/.zlevels")).unlink()
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(location, SPEC, GRID)
    assert str(refused.value) == (
        f"{location.url('inputs/magnetic_anomaly.levels')}: overview levels missing, incomplete "
        f"or not from the build of {location.url('inputs/magnetic_anomaly.zarr')}; build and "
        "upload it again (`polar-cube build` without --only)"
    )


def test_the_report_reads_metadata_and_levels_never_the_full_cube(datasets, tmp_path):
    location = uploaded(datasets, tmp_path / "store")
    steps.publish_staged_cube(location, SPEC, steps.stage_merged_cube(location, SPEC, GRID))
    cube = steps.open_cube(location, SPEC.data_id)
    recomputed = variable_stats(cube, SPEC)
    corrupted = 0
    for variable in SPEC.variables:  # any read of a full-resolution chunk now fails
        for chunk in Path(location.path(SPEC.data_id, variable.name)).glob("[0-9]*"):
            chunk.unlink()  # a hard link to the input's chunk: replace the name only
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
