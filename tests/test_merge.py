"""The merge copies the inputs' stored chunk objects: byte-identical, never decoded, the same
cube as the decoding merge, clear refusals, kill-safe; publishing keeps the bytes too."""

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from numcodecs import Blosc

from polar_cube.cube import merge
from polar_cube.cube import target as steps
from polar_cube.cube.merge import MergeError, merge_inputs, open_inputs
from polar_cube.cube.publish import copy_objects, staging_key
from polar_cube.cube.upload import upload_cube
from polar_cube.cube.verify import check_store_layout, stored_stats, variable_stats, verify_cube
from polar_cube.dataset import convert_source, describe_dataset, resample_layers, write_dataset
from polar_cube.grid import TargetGrid
from polar_cube.location import StoreLocation
from polar_cube.sources.fetch import fetch_source
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.zarr_store import FINGERPRINT_ATTR, encoding_for, write_zarr_atomically
from tests.conftest import layer_count

RESOLUTION = 3000.0
CHUNK_SIZE = 256  # 3 x 3 chunks per layer at 3000 m, so there are many chunk objects
TIMESTAMPED = ("date_created", "history")


def build_inputs(standins: Path, spec, grid: TargetGrid, work: Path) -> Path:
    """The per-dataset cubes of the stand-ins, made as the build flow makes them (no Prefect)."""
    store = work / "datasets"
    with serving_mirror(standins) as mirror:
        for source in spec.sources:
            fetched = fetch_source(source, work / "cache", mirror=mirror)
            converted = convert_source(spec, fetched)
            dataset = describe_dataset(
                resample_layers(converted, grid), spec, fetched, converted, grid
            )
            write_dataset(dataset, store / f"{source.id}.zarr", grid)
    return store


def chunk_objects(location: StoreLocation, key: str, variable: str) -> dict[str, bytes]:
    """{chunk name: stored bytes} of a variable of the zarr at `key`."""
    base = location.path(key, variable)
    names = [p.rsplit("/", 1)[-1] for p in location.fs.find(base)]
    return {n: location.fs.cat_file(f"{base}/{n}") for n in names if not n.startswith(".")}


def input_chunks(location: StoreLocation, spec, variable) -> dict[str, bytes]:
    return chunk_objects(location, f"inputs/{variable.source}.zarr", variable.name)


def refuse_chunk_codec(monkeypatch) -> None:
    """Make any encode or decode with the chunks' codec (blosc lz4 level 7; coordinates use
    xarray's default, level 5) fail."""
    for method in ("encode", "decode"):
        original = getattr(Blosc, method)

        def guarded(self, *args, _original=original, _method=method, **kwargs):
            if (self.cname, self.clevel) == ("lz4", 7):
                raise AssertionError(f"a chunk was {_method}d")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Blosc, method, guarded)


@pytest.fixture(scope="module")
def spec(repo_spec_path):
    return load_spec(repo_spec_path)


@pytest.fixture(scope="module")
def grid(spec):
    return dataclasses.replace(TargetGrid.from_spec(spec, RESOLUTION), chunk_size=CHUNK_SIZE)


@pytest.fixture(scope="module")
def datasets(small_standins, spec, grid, tmp_path_factory):
    return build_inputs(small_standins, spec, grid, tmp_path_factory.mktemp("merge"))


@pytest.fixture
def location(datasets, tmp_path):
    """A local-folder store with every per-dataset cube uploaded to inputs/."""
    location = StoreLocation.local(tmp_path / "store")
    for cube in sorted(datasets.glob("*.zarr")):
        upload_cube(cube, location)
    return location


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_stats_of_the_writing_pass_equal_a_full_recomputation(datasets, spec):
    """Every stand-in's per-dataset cube: the statistics stored while writing it are those
    computed again from its data, for every variable and time step."""
    compared = 0
    for path in sorted(datasets.glob("*.zarr")):
        cube = xr.open_zarr(path, consolidated=True)
        stored, recomputed = stored_stats(cube, spec, str(path)), variable_stats(cube, spec)
        assert [(s.name, s.time) for s in stored] == [(s.name, s.time) for s in recomputed]
        for mine, full in zip(stored, recomputed, strict=True):
            assert (mine.units, mine.valid_fraction) == (full.units, full.valid_fraction)
            assert (mine.minimum, mine.maximum) == (full.minimum, full.maximum), mine
            assert mine.mean == (full.mean and pytest.approx(full.mean, rel=1e-12)), mine
        compared += len(stored)
    assert compared == layer_count(spec)


