"""Kills at every phase (issue 21, item 6): SIGKILL of the build's flow process, of the S3
server, of a dask worker and of the Prefect worker that runs a deployment's flow run, each
while the build is inside a given phase — downloading, resampling and uploading the chunks,
merging, publishing. Afterwards nothing partial is published (the catalog names no version,
or a complete one), and a rerun of the same command ends with a cube equal to a clean build.

How a kill lands inside a phase, every time: the build's requests to the S3 server go
through a proxy (`tests/s3_proxy.py`) that holds the first request of the phase — the first
chunk PUT of the cube, the merge's first `.zarray`, the catalog's PUT that publishes — and
the kill comes while the build waits on it. A download is caught by a mirror that sends half
the file and stalls. Real parts throughout: SeaweedFS, the session's Prefect server, the
stand-in sources over HTTP, a dask LocalCluster, a Prefect process worker.

The cube is the small stand-ins of two sources (a GeoTIFF and a GMT grid) at 3 km: every
phase is there, and a build takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import fsspec
import numpy as np
import psutil
import pytest
import xarray as xr
import yaml

from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block
from tests.prefect_api import session_api_env
from tests.s3_proxy import HoldingProxy
from tests.test_faults import _rewrite_values, copy_of, serving

pytestmark = pytest.mark.slow

SOURCES = ("magnetic_anomaly", "geothermal_heat_flow_200km")
RESOLUTION = "3000"
BUCKET = "kills"
GEOTIFF = "ASE_MagneticCompilation_Dziadeketal_250m.tif"


# --- the cube, its servers and a clean build -----------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A spec of two of the sources, and the patch's entries for their variables."""
    folder = tmp_path_factory.mktemp("kill-inputs")
    document = json.loads((REPO / "cube.geojson").read_text())
    properties = document["properties"]
    properties["sources"] = [s for s in properties["sources"] if s["id"] in SOURCES]
    properties["variables"] = [v for v in properties["variables"] if v["source"] in SOURCES]
    names = {v["name"] for v in properties["variables"]}
    (folder / "cube.geojson").write_text(json.dumps(document))
    patch = yaml.safe_load((REPO / "patch.yaml").read_text())
    patch["metadata"] = {
        key: value
        for key, value in patch["metadata"].items()
        if "/" not in key or key.split("/")[0] in names
    }
    (folder / "patch.yaml").write_text(yaml.safe_dump(patch))
    return folder / "cube.geojson", folder / "patch.yaml"


@pytest.fixture(scope="module")
def mirror(small_standins, tmp_path_factory):
    """The stand-ins (a copy: one is changed) over HTTP, stalling on demand."""
    with serving(copy_of(small_standins, tmp_path_factory.mktemp("kill-sources"))) as server:
        yield server


@pytest.fixture(scope="module")
def api() -> dict[str, str]:
    return session_api_env()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS (restarted by the cases that kill it) behind a holding proxy."""
    from polar_cube.servers.s3server import running_s3_server

    state = tmp_path_factory.mktemp("kill-seaweedfs")
    with running_s3_server(
        state, port=free_port_block(), bucket=BUCKET, stop_timeout_seconds=2
    ) as server:
        proxy = HoldingProxy(int(server.endpoint_url.rsplit(":", 1)[1]))
        yield types.SimpleNamespace(state=state, server=server, proxy=proxy)  # server: the latest
        proxy.close()


@pytest.fixture(scope="module")
def blocks(s3, api) -> str:
    """Prefect blocks naming the bucket through the proxy (what the builds write to)."""
    server, proxy = s3.server, s3.proxy
    env = api | {"AWS_SECRET_ACCESS_KEY": server.secret_key}
    made = run_cli(
        "blocks",
        "create",
        "--bucket",
        BUCKET,
        "--bucket-block",
        "kills-bucket",
        "--credentials-block",
        "kills-credentials",
        "--endpoint-url",
        proxy.endpoint_url,
        "--access-key",
        server.access_key,
        env=env,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    return "kills-bucket"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill-work")


@pytest.fixture(scope="module")
def reference(inputs, mirror, api, work) -> dict[str, np.ndarray]:
    """A clean build into a local folder: what every build after a kill must equal."""
    done = run_cli(*build_args(inputs, mirror, work, "--output", str(work / "clean")), env=api)
    assert done.returncode == 0, done.stderr[-4000:]
    return cube_values(work / "clean" / data_id(inputs))


# --- helpers -------------------------------------------------------------------------------


def run_cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_args(inputs, mirror, work: Path, *extra: str) -> list[str]:
    spec, patch = inputs
    return [
        "build",
        "--spec",
        str(spec),
        "--patch",
        str(patch),
        "--resolution",
        RESOLUTION,
        "--source-mirror",
        mirror.base_url,
        "--cache",
        str(work / "cache"),
        *extra,
    ]


def data_id(inputs) -> str:
    return load_spec(inputs[0]).at_resolution(float(RESOLUTION)).data_id


def series(inputs) -> str:
    return load_spec(inputs[0]).at_resolution(float(RESOLUTION)).series


def cube_values(path: Path | str, options=None) -> dict[str, np.ndarray]:
    cube = xr.open_zarr(str(path), consolidated=True, storage_options=options)
    return {str(name): cube[name].values for name in cube.data_vars}


def direct_options(server) -> dict:
    """Reading the bucket past the proxy."""
    return {
        "key": server.access_key,
        "secret": server.secret_key,
        "client_kwargs": {"endpoint_url": server.endpoint_url},
    }


def published_cube(fs, inputs) -> str | None:
    """The cube the bucket's catalog names `latest`, or None (nothing published)."""
    key = f"{BUCKET}/{series(inputs)}.versions.json"
    if not fs.exists(key):
        return None
    return json.loads(fs.cat_file(key))["latest_cube"]


