"""The parent flow end to end into a real S3 server (SeaweedFS): each build writes a new
immutable version (`<series>-vX.Y.Z.zarr`) with every source's chunks written straight into
it, and publishes it by one write of the catalog (`latest`). Build, reopen, refuse wrong
keys, rerun (nothing published), rebuild with another patch (the next version; the old one
untouched), survive kills during merge/patch with `latest` always naming a whole cube."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.storage import StorageAccessError, check_bucket_access
from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks
from tests.conftest import REPO, layer_count
from tests.prefect_api import session_api_env

pytestmark = pytest.mark.slow
RESOLUTION = 3000.0
BUCKET_BLOCK = "polar-test-bucket"
ROOT = "polar-test/cubes"  # the block's bucket and folder
LOCK_FOLDER = ".polar-cube-lock"
FIRST_TITLE = "Polar Data Cube v1.1.0"  # patch.yaml's


@pytest.fixture(scope="module")
def mirror(small_standins):
    with serving_mirror(small_standins) as url:
        yield url


@pytest.fixture(scope="module")
def blocks(s3_server):
    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-test-credentials",
        bucket_name="polar-test",
        bucket_folder="cubes",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return storage_options_from_blocks(load_bucket(BUCKET_BLOCK))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cube-flow")


def build_options(repo_spec_path, work, mirror):
    return dict(
        spec_path=str(repo_spec_path),
        resolution=RESOLUTION,
        source_mirror=mirror,
        cache_dir=str(work / "cache"),
        bucket_block=BUCKET_BLOCK,
    )


def spec_at_resolution(repo_spec_path):
    return load_spec(repo_spec_path).at_resolution(RESOLUTION)


def s3(options):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, **options)


def listing(fs, *prefixes: str) -> dict[str, tuple]:
    """(ETag, LastModified) of every object under the prefixes (below ROOT), or of the
    object a prefix names; the lock folder aside."""
    fs.invalidate_cache()
    found = {}
    for prefix in prefixes:
        path = f"{ROOT}/{prefix}" if prefix else ROOT
        if fs.isfile(path):
            info = fs.info(path)
            found[path] = (info["ETag"], info["LastModified"])
            continue
        for key, info in fs.find(path, detail=True).items():
            if f"/{LOCK_FOLDER}/" not in key:
                found[key] = (info["ETag"], info["LastModified"])
    return found


def catalog(fs, series: str) -> dict:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{ROOT}/{series}.versions.json"))


def stored_stems(fs, series: str) -> set[str]:
    """`<series>-vX.Y.Z` of every version with anything in the bucket."""
    fs.invalidate_cache()
    pattern = re.compile(re.escape(series) + r"-v\d+\.\d+\.\d+")
    stems = set()
    for path in fs.ls(ROOT, detail=False):
        found = re.match(r"(.*-v\d+\.\d+\.\d+)\.", path.rsplit("/", 1)[-1])
        if found and pattern.fullmatch(found.group(1)):
            stems.add(found.group(1))
    return stems


def chunk_etags(fs, keys: VersionKeys) -> dict[str, str]:
    """{key inside the version: ETag} of every chunk object of its cube and levels."""
    found = {}
    for part in (keys.cube, keys.levels):
        for key, (etag, _) in listing(fs, part).items():
            if not is_metadata(key) and re.fullmatch(r"\d+(\.\d+)+", key.rsplit("/", 1)[-1]):
                found[key.removeprefix(f"{ROOT}/{keys.stem}")] = etag
    return found


@pytest.fixture(scope="module")
def built(repo_spec_path, work, mirror, blocks):
    from polar_cube.flows.build_cube import build_cube

    with pytest.MonkeyPatch.context() as patch:  # a per-dataset store, were one used, here
        patch.setattr("polar_cube.flows.build_datasets.DEFAULT_STORE", work / "datasets")
        return build_cube(**build_options(repo_spec_path, work, mirror))


def open_published(url, options):
    return xr.open_zarr(url, consolidated=True, storage_options=options)


def test_whole_cube_is_in_the_bucket_and_opens(built, blocks, repo_spec_path):
    spec = spec_at_resolution(repo_spec_path)
    assert spec.data_id == f"{spec.series}-v1.1.0.zarr"
    assert built.url == f"s3://{ROOT}/{spec.data_id}" and built.url.endswith("-v1.1.0.zarr")
    assert built.version == "1.1.0" and not built.reused
    cube = open_published(built.url, blocks)
    for variable in spec.variables:
        data = cube[variable.name]
        assert data.attrs["units"] == variable.units
        assert data.attrs["grid_mapping"] == "crs"
        assert data.dims == variable.dims and data.dtype == np.float32
    assert cube.attrs["title"] == FIRST_TITLE  # from patch.yaml
    assert cube.attrs["processing_software"].startswith("polar-datacube")  # generated
    assert cube.thw_70.attrs["color_bar_name"] == "GnBu"
    assert "spatial_ref" not in cube.variables
    assert len(built.quicklooks) == layer_count(spec)
    fs = s3(blocks)
    published = catalog(fs, spec.series)
    assert (published["latest"], published["latest_cube"]) == ("1.1.0", spec.data_id)
    assert [v["version"] for v in published["versions"]] == ["1.1.0"]
    keys = VersionKeys(spec.data_id)
    stats = json.loads(fs.cat_file(f"{ROOT}/{keys.quicklooks}/stats.json"))
    assert {s["name"] for s in stats} == {v.name for v in spec.variables}
    assert all(q.startswith(f"s3://{ROOT}/{keys.quicklooks}/") for q in built.quicklooks)
    assert fs.cat_file(built.quicklooks[0].removeprefix("s3://"))[:8] == b"\x89PNG\r\n\x1a\n"
    from polar_cube.cube.stac import validate_stac_item

    assert built.stac_item == f"s3://{ROOT}/{keys.stac_item}"
    item = json.loads(fs.cat_file(built.stac_item.removeprefix("s3://")))
    validate_stac_item(item)
    assert item["assets"]["zarr"]["href"] == built.url


def test_the_chunks_are_written_straight_into_the_version_with_no_local_copy(
    built, blocks, repo_spec_path, work
):
    """Bytes move once: every source's chunks are in the version's cube and levels in the
    bucket, its metadata (no chunk) in `<stem>.inputs/`; no `inputs/` prefix, no staging,
    and no per-dataset cube on this machine."""
    spec = spec_at_resolution(repo_spec_path)
    keys = VersionKeys(spec.data_id)
    fs = s3(blocks)
    assert not fs.exists(f"{ROOT}/inputs") and not fs.exists(f"{ROOT}/.staging")
    assert not fs.exists(f"{ROOT}/sources")  # staged only for a cluster that shares nothing
    assert not [p for p in fs.ls(ROOT, detail=False) if p.rsplit("/", 1)[-1] == "inputs"]
    chunks = chunk_etags(fs, keys)
    for variable in spec.variables:
        assert [k for k in chunks if k.startswith(f".zarr/{variable.name}/")], variable.name
        level_1 = f".levels/1.zarr/{variable.name}/"
        assert [k for k in chunks if k.startswith(level_1)], variable.name
        metadata = listing(fs, keys.input_key(variable.source))
        assert f"{ROOT}/{keys.input_key(variable.source)}/.zmetadata" in metadata
        own = [k for k in metadata if f"/{variable.name}/" in k]
        assert own and all(is_metadata(k) for k in own), variable.name
    # on this machine: the download cache, and no per-dataset cube anywhere (not in a
    # datasets folder: the default store of build-datasets is under `work` here)
    assert {p.name for p in work.iterdir()} == {"cache"}
    assert not [p for p in work.rglob("*") if p.suffix in (".zarr", ".levels")]


def test_xcube_opens_the_published_levels_in_the_bucket(built, blocks, repo_spec_path):
    from xcube.core.store import new_data_store

    stem = VersionKeys(spec_at_resolution(repo_spec_path).data_id).stem
    store = new_data_store("s3", root=ROOT, storage_options=blocks)
    levels = store.open_data(f"{stem}.levels", data_type="mldataset")
    assert levels.num_levels == 2  # 707 x 651 cells; level 1 (354 x 326) fits one tile
    cube = open_published(built.url, blocks)
    level_1 = levels.get_dataset(1)
    assert level_1["thw_70"].shape == (2, 354, 326)
    expected = cube["magnetic_anomaly"].astype("float64").coarsen(y=2, x=2, boundary="pad").mean()
    np.testing.assert_allclose(
        level_1["magnetic_anomaly"].values, expected.values, rtol=1e-6, equal_nan=True
    )
    np.testing.assert_array_equal(
        levels.get_dataset(0)["ice_thickness"].values, cube["ice_thickness"].values
    )


def test_artifacts_are_recorded(built):
    import asyncio

    from prefect import get_client

    async def read(key):
        async with get_client() as client:
            return await client.read_latest_artifacts()

    keys = {a.key for a in asyncio.run(read(None))}
    assert {
        "polar-cube-coverage",
        "polar-cube-summary",
        "polar-cube-published",
        "polar-cube-quicklooks",
        "polar-cube-stac-item",
        "polar-cube-datasets-progress",
    } <= keys


def test_wrong_credentials_are_refused_clearly(s3_server, built):
    options = {
        "key": s3_server.access_key,
        "secret": "not-the-secret",
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url},
    }
    with pytest.raises(StorageAccessError, match="access denied") as raised:
        check_bucket_access(f"s3://{ROOT}", options)
    assert "not-the-secret" not in str(raised.value)
    with pytest.raises(PermissionError):
        open_published(built.url, options).load()


def test_an_unchanged_rerun_reuses_the_published_cube_and_publishes_nothing(
    built, blocks, repo_spec_path, work, mirror
):
    from polar_cube.flows.build_cube import build_cube

    spec = spec_at_resolution(repo_spec_path)
    fs = s3(blocks)
    before = listing(fs, "")
    again = build_cube(**build_options(repo_spec_path, work, mirror))
    assert again.reused and again.url == built.url  # its time is the benchmark's (rerun)
    assert again.version == "1.1.0" and again.stac_item == built.stac_item
    assert stored_stems(fs, spec.series) == {VersionKeys(spec.data_id).stem}  # no new version
    after = listing(fs, "")
    assert after.keys() == before.keys()  # nothing added, nothing removed
    changed = sorted(k for k in before if after[k] != before[k])
    # the catalog and every object of the published (immutable) version as they were
    assert changed == [], f"an unchanged rerun rewrote {changed[:20]}"


def layer_sums(cube):
    return {name: float(np.nansum(cube[name].values)) for name in cube.data_vars if name != "crs"}


def level_url(cube_url):
    """Level 1 of the cube's overview levels."""
    return f"{cube_url.removesuffix('.zarr')}.levels/1.zarr"


