"""The parent flow on a dask cluster whose worker shares no disk with the flow: the worker
runs as another Unix user (`nobody`) with its own HOME and TMPDIR and cannot read the flow's
cache or folders, so sources reach it through the bucket (`sources/<id>/`, staged because the
cluster shares nothing) and it writes every source's chunks straight into the new cube version
in the bucket (`<stem>.zarr`, `<stem>.levels`; each source's metadata in `<stem>.inputs/`).
The published cube equals a local build, a rerun rewrites nothing, and no S3 key leaks into
the cluster's logs or task keys."""

import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import tests.test_cube_flow as cube_flow
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.spec import load_spec
from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks
from tests.dask_key_recorder import KEYS_FILE_VARIABLE
from tests.test_cube_flow import RESOLUTION, build_options, level_url, open_published

pytestmark = pytest.mark.slow

SETPRIV = shutil.which("setpriv")
if os.geteuid() != 0 or SETPRIV is None:
    pytest.skip(
        "the no-shared-disk cluster test runs its dask worker as `nobody` via setpriv: "
        "it needs root and util-linux's setpriv",
        allow_module_level=True,
    )

BUCKET_BLOCK = "polar-test-cluster-bucket"
BUCKET_FOLDER = "polar-test/cluster"
WORKER_USER = "nobody"
PROBE = ".worker-probe"
LOCK_FOLDER = ".polar-cube-lock"

mirror = cube_flow.mirror  # the same module-scoped fixture: stand-in sources over HTTP


def worker_ids() -> tuple[int, int]:
    """(uid, gid) of the worker's user: `nobody`, group `nogroup` or else its own group."""
    user = pwd.getpwnam(WORKER_USER)
    try:
        return user.pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return user.pw_uid, user.pw_gid


@dataclass(frozen=True)
class Cluster:
    address: str
    scheduler_log: Path
    worker_log: Path
    keys_file: Path
    worker_home: Path


