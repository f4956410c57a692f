"""`polar-cube build --zarr-format 3 --shards N` (issue 20, item 4): the 3 km cube built from
the small stand-ins into a local folder as zarr 2 (the default) and as zarr 3 (its own
series `…-zarr3-shards4-v1.1.0.zarr`, shards of 4 × 4 chunks written by `zarr3_shards`,
unsharded zarr 3 levels): the same values, fewer objects, read by xarray and xcube (cube
and levels), listed by the catalog; an unchanged rerun publishes nothing."""

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube.integrity import deep_verify, read_manifest, repair_version
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec, zarr_layout
from tests.conftest import REPO

RESOLUTION = 3000.0
SHARDS = 4


# --- fast: names and layouts ---------------------------------------------------------------


def test_a_zarr3_build_is_its_own_series(repo_spec_path):
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    assert spec.at_format(2) == spec  # the default names nothing new
    zarr3 = spec.at_format(3, SHARDS)
    assert zarr3.data_id == f"polar-3km-1x2048x2048-zarr3-shards4-v{spec.version}.zarr"
    assert zarr3.series == "polar-3km-1x2048x2048-zarr3-shards4"
    assert zarr3.at_version("1.1.7").data_id == "polar-3km-1x2048x2048-zarr3-shards4-v1.1.7.zarr"
    assert zarr3.zarr_layout == (3, 4) and spec.zarr_layout == (2, None)
    assert spec.at_format(3).series.endswith("-zarr3-shards4")  # 4 by default
    keys = VersionKeys(zarr3.data_id)
    for key in (keys.cube, keys.levels, keys.input_key("a"), f"{keys.levels}/1.zarr/v/c/0/0"):
        assert zarr_layout(key) == (3, 4)
        assert zarr_layout(f"s3://bucket/cubes/{key}") == (3, 4)
    assert zarr_layout(VersionKeys(spec.data_id).input_key("a")) == (2, None)


def test_shards_only_with_zarr_format_3(repo_spec_path):
    from polar_cube.spec import SpecError

    spec = load_spec(repo_spec_path)
    with pytest.raises(SpecError, match="--shards"):
        spec.at_format(2, 4)
    with pytest.raises(SpecError):
        spec.at_format(3, 0)


def test_zarr3_carry_pattern_matches_shard_keys():
    from polar_cube.cube.carry import _chunk_pattern, metadata_batches

    cube, levels = _chunk_pattern(["v"], levels=False), _chunk_pattern(["v"], levels=True)
    assert cube.fullmatch("v/c/0/1") and cube.fullmatch("v/c/2/0/1") and cube.fullmatch("v/0.1")
    assert not cube.fullmatch("v/zarr.json") and not cube.fullmatch("w/c/0/0")
    assert levels.fullmatch("1.zarr/v/c/0/0") and not levels.fullmatch("1.zarr/v/zarr.json")
    batches = metadata_batches(["zarr.json", "v/zarr.json", "x/c/0", ".zlevels"])
    assert batches == [["x/c/0"], ["v/zarr.json"], ["zarr.json"], [".zlevels"]]


# --- slow: both formats built through Prefect ----------------------------------------------


