"""The merge writes metadata only: every source's build wrote its chunks straight into the
version's cube, the merge never moves, encodes or decodes one; the merged cube equals the
per-dataset cubes; clear refusals; an interrupted merge is redone; a published version
keeps its bytes when a source is rebuilt into the next one; carrying copies across
devices."""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from fsspec.implementations.local import LocalFileSystem
from numcodecs import Blosc

from polar_cube.cube import target as steps
from polar_cube.cube.carry import carry_sources
from polar_cube.cube.merge import MergeError, merge_inputs, open_inputs
from polar_cube.cube.verify import check_store_layout, stored_stats, variable_stats, verify_cube
from polar_cube.cube.versions import latest_cube, next_version, read_catalog
from polar_cube.dataset import (
    InVersion,
    convert_source,
    describe_dataset,
    resample_layers,
    write_dataset,
)
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.location import StoreLocation, remote_files
from polar_cube.sources.fetch import fetch_source
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.zarr_store import FINGERPRINT_ATTR, encoding_for
from tests.conftest import layer_count

RESOLUTION = 3000.0
CHUNK_SIZE = 256  # 3 x 3 chunks per layer at 3000 m, so there are many chunk objects
# set from the clock when merging: two merges a second apart differ in them
TIMESTAMPED = ("date_created", "date_modified", "date_metadata_modified", "history")


def build_inputs(standins: Path, spec, grid: TargetGrid, work: Path) -> dict[str, xr.Dataset]:
    """The per-dataset cubes of the stand-ins as the build flow describes them (no
    Prefect), loaded: {source id: dataset}."""
    datasets = {}
    with serving_mirror(standins) as mirror:
        for source in spec.sources:
            fetched = fetch_source(source, work / "cache", mirror=mirror)
            converted = convert_source(spec, fetched)
            dataset = describe_dataset(
                resample_layers(converted, grid), spec, fetched, converted, grid
            )
            datasets[source.id] = dataset.load()
    return datasets


def write_inputs(
    datasets: dict[str, xr.Dataset], location: StoreLocation, keys: VersionKeys, grid
) -> None:
    """Each per-dataset cube written straight into the version `keys`, as `build-cube`
    writes it (`InVersion`: chunks into the cube and levels, metadata into `.inputs/`)."""
    for source_id, dataset in datasets.items():
        write_dataset(dataset, InVersion(location, keys, source_id), grid)


def chunk_objects(location: StoreLocation, key: str, variable: str) -> dict[str, bytes]:
    """{chunk name: stored bytes} of a variable of the zarr at `key`."""
    base = location.path(key, variable)
    names = [p.rsplit("/", 1)[-1] for p in location.fs.find(base)]
    return {n: location.fs.cat_file(f"{base}/{n}") for n in names if not n.startswith(".")}


def chunk_files(location: StoreLocation, keys: VersionKeys, spec) -> dict[Path, tuple]:
    """{file: (inode, mtime, bytes)} of every chunk of the spec's variables in the version's
    cube and levels."""
    found = {}
    for key in (keys.cube, *(f"{keys.levels}/{p.name}" for p in levels_of(location, keys))):
        for variable in spec.variables:
            for path in Path(location.path(key, variable.name)).glob("[0-9]*"):
                stat = path.stat()
                found[path] = (stat.st_ino, stat.st_mtime_ns, path.read_bytes())
    return found


def levels_of(location: StoreLocation, keys: VersionKeys) -> list[Path]:
    return sorted(Path(location.path(keys.levels)).glob("*.zarr"))


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