def _stop(process: subprocess.Popen) -> None:
    """Stop one process by its own id: terminate, wait, then kill."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler (this user, recording every task key) and one worker running as `nobody`,
    with its own HOME/TMPDIR outside pytest's (0700) tmp dir and a clean environment."""
    from distributed import Client

    from tests.conftest import free_port_block

    logs = tmp_path_factory.mktemp("cluster-logs")
    port = free_port_block(1)
    address = f"tcp://127.0.0.1:{port}"
    uid, gid = worker_ids()
    home = Path(tempfile.mkdtemp(prefix="polar-cube-worker-"))
    os.chown(home, uid, gid)
    home.chmod(0o700)
    found = Cluster(address, logs / "scheduler.log", logs / "worker.log", logs / "keys.txt", home)
    found.keys_file.touch()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        scheduler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                *("--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
                *("--preload", str(Path(__file__).with_name("dask_key_recorder.py"))),
            ],
            stdout=stack.enter_context(open(found.scheduler_log, "w")),
            stderr=subprocess.STDOUT,
            env={**os.environ, KEYS_FILE_VARIABLE: str(found.keys_file)},
        )
        stack.callback(_stop, scheduler)
        worker = subprocess.Popen(
            [
                SETPRIV,
                *(f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                *("--no-nanny", "--nthreads", "2", "--memory-limit", "6GiB"),
                *("--no-dashboard", "--host", "127.0.0.1"),
            ],
            # opened here, so `nobody` needs no write access to the log folder
            stdout=stack.enter_context(open(found.worker_log, "w")),
            stderr=subprocess.STDOUT,
            cwd=home,  # not the repository: the worker imports the project as installed
            env={  # nothing of this process's environment (no credentials, no PREFECT_HOME)
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "HOME": str(home),
                "TMPDIR": str(home),
            },
        )
        stack.callback(_stop, worker)  # callbacks run last-in first-out: worker first
        try:
            with Client(address, timeout=60) as client:
                client.wait_for_workers(1, timeout=120)
        except OSError as error:  # TimeoutError included
            pytest.fail(
                f"the cluster did not come up ({error}):\n--- scheduler:\n"
                f"{_tail(found.scheduler_log)}\n--- worker:\n{_tail(found.worker_log)}"
            )
        yield found


@pytest.fixture(scope="module")
def cluster_blocks(s3_server):
    """The session's S3 server, in blocks of their own: this module publishes under
    `cluster/`, apart from test_cube_flow's `cubes/`."""
    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-test-cluster-credentials",
        bucket_name="polar-test",
        bucket_folder="cluster",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return storage_options_from_blocks(load_bucket(BUCKET_BLOCK))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The flow's folders (the cache), root's and 0700; the cache holds a probe file the
    worker must not be able to read."""
    work = tmp_path_factory.mktemp("cluster-flow")
    work.chmod(0o700)
    (work / "cache").mkdir(mode=0o700)
    (work / "cache" / PROBE).write_text("only the flow's user reads this\n")
    return work


def cluster_options(repo_spec_path, work, mirror, address):
    options = build_options(repo_spec_path, work, mirror)
    options.update(bucket_block=BUCKET_BLOCK, dask_address=address)
    return options


def s3(options):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, **options)


def listing(options) -> dict[str, tuple]:
    """Every object under the bucket folder: (LastModified, ETag) by key."""
    found = s3(options).find(BUCKET_FOLDER, detail=True)
    return {key: (info.get("LastModified"), info.get("ETag")) for key, info in found.items()}


def lasting(objects: dict) -> dict:
    """The objects a rerun must leave alone: all of them (staged sources, the published
    version: cube, levels, per-dataset metadata, report, STAC item; the catalog), the lock
    folder aside."""
    return {k: v for k, v in objects.items() if f"/{LOCK_FOLDER}/" not in k}


@pytest.fixture(scope="module")
def local_build(repo_spec_path, work, mirror, tmp_path_factory):
    """The same spec and resolution built on threads into local folders."""
    from polar_cube.flows.build_cube import build_cube

    folder = tmp_path_factory.mktemp("cluster-local")
    options = build_options(repo_spec_path, work, mirror)
    options.update(bucket_block=None, output_dir=str(folder / "cube"))
    return build_cube(**options)


@pytest.fixture(scope="module")
def cluster_build(cluster, cluster_blocks, repo_spec_path, work, mirror):
    from polar_cube.flows.build_cube import build_cube

    with pytest.MonkeyPatch.context() as patch:  # a per-dataset store, were one used, here
        patch.setattr("polar_cube.flows.build_datasets.DEFAULT_STORE", work / "datasets")
        return build_cube(**cluster_options(repo_spec_path, work, mirror, cluster.address))


@dataclass(frozen=True)
class Rerun:
    built: object
    before: dict
    after: dict


@pytest.fixture(scope="module")
def cluster_rerun(cluster_build, cluster, cluster_blocks, repo_spec_path, work, mirror):
    """The same cluster build again, with the bucket listed before and after it."""
    from polar_cube.flows.build_cube import build_cube

    before = listing(cluster_blocks)
    again = build_cube(**cluster_options(repo_spec_path, work, mirror, cluster.address))
    return Rerun(again, before, listing(cluster_blocks))


def test_the_worker_is_another_user_who_cannot_read_the_flows_folders(cluster, work):
    from distributed import Client

    with Client(cluster.address) as client:
        assert set(client.run(os.getuid).values()) == {worker_ids()[0]}
        assert set(client.run(os.getenv, "HOME").values()) == {str(cluster.worker_home)}
        with pytest.raises(PermissionError):
            client.submit(Path.read_bytes, work / "cache" / PROBE, pure=False).result()
    assert (work / "cache" / PROBE).read_bytes()  # while the flow's user can


def test_the_scheduler_records_task_keys(cluster):
    from distributed import Client

    with Client(cluster.address) as client:
        assert client.submit(sum, [1, 2], key="polar-cube-probe-sum").result() == 3
    assert "polar-cube-probe-sum" in cluster.keys_file.read_text().splitlines()


def test_sources_are_staged_in_the_bucket_with_a_manifest_written_last(
    cluster_build, cluster_blocks, repo_spec_path
):
    fs = s3(cluster_blocks)
    for source in load_spec(repo_spec_path).select_sources(None):
        folder = f"{BUCKET_FOLDER}/sources/{source.id}"
        objects = fs.find(folder, detail=True)
        manifest_key = f"{folder}/.source.json"
        assert manifest_key in objects, sorted(objects)
        manifest = json.loads(fs.cat_file(manifest_key))
        assert isinstance(manifest["url"], str) and manifest["url"]
        assert len(manifest["sha256"]) == 64
        assert manifest["files"], manifest
        staged = {key: info for key, info in objects.items() if key != manifest_key}
        assert set(staged) == {f"{folder}/{name}" for name in manifest["files"]}
        for name, expected in manifest["files"].items():
            content = fs.cat_file(f"{folder}/{name}")
            assert len(content) == expected["size"], name
            assert hashlib.sha256(content).hexdigest() == expected["sha256"], name
        last = objects[manifest_key]["LastModified"]
        assert all(info["LastModified"] <= last for info in staged.values())


def test_the_worker_writes_every_chunk_straight_into_the_version_in_the_bucket(
    cluster_build, cluster_blocks, repo_spec_path, work
):
    fs = s3(cluster_blocks)
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    keys = VersionKeys(spec.data_id)
    for variable in spec.variables:
        for part in (f"{keys.cube}/{variable.name}", f"{keys.levels}/1.zarr/{variable.name}"):
            stored = fs.find(f"{BUCKET_FOLDER}/{part}")
            assert [k for k in stored if not is_metadata(k)], part  # its chunks
    for source in spec.select_sources(None):  # each source's metadata, and no chunk, apart
        for key in (keys.input_key(source.id), keys.input_levels_key(source.id)):
            stored = fs.find(f"{BUCKET_FOLDER}/{key}")
            assert stored, key
            names = {v.name for v in spec.variables_of(source.id)}
            chunks = [k for k in stored if not is_metadata(k) and k.split("/")[-2] in names]
            assert chunks == [], chunks[:5]
    assert not fs.exists(f"{BUCKET_FOLDER}/inputs")  # no per-dataset cubes beside the version
    assert {p.name for p in work.iterdir()} == {"cache"}  # nothing written on this machine
    assert not [p for p in work.rglob("*") if p.suffix in (".zarr", ".levels")]


def test_the_published_cube_equals_a_local_build(
    cluster_build, local_build, cluster_blocks, repo_spec_path
):
    assert (
        cluster_build.url
        == f"s3://{BUCKET_FOLDER}/{load_spec(repo_spec_path).at_resolution(RESOLUTION).data_id}"
    )
    variables = [v.name for v in load_spec(repo_spec_path).variables]
    cluster_cube = open_published(cluster_build.url, cluster_blocks)
    local_cube = xr.open_zarr(local_build.url, consolidated=True)
    for name in variables:
        np.testing.assert_array_equal(cluster_cube[name].values, local_cube[name].values)
        stats = "polar_cube_stats"
        assert cluster_cube[name].attrs[stats] == local_cube[name].attrs[stats], name
    cluster_levels = open_published(level_url(cluster_build.url), cluster_blocks)
    local_levels = xr.open_zarr(level_url(local_build.url), consolidated=True)
    for name in variables:
        np.testing.assert_array_equal(cluster_levels[name].values, local_levels[name].values)


def test_a_rerun_on_the_cluster_reuses_everything(cluster_rerun, cluster_build, repo_spec_path):
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    assert cluster_rerun.built.reused and cluster_rerun.built.url == cluster_build.url
    assert cluster_build.url.endswith("-v1.1.0.zarr") and not cluster_build.reused
    before, after = lasting(cluster_rerun.before), lasting(cluster_rerun.after)
    keys = VersionKeys(spec.data_id)
    for part in ("sources", keys.cube, keys.levels, keys.inputs, keys.quicklooks):
        assert any(k.startswith(f"{BUCKET_FOLDER}/{part}/") for k in before), part
    for name in (f"{spec.series}.versions.json", keys.stac_item):
        assert f"{BUCKET_FOLDER}/{name}" in before, name
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if after[k] != before[k])
    assert not changed, changed[:20]


def test_no_secret_reaches_the_cluster(cluster_rerun, cluster, s3_server):
    keys = cluster.keys_file.read_text()
    assert "resample" in keys and "write-block-and-stats" in keys  # the check sees the work
    worker_log = cluster.worker_log.read_text(errors="replace")
    assert worker_log.strip()
    texts = {
        "worker log": worker_log,
        "scheduler log": cluster.scheduler_log.read_text(errors="replace"),
        "task keys": keys,
    }
    for what, text in texts.items():
        for secret in (s3_server.secret_key, s3_server.access_key):
            assert secret not in text, f"an S3 key appears in the {what}"