def write_patch(folder: Path, title: str) -> Path:
    """patch.yaml with another title."""
    patch = folder / "patch.yaml"
    patch.write_text(
        (REPO / "patch.yaml").read_text().replace(f"title: {FIRST_TITLE}", f"title: {title}")
    )
    assert title in patch.read_text()
    return patch


@dataclass(frozen=True)
class Rebuilt:
    built: object  # the build with the changed patch
    title: str
    first: dict  # every object of the first version before the rebuild
    first_after: dict  # … and after it


@pytest.fixture(scope="module")
def rebuilt(built, blocks, repo_spec_path, work, mirror, tmp_path_factory):
    """The same sources with a changed patch: the next version (v1.1.1)."""
    from polar_cube.flows.build_cube import build_cube

    fs = s3(blocks)
    first = VersionKeys(built.url.rsplit("/", 1)[-1])
    before = listing(fs, *first.all_keys())
    title = f"{FIRST_TITLE} (patched again)"
    options = build_options(repo_spec_path, work, mirror)
    options["patch_path"] = str(write_patch(tmp_path_factory.mktemp("patched"), title))
    time.sleep(1.1)  # LastModified has whole seconds: a rewrite from now on would show
    again = build_cube(**options)
    return Rebuilt(again, title, before, listing(fs, *first.all_keys()))