def test_merged_chunks_are_the_inputs_bytes_and_never_decoded(location, spec, grid, monkeypatch):
    refuse_chunk_codec(monkeypatch)
    staged = steps.stage_merged_cube(location, spec, grid)
    assert not staged.reused
    copied = 0
    for variable in spec.variables:
        expected = input_chunks(location, spec, variable)
        assert expected, f"{variable.name}: no stored chunk in the input"
        assert chunk_objects(location, staged.key, variable.name) == expected, variable.name
        for name in expected:  # a local folder links them: the very same file
            merged = location.path(staged.key, variable.name, name)
            source = location.path("inputs", f"{variable.source}.zarr", variable.name, name)
            assert os.path.samefile(merged, source)
        copied += len(expected)
    assert copied > 2 * len(spec.variables)
    with pytest.raises(AssertionError, match="decoded"):  # the guard above was live
        steps.open_cube(location, staged.key)["magnetic_anomaly"].load()


def test_merged_cube_equals_the_decoding_merge_and_passes_the_checks(location, spec, grid):
    staged = steps.stage_merged_cube(location, spec, grid)
    where = location.url(staged.key)
    check_store_layout(location.mapper(staged.key), where)
    merged = steps.open_cube(location, staged.key)
    verify_cube(merged, spec, grid, where)
    assert merged.attrs[FINGERPRINT_ATTR] == staged.fingerprint
    assert "spatial_ref" not in merged.variables
    assert {merged[v.name].attrs["grid_mapping"] for v in spec.variables} == {"crs"}
    expected = merge_inputs(open_inputs(location, spec), spec, grid)
    for name in TIMESTAMPED:
        assert merged.attrs.pop(name)[:4] == expected.attrs.pop(name)[:4]
    xr.testing.assert_identical(merged.load(), expected.load())