def fail_writes_after(monkeypatch, count: int, under: str) -> list[str]:
    """Make the `count`+1-th object written below the path `under` fail (a lost
    connection); returns the paths written until then."""
    written = []
    original = LocalFileSystem.pipe_file

    def write_then_fail(self, path, value, *args, **kwargs):
        if str(path).startswith(under):
            if len(written) == count:
                raise ConnectionError(f"connection lost (simulated) after {count} objects")
            written.append(str(path))
        return original(self, path, value, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", write_then_fail)
    return written


def copy_store(template: StoreLocation, root: Path) -> StoreLocation:
    shutil.copytree(template.root, root)
    return StoreLocation.local(root)


@pytest.fixture(scope="module")
def spec(repo_spec_path):
    return load_spec(repo_spec_path)


@pytest.fixture(scope="module")
def grid(spec):
    return dataclasses.replace(TargetGrid.from_spec(spec, RESOLUTION), chunk_size=CHUNK_SIZE)


@pytest.fixture(scope="module")
def keys(spec) -> VersionKeys:
    return VersionKeys(spec.data_id)


@pytest.fixture(scope="module")
def datasets(small_standins, spec, grid, tmp_path_factory):
    return build_inputs(small_standins, spec, grid, tmp_path_factory.mktemp("merge"))


@pytest.fixture(scope="module")
def drafted(datasets, keys, grid, tmp_path_factory) -> StoreLocation:
    """Every per-dataset cube written into the first version, nothing merged (a template)."""
    location = StoreLocation.local(tmp_path_factory.mktemp("merge-draft") / "store")
    write_inputs(datasets, location, keys, grid)
    return location


@pytest.fixture
def location(drafted, tmp_path) -> StoreLocation:
    return copy_store(drafted, tmp_path / "store")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_stats_of_the_writing_pass_equal_a_full_recomputation(drafted, keys, datasets, spec):
    """Every stand-in's per-dataset cube: the statistics stored in its metadata while its
    chunks were written into the version are those computed again from its data, for every
    variable and time step."""
    compared = 0
    for source_id, dataset in datasets.items():
        key = keys.input_key(source_id)
        metadata = xr.open_zarr(drafted.mapper(key), consolidated=True)
        stored, recomputed = stored_stats(metadata, spec, key), variable_stats(dataset, spec)
        assert [(s.name, s.time) for s in stored] == [(s.name, s.time) for s in recomputed]
        for mine, full in zip(stored, recomputed, strict=True):
            assert (mine.units, mine.valid_fraction) == (full.units, full.valid_fraction)
            assert (mine.minimum, mine.maximum) == (full.minimum, full.maximum), mine
            assert mine.mean == (full.mean and pytest.approx(full.mean, rel=1e-12)), mine
        compared += len(stored)
    assert compared == layer_count(spec)


def test_the_merge_writes_metadata_only_and_never_touches_a_chunk(
    location, keys, spec, grid, monkeypatch
):
    before = chunk_files(location, keys, spec)
    assert len(before) > 4 * len(spec.variables)
    for variable in spec.variables:  # every variable has chunks there, its input none
        assert chunk_objects(location, keys.cube, variable.name), variable.name
        stored = remote_files(location, keys.input_key(variable.source), variable.name)
        assert stored and all(is_metadata(k) for k in stored), variable.name
    refuse_chunk_codec(monkeypatch)
    staged = steps.stage_merged_cube(location, spec, grid)
    assert (staged.key, staged.levels_key) == (keys.cube, keys.levels) and not staged.reused
    assert chunk_files(location, keys, spec) == before  # same files, times and bytes
    with pytest.raises(AssertionError, match="decoded"):  # the guard above was live
        steps.open_cube(location, staged.key)["magnetic_anomaly"].load()


def test_merged_cube_equals_the_per_dataset_cubes_and_passes_the_checks(
    location, keys, spec, grid, datasets
):
    staged = steps.stage_merged_cube(location, spec, grid)
    where = location.url(staged.key)
    check_store_layout(location.mapper(staged.key), where)
    merged = steps.open_cube(location, staged.key)
    verify_cube(merged, spec, grid, where)
    assert merged.attrs[FINGERPRINT_ATTR] == staged.fingerprint
    assert "spatial_ref" not in merged.variables
    assert {merged[v.name].attrs["grid_mapping"] for v in spec.variables} == {"crs"}
    # the merge of the inputs' metadata, with the values of the per-dataset cubes as built
    expected = merge_inputs(open_inputs(location, spec, keys), spec, grid)
    for variable in spec.variables:
        values = datasets[variable.source][variable.name].values.astype("float32")
        expected[variable.name] = expected[variable.name].copy(data=values)
        assert np.isfinite(values).any(), variable.name
    for name in TIMESTAMPED:
        assert merged.attrs.pop(name)[:4] == expected.attrs.pop(name)[:4]
    xr.testing.assert_identical(merged.load(), expected)


def rewrite_input(location: StoreLocation, keys: VersionKeys, dataset, change) -> None:
    """Write, in place of a source's metadata in the version, the metadata another writer
    gives `dataset` with `change(dataset, encoding)` (its chunks with it, the cube's stay)."""
    dataset = dataset.copy()
    encoding = encoding_for(dataset, CHUNK_SIZE)
    dataset = change(dataset, encoding) or dataset
    key = keys.input_key(dataset.attrs["polar_cube_source_id"])
    location.fs.rm(location.path(key), recursive=True)
    dataset.to_zarr(
        location.mapper(key), mode="w", zarr_format=2, consolidated=True, encoding=encoding
    )


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
            "{inputs}/magnetic_anomaly.zarr: magnetic_anomaly: compressor "
            "blosc(cname=zstd, clevel=3, shuffle=1, blocksize=0), "
            "the cube's is blosc(cname=lz4, clevel=7, shuffle=1, blocksize=0)",
        ),
        (
            "magnetic_anomaly",
            float64,
            "{inputs}/magnetic_anomaly.zarr: magnetic_anomaly: dtype <f8 (float64), "
            "the cube's is <f4 (float32)",
        ),
        (
            "magnetic_anomaly",
            nodata_fill,
            "{inputs}/magnetic_anomaly.zarr: magnetic_anomaly: fill_value -9999.0, "
            "the cube's is NaN",
        ),
        (
            "ice_thickness_cryosmos",
            other_time_axis,
            "{inputs}/ice_thickness_cryosmos.zarr: time axis (1 step: 2019-01-01) differs from "
            "{inputs}/subglacial_lakes_thwaites.zarr's (2 steps: 2013-01-01, 2017-01-01)",
        ),
        (
            "subglacial_lakes_thwaites",
            without_thw_124,
            "inputs lack spec variable(s): thw_124 (in {inputs}/subglacial_lakes_thwaites.zarr)",
        ),
    ],
    ids=["codec", "dtype", "fill value", "time axis", "variable"],
)
def test_incompatible_input_is_refused_before_anything_is_written(
    location, keys, datasets, spec, grid, source_id, change, message
):
    rewrite_input(location, keys, datasets[source_id], change)
    with pytest.raises(MergeError) as refused:
        steps.stage_merged_cube(location, spec, grid)
    message = message.format(inputs=keys.inputs)
    if not message.startswith("inputs lack"):
        message = f"inputs cannot be merged chunk for chunk:\n  {message}"
    assert str(refused.value) == message
    for key in (keys.cube, keys.levels):  # the sources' chunks, and no metadata at all
        stored = remote_files(location, key)
        assert stored and not [k for k in stored if is_metadata(k)], key