def test_a_changed_patch_publishes_the_next_version_and_leaves_the_old_one_unchanged(
    rebuilt, built, blocks, repo_spec_path
):
    spec = spec_at_resolution(repo_spec_path)
    new, old = rebuilt.built, VersionKeys(built.url.rsplit("/", 1)[-1])
    assert new.version == "1.1.1" and not new.reused
    assert new.url == f"s3://{ROOT}/{spec.series}-v1.1.1.zarr"
    fs = s3(blocks)
    published = catalog(fs, spec.series)
    assert published["latest_cube"] == new.url.rsplit("/", 1)[-1]
    assert [v["version"] for v in published["versions"]] == ["1.1.0", "1.1.1"]
    # the published v1.1.0, every object of it: the same bytes, never rewritten
    assert len(rebuilt.first) > 4 * len(spec.variables)
    assert rebuilt.first_after == rebuilt.first
    for part in (old.cube, old.levels, old.inputs, old.quicklooks, old.stac_item):
        assert any(k.startswith(f"{ROOT}/{part}") for k in rebuilt.first), part
    # v1.1.1 carries the same chunks (the sources did not change) under the new patch
    new_keys = VersionKeys(new.url.rsplit("/", 1)[-1])
    assert chunk_etags(fs, new_keys) == chunk_etags(fs, old) != {}
    before, after = open_published(built.url, blocks), open_published(new.url, blocks)
    assert before.attrs["title"] == FIRST_TITLE and after.attrs["title"] == rebuilt.title
    assert layer_sums(after) == layer_sums(before)
    item = json.loads(fs.cat_file(new.stac_item.removeprefix("s3://")))
    assert item["assets"]["zarr"]["href"] == new.url


