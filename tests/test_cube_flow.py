"""The parent flow end to end into a real S3 server (SeaweedFS): build, reopen, refuse wrong
keys, survive kills during merge/patch without ever exposing a partial cube."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import xarray as xr

from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.storage import StorageAccessError, check_bucket_access
from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks
from tests.conftest import layer_count

pytestmark = pytest.mark.slow
RESOLUTION = 3000.0
BUCKET_BLOCK = "polar-test-bucket"


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
        datasets_dir=str(work / "datasets"),
        bucket_block=BUCKET_BLOCK,
    )


@pytest.fixture(scope="module")
def built(repo_spec_path, work, mirror, blocks):
    from polar_cube.flows.build_cube import build_cube

    return build_cube(**build_options(repo_spec_path, work, mirror))


def open_published(url, options):
    return xr.open_zarr(url, consolidated=True, storage_options=options)


def test_whole_cube_is_in_the_bucket_and_opens(built, blocks, repo_spec_path):
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    assert built.url == f"s3://polar-test/cubes/{spec.data_id}"
    cube = open_published(built.url, blocks)
    for variable in spec.variables:
        data = cube[variable.name]
        assert data.attrs["units"] == variable.units
        assert data.attrs["grid_mapping"] == "crs"
        assert data.dims == variable.dims and data.dtype == np.float32
    assert cube.attrs["title"] == "Polar Data Cube v1.1.0"  # from patch.yaml
    assert cube.attrs["processing_software"].startswith("polar-datacube")  # generated
    assert cube.thw_70.attrs["color_bar_name"] == "GnBu"
    assert "spatial_ref" not in cube.variables
    assert len(built.quicklooks) == layer_count(spec)
    import fsspec

    fs = fsspec.filesystem("s3", **blocks)
    stats = json.loads(fs.cat_file(f"polar-test/cubes/{spec.data_id[:-5]}.quicklooks/stats.json"))
    assert {s["name"] for s in stats} == {v.name for v in spec.variables}
    assert fs.cat_file(built.quicklooks[0].removeprefix("s3://"))[:8] == b"\x89PNG\r\n\x1a\n"
    from polar_cube.cube.stac import validate_stac_item

    item = json.loads(fs.cat_file(built.stac_item.removeprefix("s3://")))
    validate_stac_item(item)
    assert item["assets"]["zarr"]["href"] == built.url


def test_xcube_opens_the_published_levels_in_the_bucket(built, blocks, repo_spec_path):
    from xcube.core.store import new_data_store

    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    stem = spec.data_id.removesuffix(".zarr")
    store = new_data_store("s3", root="polar-test/cubes", storage_options=blocks)
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
        check_bucket_access("s3://polar-test/cubes", options)
    assert "not-the-secret" not in str(raised.value)
    with pytest.raises(PermissionError):
        open_published(built.url, options).load()


def test_rerun_reuses_the_published_cube(built, repo_spec_path, work, mirror):
    from polar_cube.flows.build_cube import build_cube

    again = build_cube(**build_options(repo_spec_path, work, mirror))
    assert again.reused and again.url == built.url  # its time is the benchmark's (rerun)


def layer_sums(cube):
    return {name: float(np.nansum(cube[name].values)) for name in cube.data_vars if name != "crs"}


def level_url(cube_url):
    """Level 1 of the published cube's overview levels."""
    return f"{cube_url.removesuffix('.zarr')}.levels/1.zarr"


class PublishedWatcher(threading.Thread):
    """Opens the published name (and level 1 of its levels) over and over; records what it
    saw."""

    def __init__(self, url, options):
        super().__init__(daemon=True)
        self.url, self.options = url, options
        self.seen, self.seen_levels, self.stop = [], [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                cube = open_published(self.url, self.options)
                self.seen.append((cube.attrs.get("title"), layer_sums(cube)))
            except Exception:  # not openable at this instant: allowed, partial is not
                pass
            try:
                self.seen_levels.append(
                    layer_sums(open_published(level_url(self.url), self.options))
                )
            except Exception:
                pass
            time.sleep(0.02)


def run_build_cli(repo_spec_path, work, mirror, patch, *, kill_when=None):
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
        "--store",
        str(work / "datasets"),
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
    )
    if kill_when is None:
        output, _ = process.communicate(timeout=600)
        return process.returncode, output
    deadline = time.monotonic() + 300
    while not kill_when() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its Prefect server, by process group
    process.wait(timeout=30)
    return process.returncode, process.stdout.read()


@pytest.mark.parametrize("phase", ["merge", "patch"])
def test_killed_builds_never_expose_a_partial_cube(
    phase, built, blocks, repo_spec_path, work, mirror, tmp_path
):
    import fsspec

    fs = fsspec.filesystem("s3", **blocks)
    reference = layer_sums(open_published(built.url, blocks))
    level_reference = layer_sums(open_published(level_url(built.url), blocks))
    patch = tmp_path / "patch.yaml"
    title = f"Polar Data Cube v1.1.0 (after a kill during {phase})"
    patch.write_text(
        (repo_spec_path.parent / "patch.yaml")
        .read_text()
        .replace("title: Polar Data Cube v1.1.0", f"title: {title}")
    )
    staging = "polar-test/cubes/.staging"

    def merging():
        return fs.exists(staging) and bool(fs.ls(staging, refresh=True))

    def patching():
        if not merging():
            return False
        staged = [p for p in fs.ls(staging, refresh=True) if ".zarr." in p.rsplit("/", 1)[-1]]
        return bool(staged) and fs.exists(f"{staged[0]}/.zmetadata")

    watcher = PublishedWatcher(built.url, blocks)
    watcher.start()
    try:
        code, output = run_build_cli(
            repo_spec_path, work, mirror, patch, kill_when=merging if phase == "merge" else patching
        )
        assert code == -signal.SIGKILL, output[-2000:]
        try:  # the previous version is still there, whole (or, killed while publishing, none)
            assert layer_sums(open_published(built.url, blocks)) == reference
        except FileNotFoundError:
            assert phase == "patch"
        code, output = run_build_cli(repo_spec_path, work, mirror, patch)
        assert code == 0, output[-3000:]
        assert "--- open the cube ---" in output
    finally:
        watcher.stop.set()
        watcher.join()
    final = open_published(built.url, blocks)
    assert final.attrs["title"] == title
    assert layer_sums(final) == reference
    assert watcher.seen, "the watcher never managed to open the cube"
    for seen_title, sums in watcher.seen:  # every successful open saw a complete cube
        assert sums == reference, seen_title
    assert watcher.seen_levels, "the watcher never managed to open the levels"
    assert all(sums == level_reference for sums in watcher.seen_levels)
    assert layer_sums(open_published(level_url(built.url), blocks)) == level_reference
    fs.invalidate_cache()
    assert [p for p in fs.find(staging) if p != staging] == []  # no staged objects left


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
    options.update(
        datasets_dir=str(tmp_path / "datasets"),  # rebuilt on the cluster, not reused
        bucket_block=None,
        output_dir=str(tmp_path / "cube"),
        dask_address=dask_cluster_processes,
    )
    on_cluster = build_cube(**options)
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