def test_interrupted_merge_is_not_complete_and_a_rerun_completes_it(
    location, keys, spec, grid, monkeypatch
):
    chunks = chunk_files(location, keys, spec)
    written = fail_writes_after(monkeypatch, 20, location.path(keys.cube))
    with pytest.raises(ConnectionError, match="simulated"):
        steps.stage_merged_cube(location, spec, grid)
    assert len(written) == 20 and all(Path(path).is_file() for path in written)
    assert not location.exists(keys.cube, ".zmetadata")
    group = json.loads(Path(location.path(keys.cube, ".zattrs")).read_text())
    assert "title" not in group and FINGERPRINT_ATTR not in group  # they come last
    assert FINGERPRINT_ATTR not in steps.zarr_attrs(location, keys.cube)

    monkeypatch.undo()
    staged = steps.stage_merged_cube(location, spec, grid)
    assert staged.key == keys.cube and not staged.reused  # the partial one was not taken as done
    assert steps.zarr_attrs(location, keys.cube)[FINGERPRINT_ATTR] == staged.fingerprint
    assert chunk_files(location, keys, spec) == chunks
    assert steps.stage_merged_cube(location, spec, grid).reused


def publish(location: StoreLocation, spec, grid) -> None:
    staged = steps.stage_merged_cube(location, spec, grid)
    steps.publish_staged_cube(location, spec, staged, {})