class LatestWatcher(threading.Thread):
    """Reads the catalog, as a reader without polar_cube does, and opens the cube `latest`
    names (and level 1 of its levels), over and over; records what it saw."""

    def __init__(self, options, series):
        super().__init__(daemon=True)
        self.options, self.series = options, series
        self.seen, self.seen_levels, self.stop = [], [], threading.Event()

    def run(self):
        fs = s3(self.options)
        while not self.stop.is_set():
            try:
                name = json.loads(fs.cat_file(f"{ROOT}/{self.series}.versions.json"))["latest_cube"]
            except Exception:  # a catalog is always there after the first build
                self.seen.append((None, None, None))
                time.sleep(0.02)
                continue
            url = f"s3://{ROOT}/{name}"
            try:
                cube = open_published(url, self.options)
                self.seen.append((name, cube.attrs.get("title"), layer_sums(cube)))
            except Exception:  # not openable at this instant: allowed, partial is not
                pass
            try:
                sums = layer_sums(open_published(level_url(url), self.options))
                self.seen_levels.append((name, sums))
            except Exception:
                pass
            time.sleep(0.02)


def run_build_cli(repo_spec_path, work, mirror, patch, *, kill_when=None):
    """`polar-cube build` into the bucket, against this session's Prefect API (where the
    bucket block is), as a user's command runs against theirs (PREFECT_API_URL): not a
    temporary server of its own per run (~20 s to start, twice per kill test)."""
    command = [
        sys.executable,
        "-m",
        "polar_cube.cli",
        "build",
        "--spec",
        str(repo_spec_path),
        "--resolution",
        str(RESOLUTION),
        "--source-mirror",
        mirror,
        "--cache",
        str(work / "cache"),
        "--bucket-block",
        BUCKET_BLOCK,
        "--patch",
        str(patch),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=session_api_env(),
    )
    if kill_when is None:
        output, _ = process.communicate(timeout=600)
        return process.returncode, output
    deadline = time.monotonic() + 300
    while not kill_when() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and any process it started, by group
    process.wait(timeout=30)
    return process.returncode, process.stdout.read()