def count_objects(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def builds(small_standins, repo_spec_path, tmp_path_factory):
    """The 3 km cube built as zarr 2 and as zarr 3 (the same cache), into separate folders
    (their object counts apart), then the zarr 3 one rerun unchanged. (No third, warm-cache
    zarr 2 build only to print its time: ~12 s that asserted nothing; bench/ times builds.)"""
    from polar_cube.flows.build_cube import build_cube

    work = tmp_path_factory.mktemp("zarr3-build")
    results = {}
    with serving_mirror(small_standins) as mirror:
        options = dict(
            spec_path=str(repo_spec_path),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            patch_path=str(REPO / "patch.yaml"),
        )
        zarr3 = {"zarr_format": 3, "shards": SHARDS}
        # the first build downloads the sources (its time includes them), zarr 3's reads the cache
        for name, extra in (("zarr2", {}), ("zarr3", zarr3)):
            started = time.monotonic()
            built = build_cube(output_dir=str(work / name), **options, **extra)
            results[name] = (built, time.monotonic() - started)
        again = build_cube(output_dir=str(work / "zarr3"), zarr_format=3, shards=SHARDS, **options)
    return work, results, again


@pytest.mark.slow
def test_zarr3_cube_is_named_and_listed_as_its_own_series(builds, repo_spec_path):
    work, results, _ = builds
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    zarr2, zarr3 = results["zarr2"][0], results["zarr3"][0]
    assert zarr2.url.endswith(f"/polar-3km-1x2048x2048-v{spec.version}.zarr")
    assert zarr3.url.endswith(f"/polar-3km-1x2048x2048-zarr3-shards4-v{spec.version}.zarr")
    catalog = json.loads(
        (work / "zarr3/polar-3km-1x2048x2048-zarr3-shards4.versions.json").read_text()
    )
    assert catalog["latest"] == spec.version
    assert [v["version"] for v in catalog["versions"]] == [spec.version]
    assert not list((work / "zarr3").glob("polar-3km-1x2048x2048.versions.json"))
    root = json.loads((Path(zarr3.url) / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["consolidated_metadata"]["metadata"]
    for variable in spec.variables:
        meta = json.loads((Path(zarr3.url) / variable.name / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        assert codec["name"] == "sharding_indexed"
        assert codec["configuration"]["chunk_shape"][-2:] == [2048, 2048]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"][-2:] == [8192, 8192]


@pytest.mark.slow
def test_every_value_is_the_same_in_both_formats(builds, repo_spec_path):
    _, results, _ = builds
    spec = load_spec(repo_spec_path)
    zarr2 = xr.open_zarr(results["zarr2"][0].url, consolidated=True)
    zarr3 = xr.open_zarr(results["zarr3"][0].url, consolidated=True, zarr_format=3)
    for variable in spec.variables:
        a, b = zarr2[variable.name], zarr3[variable.name]
        assert a.dims == b.dims and a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a.values, b.values, err_msg=variable.name)
        assert a.attrs["units"] == b.attrs["units"]
        assert (
            a.attrs["polar_cube_stats"][0]["valid_cells"]
            == (b.attrs["polar_cube_stats"][0]["valid_cells"])
        )
    for axis in ("x", "y"):
        np.testing.assert_array_equal(zarr2[axis].values, zarr3[axis].values)
    assert zarr3.attrs["title"] == zarr2.attrs["title"]  # the patch applied


@pytest.mark.slow
def test_levels_are_the_same_in_both_formats(builds, repo_spec_path):
    _, results, _ = builds
    spec = load_spec(repo_spec_path)
    levels = {
        name: Path(built.url).with_name(Path(built.url).name.replace(".zarr", ".levels"))
        for name, (built, _) in results.items()
    }
    for level in sorted(p.name for p in levels["zarr2"].glob("*.zarr")):
        a = xr.open_zarr(levels["zarr2"] / level, consolidated=True)
        b = xr.open_zarr(levels["zarr3"] / level, consolidated=True, zarr_format=3)
        for variable in spec.variables:
            np.testing.assert_array_equal(a[variable.name].values, b[variable.name].values)


@pytest.mark.slow
def test_xcube_opens_the_zarr3_cube_and_its_levels(builds, repo_spec_path):
    from xcube.core.store import new_data_store

    _, results, _ = builds
    spec = load_spec(repo_spec_path)
    url = Path(results["zarr3"][0].url)
    store = new_data_store("file", root=str(url.parent))
    cube = store.open_data(url.name)
    assert {v.name for v in spec.variables} <= set(cube.data_vars)
    levels_name = url.name.replace(".zarr", ".levels")
    levels = store.open_data(levels_name, data_type="mldataset")
    assert levels.num_levels >= 2
    finest, coarsest = levels.get_dataset(0), levels.get_dataset(levels.num_levels - 1)
    name = spec.variables[0].name
    np.testing.assert_array_equal(finest[name].values, cube[name].values)
    assert coarsest[name].shape[-1] < finest[name].shape[-1]
    assert np.isfinite(coarsest[name].values).any()


@pytest.mark.slow
def test_zarr3_has_fewer_objects(builds):
    work, results, _ = builds
    counts = {name: count_objects(work / name) for name in ("zarr2", "zarr3")}
    cubes = {name: count_objects(Path(built.url)) for name, (built, _) in results.items()}
    timings = {name: round(seconds, 1) for name, (_, seconds) in results.items()}  # 3 km
    print(f"objects (all / cube): {counts} / {cubes}; build seconds: {timings}")
    assert cubes["zarr3"] < cubes["zarr2"]
    assert counts["zarr3"] < counts["zarr2"]


@pytest.mark.slow
def test_an_unchanged_zarr3_rerun_publishes_nothing(builds):
    work, results, again = builds
    first = results["zarr3"][0]
    assert again.reused and again.url == first.url and again.version == first.version
    stems = {
        found.group(1)
        for p in (work / "zarr3").iterdir()
        if (found := re.match(r"(.*-v\d+\.\d+\.\d+)\.", p.name))
    }
    assert stems == {Path(first.url).name.removesuffix(".zarr")}


# --- slow: zarr 3 into a bucket (SeaweedFS) ------------------------------------------------

BUCKET_BLOCK = "polar-zarr3-bucket"  # its own block and folder: other tests' stay theirs


@pytest.fixture(scope="module")
def in_bucket(builds, s3_server, small_standins, repo_spec_path):
    from polar_cube.flows.build_cube import build_cube
    from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks

    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-zarr3-credentials",
        bucket_name="polar-test",
        bucket_folder="zarr3-cubes",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    options = storage_options_from_blocks(load_bucket(BUCKET_BLOCK))
    work = builds[0]
    with serving_mirror(small_standins) as mirror:
        built = build_cube(
            spec_path=str(repo_spec_path),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            patch_path=str(REPO / "patch.yaml"),
            bucket_block=BUCKET_BLOCK,
            zarr_format=3,
            shards=SHARDS,
        )
    return built, options


@pytest.mark.slow
def test_zarr3_cube_in_a_bucket_equals_the_local_one(in_bucket, builds, repo_spec_path):
    import fsspec
    from xcube.core.store import new_data_store

    built, options = in_bucket
    spec = load_spec(repo_spec_path)
    name = Path(builds[1]["zarr3"][0].url).name
    assert built.url == f"s3://polar-test/zarr3-cubes/{name}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    keys = [k.removeprefix(f"polar-test/zarr3-cubes/{name}/") for k in fs.find(built.url)]
    assert all(re.fullmatch(r"[a-z0-9_]+/c(/\d+)+|([a-z0-9_]+/)?zarr.json", k) for k in keys)
    local = xr.open_zarr(builds[1]["zarr3"][0].url, consolidated=True)
    remote = xr.open_zarr(built.url, consolidated=True, storage_options=options)
    store = new_data_store("s3", root="polar-test/zarr3-cubes", storage_options=options)
    from_xcube = store.open_data(name)
    levels = store.open_data(name.replace(".zarr", ".levels"), data_type="mldataset")
    assert levels.num_levels >= 2
    for variable in spec.variables:
        expected = local[variable.name].values
        np.testing.assert_array_equal(remote[variable.name].values, expected)
        np.testing.assert_array_equal(from_xcube[variable.name].values, expected)


def test_cli_passes_the_format_on_and_refuses_shards_without_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from polar_cube.cli import app
    from polar_cube.spec import SpecError

    calls, printed = [], []

    def fake_build_cube(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(url=str(tmp_path / "cube.zarr"))

    monkeypatch.setattr("polar_cube.flows.build_cube.build_cube", fake_build_cube)
    monkeypatch.setattr(app, "_print_cube", lambda *a, **k: printed.append(k["series"]))
    common = ["build", "--resolution", "3000", "--output", str(tmp_path / "out")]
    common += ["--cache", str(tmp_path / "cache"), "--spec", str(REPO / "cube.geojson")]
    common += ["--patch", str(REPO / "patch.yaml")]
    parser = app.make_parser()
    with pytest.raises(SpecError, match="--shards"):
        app.cmd_build(parser.parse_args([*common, "--shards", "4"]))
    assert app.cmd_build(parser.parse_args([*common, "--zarr-format", "3", "--shards", "2"])) == 0
    assert calls[-1]["zarr_format"] == 3 and calls[-1]["shards"] == 2
    assert printed[-1] == "polar-3km-1x2048x2048-zarr3-shards2"
    assert app.cmd_build(parser.parse_args(common)) == 0
    assert "zarr_format" not in calls[-1] and printed[-1] == "polar-3km-1x2048x2048"
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--zarr-format", "4"])


@pytest.mark.slow
def test_a_new_patch_publishes_the_next_zarr3_version_carrying_every_shard(
    builds, small_standins, repo_spec_path
):
    """Into a copy of the zarr 3 build (the other tests see one version): every source
    unchanged, so each is carried (hard links) into v1.1.1, merged and patched again;
    v1.1.0 untouched."""
    from polar_cube.flows.build_cube import build_cube

    work, results, _ = builds
    shutil.copytree(work / "zarr3", work / "zarr3-carry")
    first = results["zarr3"][0]
    first_url = str(work / "zarr3-carry" / Path(first.url).name)
    patch = work / "patch-retitled.yaml"
    text = (REPO / "patch.yaml").read_text()
    patch.write_text(text.replace("title: Polar Data Cube", "title: Retitled Polar Data Cube"))
    before = {p: p.stat().st_mtime_ns for p in Path(first_url).rglob("*") if p.is_file()}
    with serving_mirror(small_standins) as mirror:
        second = build_cube(
            spec_path=str(repo_spec_path),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            patch_path=str(patch),
            output_dir=str(work / "zarr3-carry"),
            zarr_format=3,
            shards=SHARDS,
        )
    assert not second.reused and second.version == "1.1.1"
    assert second.url.endswith("-zarr3-shards4-v1.1.1.zarr")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the published one untouched
    old, new = Path(first_url), Path(second.url)
    shards = [p.relative_to(old) for p in old.rglob("c/*/*") if p.is_file()]
    assert shards and all((new / s).samefile(old / s) for s in shards)  # hard links
    cube = xr.open_zarr(second.url, consolidated=True)
    assert cube.attrs["title"].startswith("Retitled")
    earlier = xr.open_zarr(first_url, consolidated=True)
    for variable in load_spec(repo_spec_path).variables:
        np.testing.assert_array_equal(cube[variable.name].values, earlier[variable.name].values)
    catalog = json.loads((old.parent / f"{old.name.split('-v')[0]}.versions.json").read_text())
    assert catalog["latest"] == "1.1.1"
    # the carried shards are in the new version's manifest, as they are stored
    report = deep_verify(StoreLocation.local(work / "zarr3-carry"), VersionKeys(new.name))
    assert not report.problems and report.chunks == len(manifest_keys(work, first_url))


def manifest_keys(work: Path, url: str) -> list[str]:
    keys = VersionKeys(Path(url).name)
    return list(read_manifest(StoreLocation.local(work / "zarr3-carry"), keys))


@pytest.mark.slow
def test_a_flipped_shard_and_a_lost_level_chunk_are_named_and_repaired(
    builds, small_standins, repo_spec_path
):
    """Into a copy of the zarr 3 build: a shard with one flipped byte and a missing level
    chunk are named by deep verification; repair recomputes the shard from the cached
    source and the level chunk from the cube, and every object is the clean build's again."""
    from polar_cube.sources.fetch import fetch_source, needed_files

    work, results, _ = builds
    shutil.copytree(work / "zarr3", work / "zarr3-repair")
    first = results["zarr3"][0]
    keys = VersionKeys(Path(first.url).name)
    folder = work / "zarr3-repair"
    clean = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    shard = folder / keys.cube / "magnetic_anomaly" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x04
    shard.write_bytes(bytes(data))
    level = folder / keys.levels / "1.zarr" / "ice_thickness"
    lost = next(p for p in sorted(level.rglob("*")) if p.is_file() and "c" in p.parts)
    lost.unlink()
    location = StoreLocation.local(folder)
    lines = [p.line(location, keys) for p in deep_verify(location, keys).problems]
    assert len(lines) == 2
    assert lines[0].startswith("ice_thickness: level 1 chunk ") and " missing: " in lines[0]
    assert re.match(r"magnetic_anomaly: chunk 0\.0 damaged \(sha256 ", lines[1])
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION).at_format(3, SHARDS)
    spec = spec.at_version(first.version)
    with serving_mirror(small_standins) as mirror:

        def fetch(source):
            files = needed_files(spec, source.id)
            return fetch_source(source, work / "cache", mirror=mirror, files=files)

        report, repaired = repair_version(location, spec, TargetGrid.from_spec(spec), fetch)
    assert len(repaired) == 2 and not report.problems
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after.keys() == clean.keys() and after == clean