def emptied(server) -> fsspec.AbstractFileSystem:
    """The bucket, read past the proxy, with nothing in it (each case starts so)."""
    fs = fsspec.filesystem("s3", **direct_options(server), skip_instance_cache=True)
    for key in fs.ls(BUCKET):
        fs.rm(key, recursive=True)
    return fs


def assert_published_equals(fs, server, cube: str, reference: dict[str, np.ndarray]) -> None:
    """The cube `cube` in the bucket holds the reference's variables, value for value."""
    fs.invalidate_cache()
    values = cube_values(f"s3://{BUCKET}/{cube}", direct_options(server))
    assert values.keys() == reference.keys()
    for name, expected in reference.items():
        np.testing.assert_array_equal(values[name], expected, err_msg=name)


def phase_pattern(phase: str, inputs) -> str:
    """The request path the proxy holds: the first of `phase`."""
    stem = data_id(inputs).removesuffix(".zarr")
    return {
        "upload": rf"/{BUCKET}/{stem}\.zarr/magnetic_anomaly/\d+\.\d+",
        "merge": rf"/{BUCKET}/{stem}\.zarr/[a-z_0-9]+/\.zarray",
        "publish": rf"/{BUCKET}/{series(inputs)}\.versions\.json",
    }[phase]


def wait_for(what: str, condition, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `condition()` holds; fails (with the build's error output) if the build ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the build ended before {what}: {process.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def wait_until_free(ports, timeout: float = 120) -> None:
    from polar_cube.servers.processes import port_is_free

    deadline = time.monotonic() + timeout
    while not all(port_is_free(port, "127.0.0.1") for port in ports):
        assert time.monotonic() < deadline, f"ports {sorted(ports)} still in use"
        time.sleep(0.5)


def pid_of_client(port: int) -> int:
    """The process that holds the TCP connection from 127.0.0.1:`port`."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            return connection.pid
    raise AssertionError(f"no process holds a connection from port {port}")


# --- the matrix ----------------------------------------------------------------------------

CASES = {
    # case: (what is SIGKILLed, the phase it is killed in)
    "the flow process, downloading": ("flow", "download"),
    "the flow process, resampling and uploading": ("flow", "upload"),
    "the flow process, merging": ("flow", "merge"),
    "the flow process, publishing": ("flow", "publish"),
    "the S3 server, resampling and uploading": ("s3", "upload"),
    "the S3 server, merging": ("s3", "merge"),
    "the S3 server, publishing": ("s3", "publish"),
    "a dask worker, resampling and uploading": ("dask worker", "upload"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_kill_publishes_nothing_partial_and_a_rerun_equals_a_clean_build(
    case, inputs, mirror, api, s3, blocks, work, reference
):
    from polar_cube.servers.s3server import server_ports, start_s3_server

    killed, phase = CASES[case]
    server, proxy = s3.server, s3.proxy
    fs = emptied(server)
    args = build_args(inputs, mirror, work, "--bucket-block", blocks)
    if killed == "dask worker":
        args += ["--dask", "local"]
    part = work / "cache" / SOURCES[0] / f"{GEOTIFF}.part"
    if phase == "download":  # as if never downloaded; the mirror sends half, then stalls
        for path in (work / "cache" / SOURCES[0]).glob("*"):
            path.unlink()
        mirror.stalled.add(GEOTIFF)
    else:
        proxy.hold(phase_pattern(phase, inputs))
    started = time.monotonic()
    build = subprocess.Popen(
        [sys.executable, "-m", "polar_cube.cli", *args],
        env=api,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if phase == "download":
            wait_for("a partial download", lambda: part.exists() and part.stat().st_size, build)
        else:
            wait_for(f"a request of the {phase} phase", proxy.held.is_set, build)
        if killed == "flow":
            os.kill(build.pid, signal.SIGKILL)
        elif killed == "s3":
            os.killpg(server.pid, signal.SIGKILL)
            proxy.refuse()  # its port too is gone
        else:
            os.kill(pid_of_client(proxy.held_client_port), signal.SIGKILL)
    finally:
        mirror.stalled.discard(GEOTIFF)
        proxy.release(forward=False)
        stderr = build.communicate(timeout=600)[1]
    print(f"{case}: the killed build ended after {time.monotonic() - started:.1f} s")

    if killed == "flow":
        assert build.returncode == -signal.SIGKILL
    elif killed == "s3":  # one line naming the endpoint, then the server is started again
        assert build.returncode == 2, stderr[-4000:]
        errors = [line for line in stderr.splitlines() if line.startswith("polar-cube: error:")]
        assert len(errors) == 1 and "cannot reach S3 endpoint" in errors[0], stderr[-4000:]
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        wait_until_free(server_ports(port).values())  # the killed server's sockets linger
        s3.server = start_s3_server(s3.state, port=port)
        proxy.listen()
        assert s3.server.endpoint_url == server.endpoint_url
    else:  # distributed gives the killed worker's task to another: the build carries on
        assert build.returncode == 0, stderr[-4000:]

    published = published_cube(fs, inputs)
    if published is not None:  # never a partial version
        assert killed == "dask worker" or phase == "publish", published
        assert_published_equals(fs, server, published, reference)
    if killed == "dask worker":
        assert published == data_id(inputs)
        return

    rerun = run_cli(*args, env=api)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    fs.invalidate_cache()
    assert published_cube(fs, inputs) == data_id(inputs)  # the draft, resumed and published
    assert_published_equals(fs, server, data_id(inputs), reference)


def test_a_prefect_worker_killed_while_its_run_uploads_crashes_the_run_and_a_new_run_resumes(
    inputs, mirror, api, s3, blocks, work, reference, tmp_path
):
    """SIGKILL of the Prefect process worker while the flow run it started is writing chunks.
    The flow run (the worker's child process) ends with it, Crashed in the Prefect API, having
    published nothing; with a worker started again, a new run of the deployment resumes the
    draft and publishes a cube equal to a clean build's. The next run, after the GeoTIFF got
    new bytes at its URL, fetches it alone (the other source: one 304) and publishes a new
    version in which only its variable changed."""
    server, proxy = s3.server, s3.proxy
    fs = emptied(server)
    spec, patch = inputs
    pool, state = "kills-pool", tmp_path / "worker"
    params = {
        "spec_path": str(spec),
        "patch_path": str(patch),
        "bucket_block": blocks,
        "resolution": RESOLUTION,
        "source_mirror": mirror.base_url,
        "cache_dir": str(work / "cache"),
    }
    steps = [
        ("pool", "create", "--name", pool),
        ("deploy", "--name", "kills", "--pool", pool, "--paused")
        + tuple(f"--param={key}={value}" for key, value in params.items()),
        ("worker", "start", "--pool", pool, "--state-dir", str(state)),
    ]
    for step in steps:
        done = run_cli(*step, env=api)
        assert done.returncode == 0, (step, done.stderr[-3000:])
    worker_pid = json.loads((state / f"worker-{pool}.json").read_text())["pid"]
    proxy.hold(phase_pattern("upload", inputs))
    run = subprocess.Popen(
        [sys.executable, "-m", "polar_cube.cli", "run", "--deployment", "build-cube/kills"]
        + ["--watch", "--timeout", "400"],
        env=api,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for("a chunk PUT of the flow run", proxy.held.is_set, run)
        flow_run_pid = pid_of_client(proxy.held_client_port)
        assert flow_run_pid != worker_pid
        os.kill(worker_pid, signal.SIGKILL)
    finally:
        proxy.release()
        output = run.communicate(timeout=600)[0]
    assert run.returncode == 1 and "finished: Crashed" in output, output[-4000:]
    assert published_cube(fs, inputs) is None  # nothing published
    assert fs.find(f"{BUCKET}/{data_id(inputs)}")  # a draft was begun

    restarted = run_cli("worker", "start", "--pool", pool, "--state-dir", str(state), env=api)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    rerun = run_cli("run", "--deployment", "build-cube/kills", "--watch", env=api)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    fs.invalidate_cache()
    assert published_cube(fs, inputs) == data_id(inputs)  # the draft, resumed and published
    assert_published_equals(fs, server, data_id(inputs), reference)

    # issue 21, item 1, as a scheduled build meets it: new bytes at the same URL
    mirror.answered.clear()
    _rewrite_values(mirror.root / GEOTIFF)  # the magnetic anomaly, doubled
    changed = run_cli("run", "--deployment", "build-cube/kills", "--watch", env=api)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    fetched = sorted((Path(path).name, status) for method, path, status in mirror.answered)
    assert fetched == sorted(
        [(GEOTIFF, 200), (GEOTIFF, 200), ("200km_GHF_windowCenters.nc", 304)]
    )  # asked and fetched again; the unchanged source: one 304
    fs.invalidate_cache()
    newer = published_cube(fs, inputs)
    assert newer != data_id(inputs)  # a new version
    values = cube_values(f"s3://{BUCKET}/{newer}", direct_options(server))
    for name, expected in reference.items():
        if name == "magnetic_anomaly":
            finite = np.isfinite(expected) & (expected != 0)
            np.testing.assert_allclose(values[name][finite], 2 * expected[finite], rtol=1e-5)
        else:
            np.testing.assert_array_equal(values[name], expected, err_msg=name)
    stopped = run_cli("worker", "stop", "--pool", pool, "--state-dir", str(state), env=api)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