@pytest.mark.parametrize("phase", ["merge", "patch"])
def test_killed_builds_leave_latest_at_a_whole_version(
    phase, built, rebuilt, blocks, repo_spec_path, work, mirror, tmp_path
):
    """A build killed while merging or patching its new version: `latest` names the old
    version or the new one, whole, at every instant (a reader never sees a partial cube or
    levels); the old version is untouched; the same command then publishes the new one."""
    from polar_cube.cube.versions import next_version, read_catalog
    from polar_cube.location import StoreLocation

    spec = spec_at_resolution(repo_spec_path)
    fs = s3(blocks)
    location = StoreLocation(f"s3://{ROOT}", blocks)
    versions = read_catalog(location, spec.series)
    old = VersionKeys(versions.latest_version.cube)
    draft = VersionKeys(spec.at_version(next_version(versions, spec.version)).data_id)
    assert draft.cube not in {v.cube for v in versions.versions}
    old_objects = listing(fs, *old.all_keys())
    old_title = open_published(f"s3://{ROOT}/{old.cube}", blocks).attrs["title"]
    reference = layer_sums(open_published(f"s3://{ROOT}/{old.cube}", blocks))
    level_reference = layer_sums(open_published(level_url(f"s3://{ROOT}/{old.cube}"), blocks))
    title = f"{FIRST_TITLE} (after a kill during {phase})"
    patch = write_patch(tmp_path, title)

    def exists(key):
        fs.invalidate_cache()
        return fs.exists(f"{ROOT}/{key}")

    def merging():  # the merge writes the new cube's metadata next to the carried chunks
        return exists(f"{draft.cube}/x/.zarray") or exists(f"{draft.cube}/.zattrs")

    def patching():  # cube and levels merged: patch (or verify) next
        return exists(f"{draft.cube}/.zmetadata") and exists(f"{draft.levels}/.zlevels")

    watcher = LatestWatcher(blocks, spec.series)
    watcher.start()
    try:
        code, output = run_build_cli(
            repo_spec_path, work, mirror, patch, kill_when=merging if phase == "merge" else patching
        )
        assert code == -signal.SIGKILL, output[-2000:]
        latest = catalog(fs, spec.series)["latest_cube"]
        assert latest in (old.cube, draft.cube)
        if phase == "merge":
            assert latest == old.cube  # nothing was published
        assert layer_sums(open_published(f"s3://{ROOT}/{latest}", blocks)) == reference
        code, output = run_build_cli(repo_spec_path, work, mirror, patch)
        assert code == 0, output[-3000:]
        assert "--- open the cube ---" in output
        deadline = time.monotonic() + 60  # until the watcher has opened the new version too
        while time.monotonic() < deadline and draft.cube not in {n for n, _, _ in watcher.seen}:
            time.sleep(0.1)
    finally:
        watcher.stop.set()
        watcher.join()
    published = catalog(fs, spec.series)
    assert published["latest_cube"] == draft.cube
    final = open_published(f"s3://{ROOT}/{draft.cube}", blocks)
    assert final.attrs["title"] == title
    assert layer_sums(final) == reference
    assert layer_sums(open_published(level_url(f"s3://{ROOT}/{draft.cube}"), blocks)) == (
        level_reference
    )
    # every instant: `latest` was the old version or the new one, and it opened whole
    titles = {old.cube: old_title, draft.cube: title}
    assert watcher.seen, "the watcher never managed to open the cube"
    assert (None, None, None) not in watcher.seen, "the catalog was unreadable"
    for name, seen_title, sums in watcher.seen:
        assert name in titles, name
        assert (seen_title, sums) == (titles[name], reference), name
    assert {name for name, _, _ in watcher.seen} == {old.cube, draft.cube}  # it saw the switch
    assert watcher.seen_levels, "the watcher never managed to open the levels"
    assert all(sums == level_reference for _, sums in watcher.seen_levels)
    assert listing(fs, *old.all_keys()) == old_objects  # the old version: not one object changed
    # the killed build's draft is now the published version: no unpublished leftovers
    assert stored_stems(fs, spec.series) == {
        VersionKeys(v["cube"]).stem for v in published["versions"]
    }
    assert not fs.exists(f"{ROOT}/.staging") and not fs.exists(f"{ROOT}/inputs")


@pytest.fixture(scope="module")
def dask_cluster_processes(tmp_path_factory):
    """A dask scheduler and one worker, as separate processes on 127.0.0.1."""
    from distributed import Client

    from tests.conftest import free_port_block

    bin_dir = os.path.dirname(sys.executable)
    port = free_port_block(2)
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    processes = [
        subprocess.Popen(
            [
                f"{bin_dir}/dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            stdout=open(logs / "scheduler.log", "w"),
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        processes.append(
            subprocess.Popen(
                [
                    f"{bin_dir}/dask",
                    "worker",
                    address,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "2",
                    "--memory-limit",
                    "6GiB",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                stdout=open(logs / "worker.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for process in reversed(processes):  # stopped by their own process ids
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def test_cluster_build_equals_local_build(
    built, blocks, dask_cluster_processes, repo_spec_path, work, mirror, tmp_path
):
    from distributed import Client

    from polar_cube.flows.build_cube import build_cube

    options = build_options(repo_spec_path, work, mirror)
    options.update(  # a new local folder: every source is written again, on the cluster
        bucket_block=None,
        output_dir=str(tmp_path / "cube"),
        dask_address=dask_cluster_processes,
    )
    on_cluster = build_cube(**options)
    assert on_cluster.url == str(tmp_path / "cube" / built.url.rsplit("/", 1)[-1])
    assert not on_cluster.reused
    with Client(dask_cluster_processes) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))
    # the array work ran on the cluster: resampling, and the writing pass (cube chunks with
    # their statistics, level chunks; halving is fused into the latter where it can be)
    assert any("resample" in p for p in prefixes), prefixes
    assert {"write-block-and-stats", "write-level-block"} <= prefixes, prefixes
    local = open_published(built.url, blocks)
    cluster = xr.open_zarr(on_cluster.url, consolidated=True)
    for name in load_spec(repo_spec_path).variables:
        np.testing.assert_array_equal(cluster[name.name].values, local[name.name].values)
        stats = "polar_cube_stats"
        assert cluster[name.name].attrs[stats] == local[name.name].attrs[stats], name.name
    local_levels = open_published(level_url(built.url), blocks)
    cluster_levels = xr.open_zarr(level_url(on_cluster.url), consolidated=True)
    for name in load_spec(repo_spec_path).variables:
        np.testing.assert_array_equal(
            cluster_levels[name.name].values, local_levels[name.name].values
        )