def test_a_published_version_keeps_its_bytes_when_a_source_is_rebuilt_into_the_next(
    location, keys, spec, grid, datasets
):
    publish(location, spec, grid)
    original = {v.name: chunk_objects(location, keys.cube, v.name) for v in spec.variables}
    values = steps.open_cube(location, keys.cube)["magnetic_anomaly"].values

    following = spec.at_version(next_version(read_catalog(location, spec.series), spec.version))
    new = VersionKeys(following.data_id)
    rebuilt = datasets["magnetic_anomaly"].copy()
    data = rebuilt["magnetic_anomaly"]
    rebuilt["magnetic_anomaly"] = data.copy(data=data.values + 1)
    rebuilt.attrs[FINGERPRINT_ATTR] = "rebuilt"
    write_dataset(rebuilt, InVersion(location, new, "magnetic_anomaly"), grid)
    unchanged = {s.id: keys for s in spec.sources if s.id != "magnetic_anomaly"}
    carry_sources(location, following, unchanged, new)
    publish(location, following, grid)
    assert latest_cube(location, spec.series) == new.cube != keys.cube

    replaced = chunk_objects(location, new.cube, "magnetic_anomaly")
    assert replaced.keys() == original["magnetic_anomaly"].keys()
    assert all(replaced[name] != original["magnetic_anomaly"][name] for name in replaced)
    for name, chunks in original.items():  # the published version is as it was
        assert chunk_objects(location, keys.cube, name) == chunks, name
        if name != "magnetic_anomaly":  # the carried ones: the same bytes
            assert chunk_objects(location, new.cube, name) == chunks, name
    np.testing.assert_array_equal(
        steps.open_cube(location, keys.cube)["magnetic_anomaly"].values, values
    )
    np.testing.assert_array_equal(
        steps.open_cube(location, new.cube)["magnetic_anomaly"].values, values + 1
    )


def test_carrying_into_another_device_gets_file_copies(location, keys, spec, grid):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(location.root).stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to carry across")
    publish(location, spec, grid)
    following = spec.at_version(next_version(read_catalog(location, spec.series), spec.version))
    new = VersionKeys(following.data_id)
    with tempfile.TemporaryDirectory(dir=shm) as other_device:
        for key in (new.cube, new.levels, new.inputs):
            Path(other_device, key).mkdir()
            Path(location.path(key)).symlink_to(Path(other_device, key))
        copied = carry_sources(location, following, {s.id: keys for s in spec.sources}, new)
        assert copied > 4 * len(spec.variables)
        for variable in spec.variables:
            expected = chunk_objects(location, keys.cube, variable.name)
            assert chunk_objects(location, new.cube, variable.name) == expected
            for name in expected:
                carried = Path(location.path(new.cube, variable.name, name)).resolve()
                assert carried.stat().st_dev == shm.stat().st_dev
                assert carried.stat().st_nlink == 1
        publish(location, following, grid)
        old, carried = steps.open_cube(location, keys.cube), steps.open_cube(location, new.cube)
        for variable in spec.variables:
            xr.testing.assert_identical(old[variable.name], carried[variable.name])