def rewrite_input(location: StoreLocation, source_id: str, change, work: Path) -> None:
    """Upload, in place of an input, a re-written copy with `change(dataset, encoding)`."""
    dataset = xr.open_zarr(location.mapper(f"inputs/{source_id}.zarr"), consolidated=True)
    dataset = dataset.load()
    encoding = encoding_for(dataset, CHUNK_SIZE)
    dataset = change(dataset, encoding) or dataset
    cube = work / f"{source_id}.zarr"
    dataset.to_zarr(cube, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    upload_cube(cube, location)


def other_codec(dataset, encoding):
    encoding["magnetic_anomaly"]["compressors"] = [Blosc(cname="zstd", clevel=3)]


def float64(dataset, encoding):
    encoding["magnetic_anomaly"]["dtype"] = "float64"


def nodata_fill(dataset, encoding):
    encoding["magnetic_anomaly"]["_FillValue"] = np.float32(-9999)


def other_time_axis(dataset, encoding):
    return dataset.assign_coords(time=np.array(["2019-01-01"], dtype="datetime64[ns]"))


def without_thw_124(dataset, encoding):
    encoding.pop("thw_124")
    return dataset.drop_vars("thw_124")


@pytest.mark.parametrize(
    ("source_id", "change", "message"),
    [
        (
            "magnetic_anomaly",
            other_codec,
            "inputs/magnetic_anomaly.zarr: magnetic_anomaly: compressor "
            "blosc(cname=zstd, clevel=3, shuffle=1, blocksize=0), "
            "the cube's is blosc(cname=lz4, clevel=7, shuffle=1, blocksize=0)",
        ),
        (
            "magnetic_anomaly",
            float64,
            "inputs/magnetic_anomaly.zarr: magnetic_anomaly: dtype <f8 (float64), "
            "the cube's is <f4 (float32)",
        ),
        (
            "magnetic_anomaly",
            nodata_fill,
            "inputs/magnetic_anomaly.zarr: magnetic_anomaly: fill_value -9999.0, the cube's is NaN",
        ),
        (
            "ice_thickness_cryosmos",
            other_time_axis,
            "inputs/ice_thickness_cryosmos.zarr: time axis (1 step: 2019-01-01) differs from "
            "inputs/subglacial_lakes_thwaites.zarr's (2 steps: 2013-01-01, 2017-01-01)",
        ),
        (
            "subglacial_lakes_thwaites",
            without_thw_124,
            "inputs lack spec variable(s): thw_124 (in inputs/subglacial_lakes_thwaites.zarr)",
        ),
    ],
)
def test_incompatible_input_is_refused_before_anything_is_written(
    location, spec, grid, tmp_path, source_id, change, message
):
    rewrite_input(location, source_id, change, tmp_path)
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(location, spec, grid)
    if not message.startswith("inputs lack"):
        message = f"inputs cannot be merged chunk for chunk:\n  {message}"
    assert str(refused.value) == message
    assert [p for p in Path(location.root, ".staging").rglob("*")] == []


def test_interrupted_merge_is_not_complete_and_a_rerun_completes_it(
    location, spec, grid, monkeypatch
):
    copied = []

    def copy_then_fail(where, pairs):
        for pair in pairs:
            if len(copied) == 5:
                raise ConnectionError("connection lost (simulated) after 5 chunks")
            copy_objects(where, [pair])
            copied.append(pair)

    monkeypatch.setattr(merge, "copy_objects", copy_then_fail)
    with pytest.raises(ConnectionError, match="simulated"):
        steps.stage_merged_cube(location, spec, grid)
    key = staging_key(spec.data_id, steps.current_fingerprint(location, spec, grid))
    assert all(Path(target).is_file() for _, target in copied)
    assert not location.exists(key, ".zmetadata")
    assert FINGERPRINT_ATTR not in steps.zarr_attrs(location, key)

    monkeypatch.undo()
    staged = steps.stage_merged_cube(location, spec, grid)
    assert staged.key == key and not staged.reused  # the partial one was not taken as done
    assert steps.zarr_attrs(location, key)[FINGERPRINT_ATTR] == staged.fingerprint
    for variable in spec.variables:
        expected = input_chunks(location, spec, variable)
        assert chunk_objects(location, key, variable.name) == expected, variable.name
    assert steps.stage_merged_cube(location, spec, grid).reused


def test_published_cube_keeps_its_bytes_when_an_input_is_replaced(
    location, spec, grid, datasets, tmp_path
):
    staged = steps.stage_merged_cube(location, spec, grid)
    steps.publish_staged_cube(location, spec, staged)
    magnetic = next(v for v in spec.variables if v.name == "magnetic_anomaly")
    original = input_chunks(location, spec, magnetic)
    assert chunk_objects(location, spec.data_id, "magnetic_anomaly") == original
    values = steps.open_cube(location, spec.data_id)["magnetic_anomaly"].values

    rebuilt = xr.open_zarr(datasets / "magnetic_anomaly.zarr", consolidated=True).load()
    data = rebuilt["magnetic_anomaly"]
    rebuilt["magnetic_anomaly"] = data.copy(data=data.values + 1)
    cube = write_zarr_atomically(rebuilt, tmp_path / "magnetic_anomaly.zarr", CHUNK_SIZE)
    upload_cube(cube, location)

    replaced = input_chunks(location, spec, magnetic)
    assert replaced.keys() == original.keys()
    assert all(replaced[name] != original[name] for name in original)
    assert chunk_objects(location, spec.data_id, "magnetic_anomaly") == original
    published = steps.open_cube(location, spec.data_id)["magnetic_anomaly"].values
    np.testing.assert_array_equal(published, values)


def test_staging_on_another_device_gets_file_copies(location, spec, grid):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(location.root).stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to merge across")
    with tempfile.TemporaryDirectory(dir=shm) as other_device:
        Path(location.root, ".staging").symlink_to(other_device)
        staged = steps.stage_merged_cube(location, spec, grid)
        for variable in spec.variables:
            expected = input_chunks(location, spec, variable)
            assert chunk_objects(location, staged.key, variable.name) == expected
            for name in expected:
                merged = Path(location.path(staged.key, variable.name, name))
                assert merged.stat().st_dev == shm.stat().st_dev and merged.stat().st_nlink == 1
