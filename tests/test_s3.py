"""S3 storage: a real local SeaweedFS server, real Prefect blocks, s3fs and zarr over S3."""

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import fsspec
import numpy as np
import pytest
import s3fs
import xarray as xr

from polar_cube.cli.s3 import add_blocks_commands, add_s3_commands
from polar_cube.location import StoreLocation
from polar_cube.servers.s3server import (
    S3ServerError,
    S3ServerInfo,
    running_s3_server,
    s3_server_status,
    server_ports,
    start_s3_server,
    stop_s3_server,
)
from polar_cube.storage import StorageAccessError, check_bucket_access
from polar_cube.tasks.blocks import (
    bucket_url,
    load_bucket,
    save_blocks,
    storage_options_from_blocks,
)

pytestmark = pytest.mark.slow

BUCKET = "test-bucket"


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def process_is_gone(pid: int) -> bool:
    """No such process, or only a zombie (no threads left) for init to reap."""
    try:
        os.kill(pid, 0)
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (ProcessLookupError, FileNotFoundError):
        return True
    return state == "Z" and threads == 1


def free_port_block(start: int) -> int:
    """The first S3 port from `start` (stepping 16) whose server ports are all free."""
    for port in range(start, start + 4000, 16):
        if all(_port_is_free(p) for p in server_ports(port).values()):
            return port
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_s3_server(
        tmp_path_factory.mktemp("s3"),
        port=free_port_block(21000),
        bucket=BUCKET,
        stop_timeout_seconds=2,
    ) as info:
        yield info


@pytest.fixture(scope="module")
def bucket_block(server):
    save_blocks(
        bucket_block="test-bucket-block",
        credentials_block="test-credentials",
        bucket_name=BUCKET,
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    return load_bucket("test-bucket-block")


@pytest.fixture
def options(bucket_block):
    return storage_options_from_blocks(bucket_block)


def test_blocks_to_s3fs_and_zarr_round_trip(server, bucket_block, options):
    assert options["key"] == server.access_key
    assert options["secret"] == server.secret_key
    assert options["client_kwargs"] == {
        "endpoint_url": server.endpoint_url,
        "region_name": "us-east-1",
    }
    check_bucket_access(bucket_url(bucket_block), options)

    fs = s3fs.S3FileSystem(**options)
    fs.pipe_file(f"{BUCKET}/hello.txt", b"hello polar")
    assert fs.cat_file(f"{BUCKET}/hello.txt") == b"hello polar"

    url = bucket_url(bucket_block, "x.zarr")
    assert url == "s3://test-bucket/x.zarr"
    ds = xr.Dataset(
        {"thickness": (("y", "x"), np.arange(12, dtype="float32").reshape(3, 4))},
        coords={"y": [0.0, 1.0, 2.0], "x": [0.0, 1.0, 2.0, 3.0]},
        attrs={"title": "tiny"},
    )
    ds.to_zarr(url, storage_options=options, zarr_format=2, consolidated=True, mode="w")
    assert fs.exists(f"{BUCKET}/x.zarr/.zmetadata")
    back = xr.open_zarr(url, storage_options=options, consolidated=True)
    xr.testing.assert_identical(back.load(), ds)


def test_a_put_is_checksummed_but_its_body_not_signed_unless_the_block_says_so(
    server, bucket_block, options
):
    """Signing the body over plain http costs ~1 CPU-second per GB; the CRC32 covers it."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    sent: list[dict] = []
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.ls(BUCKET)  # the client exists once something was asked
    fs.s3.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    fs.pipe_file(f"{BUCKET}/unsigned.bin", b"\x00\x01" * 50_000)
    assert fs.cat_file(f"{BUCKET}/unsigned.bin") == b"\x00\x01" * 50_000
    headers = {k.lower(): v for k, v in sent[0].items()}
    assert headers["x-amz-content-sha256"] == b"UNSIGNED-PAYLOAD"
    assert "x-amz-checksum-crc32" in headers or "x-amz-trailer" in headers

    signing = AwsClientParameters(config={"s3": {"payload_signing_enabled": True}})
    block = S3Bucket(bucket_name=BUCKET, credentials=AwsCredentials(aws_client_parameters=signing))
    assert storage_options_from_blocks(block)["config_kwargs"]["s3"] == {
        "payload_signing_enabled": True
    }


def test_chunks_go_up_with_their_manifest_digest_which_the_server_checks_and_keeps(options):
    """A chunk's PUT carries the sha256 its manifest records: the server refuses a body that
    does not match, and keeps the digest as the object's checksum."""
    from polar_cube.zarr_store import (
        checked_put,
        chunk_digest,
        sending_in_background,
        write_chunk,
    )

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    array = StoreLocation(f"s3://{BUCKET}/digests.zarr/v", options)
    block = np.arange(16, dtype="float32").reshape(4, 4)
    for background in (False, True):  # straight, and by the writing pass's sender
        with sending_in_background(array) if background else nullcontext() as sender:
            assert (sender is not None) == background
            key, digest = write_chunk(array, (0, int(background)), block, (4, 4), sender=sender)
        head = fs.call_s3(
            "head_object", Bucket=BUCKET, Key=f"digests.zarr/v/{key}", ChecksumMode="ENABLED"
        )
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == digest[0]
        assert chunk_digest(fs.cat_file(array.path(key))) == digest

    wrong = checked_put(fs, hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(OSError):
        fs.pipe_file(array.path("0.2"), b"these bytes", **wrong)
    assert not fs.exists(array.path("0.2"))
    assert checked_put(fsspec.filesystem("file"), digest[0]) == {}
    optional = {"request_checksum_calculation": "when_required"}
    plain = s3fs.S3FileSystem(skip_instance_cache=True, **(options | {"config_kwargs": optional}))
    assert checked_put(plain, digest[0]) == {}


def test_writing_passes_side_by_side_wait_for_and_fail_on_their_own_chunks(options):
    from polar_cube.zarr_store import sending_in_background, write_chunk

    good = StoreLocation(f"s3://{BUCKET}/passes.zarr/v", options)
    bad = StoreLocation("s3://no-such-bucket-here/passes.zarr/v", options)
    block = np.ones((4, 4), dtype="float32")
    with sending_in_background(good) as kept:
        with pytest.raises(OSError), sending_in_background(bad) as failing:
            assert failing != kept
            write_chunk(bad, (0, 0), block, (4, 4), sender=failing)
            for column in range(8):  # the other pass goes on while this one fails
                write_chunk(good, (0, column), block, (4, 4), sender=kept)
        write_chunk(good, (1, 0), block, (4, 4), sender=kept)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    stored = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(good.path()))
    assert stored == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "1.0"]


def test_bucket_url_joins_folder_and_parts_without_double_slashes():
    from prefect_aws import AwsCredentials, S3Bucket

    block = S3Bucket(bucket_name="b-1", credentials=AwsCredentials(), bucket_folder="/cubes/")
    assert bucket_url(block) == "s3://b-1/cubes"
    assert bucket_url(block, "v1/", "/x.zarr") == "s3://b-1/cubes/v1/x.zarr"
    block = S3Bucket(bucket_name="b-1", credentials=AwsCredentials())
    assert bucket_url(block, "x.zarr") == "s3://b-1/x.zarr"


def test_wrong_secret_is_access_denied_and_never_shown(server, options):
    wrong = "0123456789abcdef-wrong-secret"
    for write in (True, False):
        with pytest.raises(StorageAccessError) as caught:
            check_bucket_access("s3://test-bucket/cubes", options | {"secret": wrong}, write=write)
        message = str(caught.value)
        assert "s3://test-bucket/cubes: access denied" in message
        assert "keys were refused by " + server.endpoint_url in message
        assert wrong not in message and server.secret_key not in message


def test_unknown_access_key_is_access_denied(options):
    with pytest.raises(StorageAccessError, match="access denied"):
        check_bucket_access("s3://test-bucket", options | {"key": "nobody"})


def test_anonymous_access_is_refused(server):
    anonymous = {"anon": True, "client_kwargs": {"endpoint_url": server.endpoint_url}}
    with pytest.raises(StorageAccessError, match="access denied: anonymous"):
        check_bucket_access("s3://test-bucket", anonymous, write=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **anonymous)
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{BUCKET}/anonymous.txt", b"no")


def test_missing_bucket_is_named(server, options):
    for write in (True, False):
        with pytest.raises(StorageAccessError) as caught:
            check_bucket_access("s3://no-such-bucket/cubes", options, write=write)
        assert str(caught.value) == (
            f"s3://no-such-bucket/cubes: bucket no-such-bucket does not exist at "
            f"{server.endpoint_url}"
        )


def test_unreachable_endpoint_says_start_the_server(options):
    closed_port = free_port_block(26000)
    endpoint = f"http://127.0.0.1:{closed_port}"
    unreachable = options | {"client_kwargs": {"endpoint_url": endpoint}}
    started = time.monotonic()
    with pytest.raises(StorageAccessError) as caught:
        check_bucket_access("s3://test-bucket", unreachable)
    assert time.monotonic() - started < 10
    assert f"cannot reach S3 endpoint {endpoint}" in str(caught.value)
    assert "polar-cube s3 start" in str(caught.value)


def test_missing_block_names_it_and_says_how_to_create_it():
    with pytest.raises(StorageAccessError) as caught:
        load_bucket("no-such-bucket-block")
    assert str(caught.value) == (
        "no S3Bucket block named 'no-such-bucket-block'; create it with `polar-cube blocks create`"
    )


def test_secrets_are_hidden(server, bucket_block):
    credentials = bucket_block.credentials
    assert credentials.aws_secret_access_key.get_secret_value() == server.secret_key
    assert server.secret_key not in repr(credentials)
    assert server.secret_key not in repr(bucket_block)
    assert server.secret_key not in repr(server) and server.access_key in repr(server)
    for name in ("server.json", "identities.json"):
        assert stat.S_IMODE((server.state_dir / name).stat().st_mode) == 0o600
    state = json.loads((server.state_dir / "server.json").read_text())
    assert state["pid"] == server.pid and state["secret_key"] == server.secret_key
    assert set(state["ports"].values()) == set(server_ports(state["ports"]["s3.port"]).values())


def test_start_is_idempotent_and_server_runs_in_its_own_session(server):
    again = start_s3_server(server.state_dir, bucket=BUCKET)
    assert again == server
    assert s3_server_status(server.state_dir) == server
    assert os.getpgid(server.pid) == server.pid != os.getpgid(0)
    assert os.getsid(server.pid) != os.getsid(0)


def test_busy_port_is_named(tmp_path):
    port = free_port_block(27000)
    busy = port + 3
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        taken.listen()
        with pytest.raises(S3ServerError, match=f"port {busy} .* is in use"):
            start_s3_server(tmp_path / "s3", port=port)
    assert not (tmp_path / "s3" / "server.json").exists()


@pytest.mark.parametrize(
    ("script", "what"),
    [
        ("echo cannot start: bad things; exit 3", "exited early"),
        ("echo starting slowly; exec sleep 60", "did not answer within 1 s"),
    ],
)
def test_failed_start_shows_the_log_and_leaves_nothing_running(tmp_path, monkeypatch, script, what):
    fake = tmp_path / "weed"
    fake.write_text(f"#!/bin/sh\nfor i in $(seq 1 30); do echo log line $i; done\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr("polar_cube.servers.s3server.weed_binary", lambda: fake)
    state_dir = tmp_path / "s3"
    with pytest.raises(S3ServerError) as caught:
        start_s3_server(state_dir, port=free_port_block(29000), timeout_seconds=1)
    message = str(caught.value)
    assert what in message and str(state_dir / "weed.log") in message
    assert "log line 30" in message and "log line 5\n" not in message
    assert not (state_dir / "server.json").exists()
    assert s3_server_status(state_dir) is None


def test_server_outlives_its_starter_and_is_stopped_by_pid(tmp_path):
    state_dir = tmp_path / "s3"
    port = free_port_block(28000)
    starter = (
        "import sys; from pathlib import Path; "
        "from polar_cube.servers.s3server import start_s3_server; "
        "print(start_s3_server(Path(sys.argv[1]), port=int(sys.argv[2])).pid)"
    )
    result = subprocess.run(
        [sys.executable, "-c", starter, str(state_dir), str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.strip())
    try:
        info = s3_server_status(state_dir)  # the starter has exited; the server has not
        assert isinstance(info, S3ServerInfo) and info.pid == pid
        assert info.endpoint_url == f"http://127.0.0.1:{port}"
        assert os.getpgid(pid) != os.getpgid(0)
    finally:
        # graceful stop takes ~15 s (the filer's gRPC drain); 3 s then SIGKILL keeps this short
        assert stop_s3_server(state_dir, timeout_seconds=3) is True
    assert process_is_gone(pid)
    assert _port_is_free(port)
    assert not (state_dir / "server.json").exists()
    assert stop_s3_server(state_dir) is False
    assert s3_server_status(state_dir) is None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar-cube")
    commands = parser.add_subparsers(dest="command", required=True)
    add_s3_commands(commands)
    add_blocks_commands(commands)
    return parser


def run(argv, capsys):
    args = make_parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out + err


def test_cli_s3_start_and_status_never_print_the_secret(server, capsys):
    state = str(server.state_dir)
    port = str(server.endpoint_url.rsplit(":", 1)[1])
    code, out = run(["s3", "start", "--state-dir", state, "--port", port], capsys)
    assert code == 0 and server.endpoint_url in out and "server.json" in out
    code, out2 = run(["s3", "status", "--state-dir", state], capsys)
    assert code == 0 and f"pid {server.pid}" in out2
    assert server.secret_key not in out + out2


def test_cli_blocks_create_from_s3_server(server, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    argv = ["blocks", "create", "--from-s3-server", str(server.state_dir), "--bucket", BUCKET]
    argv += ["--bucket-block", "cli-bucket", "--credentials-block", "cli-credentials"]
    code, out = run(argv, capsys)
    assert code == 0
    assert "'cli-bucket' -> s3://test-bucket" in out
    assert server.secret_key not in out and server.access_key not in out
    block = load_bucket("cli-bucket")
    assert block.bucket_name == BUCKET
    options = storage_options_from_blocks(block)
    assert options["secret"] == server.secret_key
    check_bucket_access(bucket_url(block, "from-cli"), options)


def test_cli_blocks_create_names_what_is_missing(tmp_path, capsys, monkeypatch):
    for name in ("POLAR_CUBE_S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = make_parser().parse_args(["blocks", "create", "--access-key", "ak"])
    with pytest.raises(StorageAccessError) as caught:
        args.func(args)
    message = str(caught.value)
    assert "missing bucket (--bucket or POLAR_CUBE_S3_BUCKET)" in message
    assert "secret key (--secret-key or AWS_SECRET_ACCESS_KEY)" in message
    assert "access key" not in message
    args = make_parser().parse_args(["blocks", "create", "--from-s3-server", str(tmp_path)])
    with pytest.raises(StorageAccessError, match="no S3 server running for"):
        args.func(args)


# S3 requests that create, replace or remove objects (s3fs sends every request through
# S3FileSystem._call_s3, whoever calls it: xarray, zarr, our own steps)
WRITES = {
    "put_object",
    "copy_object",
    "upload_part",
    "upload_part_copy",
    "create_multipart_upload",
    "complete_multipart_upload",
    "delete_object",
    "delete_objects",
}


def record_s3_calls(monkeypatch) -> list[tuple[str, str | None, str | None]]:
    """(request, key, copy source key) of every S3 request from here on."""
    calls = []
    original = s3fs.S3FileSystem._call_s3

    async def recording(self, method, *args, **kwargs):
        source = (kwargs.get("CopySource") or {}).get("Key")
        calls.append((method, kwargs.get("Key"), source))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recording)
    return calls


def variable_chunk(key: str | None, names) -> bool:
    """A chunk object of one of the variables `names` (`…/<var>/1.0`, `…/<var>/0.1.2`), in a
    cube or in one of its overview levels; not metadata, not a coordinate's chunk."""
    if not key or "/" not in key:  # e.g. a source's chunk record `<id>.chunks.json`
        return False
    *_, variable, name = key.split("/")
    return variable in names and re.fullmatch(r"\d+(\.\d+)+", name) is not None


def chunk_listing(location, keys, names) -> dict[str, tuple]:
    """(ETag, LastModified) of every variable chunk object in the version's cube and levels."""
    location.fs.invalidate_cache()
    found = {}
    for key in (keys.cube, keys.levels):
        for path, info in location.fs.find(location.path(key), detail=True).items():
            if variable_chunk(path, names):
                found[path] = (info["ETag"], info["LastModified"])
    return found


@dataclass(frozen=True)
class Drafted:
    """A first version in the bucket with every source's chunks written into it, unmerged."""

    location: object
    spec: object
    grid: object
    keys: object
    datasets: dict
    chunks: dict  # chunk_listing right after the writes


@pytest.fixture(scope="module")
def drafted(bucket_block, small_standins, repo_spec_path, tmp_path_factory):
    from polar_cube.grid import TargetGrid
    from polar_cube.keys import VersionKeys
    from polar_cube.location import StoreLocation
    from polar_cube.spec import load_spec
    from tests.test_merge import CHUNK_SIZE, build_inputs, write_inputs

    spec = load_spec(repo_spec_path)
    grid = dataclasses.replace(TargetGrid.from_spec(spec, 3000.0), chunk_size=CHUNK_SIZE)
    datasets = build_inputs(small_standins, spec, grid, tmp_path_factory.mktemp("s3-merge"))
    location = StoreLocation(f"s3://{BUCKET}/merge", storage_options_from_blocks(bucket_block))
    keys = VersionKeys(spec.data_id)
    write_inputs(datasets, location, keys, grid)  # straight into the bucket, as a build does
    names = [v.name for v in spec.variables]
    chunks = chunk_listing(location, keys, names)
    time.sleep(1.1)  # LastModified has whole seconds: a rewrite from now on would show
    return Drafted(location, spec, grid, keys, datasets, chunks)


def test_the_sources_chunks_are_in_the_version_and_only_their_metadata_apart(drafted):
    from polar_cube.keys import is_metadata
    from polar_cube.location import remote_files

    location, spec, keys = drafted.location, drafted.spec, drafted.keys
    names = [v.name for v in spec.variables]
    for variable in spec.variables:
        in_cube = [k for k in drafted.chunks if k.startswith(location.path(keys.cube) + "/")]
        assert [k for k in in_cube if k.split("/")[-2] == variable.name], variable.name
        in_levels = [k for k in drafted.chunks if k.startswith(location.path(keys.levels) + "/")]
        assert [k for k in in_levels if k.split("/")[-2] == variable.name], variable.name
        stored = remote_files(location, keys.input_key(variable.source), variable.name)
        assert stored and all(is_metadata(k) for k in stored), variable.name
    inputs = remote_files(location, keys.inputs)
    assert inputs and not [k for k in inputs if variable_chunk(k, names)]
    assert not location.exists(keys.cube, ".zmetadata")  # not merged: no cube yet


def test_merge_writes_metadata_only_and_publishing_is_one_catalog_write(drafted, monkeypatch):
    """On S3 the merge (and patch) PUT only metadata next to the chunks the builds wrote, and
    never copy, rewrite, read or decode a chunk; the version is published by one PUT of the
    catalog (after its chunk manifest's). Every chunk object keeps its ETag and LastModified;
    the cube holds the values the sources were built with."""
    from polar_cube.cube import target as steps
    from polar_cube.cube.patching import load_patch
    from polar_cube.cube.versions import VersionError, catalog_key, latest_cube
    from polar_cube.keys import is_metadata
    from tests.conftest import REPO
    from tests.test_merge import TIMESTAMPED, refuse_chunk_codec

    location, spec, grid, keys = drafted.location, drafted.spec, drafted.grid, drafted.keys
    names = [v.name for v in spec.variables]
    patch_path = REPO / "patch.yaml"
    patch = load_patch(patch_path)
    calls = record_s3_calls(monkeypatch)
    refuse_chunk_codec(monkeypatch)

    staged = steps.stage_merged_cube(location, spec, grid, patch)
    assert (staged.key, staged.levels_key) == (keys.cube, keys.levels) and not staged.reused
    assert steps.patch_staged_cube(location, staged, patch, patch_path)
    merging = [c for c in calls if c[0] in WRITES]
    assert merging and {method for method, _, _ in merging} == {"put_object"}  # no copies
    assert [key for _, key, _ in merging if variable_chunk(key, names)] == []
    assert not [
        key for method, key, _ in calls if method == "get_object" and variable_chunk(key, names)
    ]
    version = (f"merge/{keys.cube}/", f"merge/{keys.levels}/")
    assert all(key.startswith(version) for _, key, _ in merging)  # only into the new version
    assert any(is_metadata(key) for _, key, _ in merging)
    with pytest.raises(VersionError, match="no published version"):
        latest_cube(location, spec.series)  # merged and patched, not yet published

    calls.clear()
    published = steps.publish_staged_cube(location, spec, staged, patch)
    assert [c for c in calls if c[0] in WRITES] == [  # the chunk manifest, then the catalog
        ("put_object", f"merge/{keys.manifest}", None),
        ("put_object", f"merge/{catalog_key(spec.series)}", None),
    ]
    assert published.cube == latest_cube(location, spec.series) == keys.cube
    assert published.fingerprint == staged.fingerprint

    monkeypatch.undo()
    assert chunk_listing(location, keys, names) == drafted.chunks  # not one chunk rewritten
    cube = steps.open_cube(location, keys.cube)
    assert cube.attrs["title"] == "Polar Data Cube v1.1.0"  # the patch's
    for variable in spec.variables:
        values = drafted.datasets[variable.source][variable.name].values.astype("float32")
        assert np.isfinite(values).any(), variable.name
        np.testing.assert_array_equal(cube[variable.name].values, values, err_msg=variable.name)
    for name in TIMESTAMPED:
        assert name in cube.attrs


def test_a_sources_metadata_is_stored_once_per_object_and_never_read_back(
    drafted, bucket_block, monkeypatch
):
    """Writing a source into a version renders its metadata (group, arrays, coordinates,
    each overview level) in memory and PUTs every object once, concurrently, its completion
    markers last; it reads nothing back and probes nothing: its only other requests clear
    what an earlier attempt may have left (the markers, and its parts in the version)."""
    from polar_cube.dataset import InVersion, write_dataset
    from polar_cube.keys import VersionKeys, is_metadata
    from polar_cube.location import StoreLocation
    from polar_cube.stats import STATS_ATTR

    location = StoreLocation(f"s3://{BUCKET}/once", storage_options_from_blocks(bucket_block))
    keys = VersionKeys(drafted.spec.data_id)
    source_id, dataset = next(iter(drafted.datasets.items()))
    into = InVersion(location, keys, source_id)
    calls = record_s3_calls(monkeypatch)
    write_dataset(dataset, into, drafted.grid)
    monkeypatch.undo()

    puts = [key for method, key, _ in calls if method == "put_object"]
    metadata = [key for key in puts if is_metadata(key)]
    assert metadata and len(metadata) == len(set(metadata))  # each object once
    assert not [key for method, key, _ in calls if method == "get_object"]  # nothing read back
    cube, levels = (f"once/{keys.input_key(source_id)}", f"once/{keys.input_levels_key(source_id)}")
    assert puts.index(f"{cube}/.zmetadata") == max(
        i for i, key in enumerate(puts) if key.startswith(f"{cube}/")
    )
    assert puts.index(f"{levels}/.zlevels") == max(
        i for i, key in enumerate(puts) if key.startswith(f"{levels}/")
    )
    assert puts.index(f"{levels}/.zlevels") < puts.index(f"{cube}/.zmetadata")
    levels_written = {key.split("/")[-2] for key in metadata if key.startswith(f"{levels}/")}
    parts = 2 + len(levels_written) * len(dataset.data_vars)  # cleared: ≤ 2 requests each
    others = [(m, key) for m, key, _ in calls if m not in WRITES | {"delete_objects"}]
    assert len(others) <= 3 + 2 * parts, others  # 3: the markers' and manifest's HEADs
    opened = xr.open_zarr(location.mapper(keys.input_key(source_id)), consolidated=True)
    layers = [name for name, v in dataset.data_vars.items() if v.dims[-2:] == ("y", "x")]
    assert layers and all(STATS_ATTR in opened[name].attrs for name in layers)  # after the pass


def test_carrying_copies_each_chunk_object_server_side_never_through_this_machine(
    drafted, monkeypatch
):
    """A source unchanged since the version that has it is carried into the next one with
    one CopyObject per object: no chunk is read (GET) or written (PUT) by this process,
    the copies have the same bytes (ETag), and the old version is left as it was."""
    from polar_cube.cube.carry import carry_sources
    from polar_cube.keys import VersionKeys

    location, spec, keys = drafted.location, drafted.spec, drafted.keys
    carried_ids = ["magnetic_anomaly", "subglacial_lakes_thwaites"]
    names = [v.name for s in carried_ids for v in spec.variables_of(s)]
    following = spec.at_version("1.1.1")
    new = VersionKeys(following.data_id)
    calls = record_s3_calls(monkeypatch)

    copied = carry_sources(location, following, {s: keys for s in carried_ids}, new)

    chunk_copies = [(key, source) for method, key, source in calls if method == "copy_object"]
    chunk_copies = [(k, s) for k, s in chunk_copies if variable_chunk(k, names)]
    expected = {k: v for k, v in drafted.chunks.items() if k.split("/")[-2] in names}
    assert copied == len(chunk_copies) == len(expected) > 2 * len(names)
    assert sorted(source for _, source in chunk_copies) == sorted(
        k.removeprefix(f"{BUCKET}/") for k in expected
    )
    moved = [c for c in calls if c[0] in ("put_object", "get_object", "upload_part")]
    assert not [c for c in moved if variable_chunk(c[1], [v.name for v in spec.variables])]
    monkeypatch.undo()
    after = chunk_listing(location, new, names)
    assert {k.replace(new.stem, keys.stem): etag for k, (etag, _) in after.items()} == {
        k: etag for k, (etag, _) in expected.items()
    }
    for source_id in carried_ids:  # its metadata too, markers included
        assert location.exists(new.input_key(source_id), ".zmetadata")
        assert location.exists(new.input_levels_key(source_id), ".zlevels")
    others = [v.name for v in spec.variables if v.name not in names]
    assert not chunk_listing(location, new, others)  # only the sources asked for
    assert chunk_listing(location, keys, [v.name for v in spec.variables]) == drafted.chunks


def test_cli_blocks_create_checks_the_keys_before_saving(server, capsys, monkeypatch):
    from polar_cube.cli import main

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # from the environment, not argv
    names = ["--bucket-block", "unchecked-bucket", "--credentials-block", "unchecked-keys"]
    argv = ["blocks", "create", "--endpoint-url", server.endpoint_url, "--bucket", BUCKET]
    argv += ["--access-key", server.access_key, *names]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"polar-cube: error: s3://{BUCKET}: access denied")
    assert "no block was saved (--no-check saves them unchecked)" in err
    assert "not-the-secret" not in err
    with pytest.raises(StorageAccessError, match="no S3Bucket block named 'unchecked-bucket'"):
        load_bucket("unchecked-bucket")
    assert main([*argv, "--no-check"]) == 0  # saved as given, on request
    assert load_bucket("unchecked-bucket").bucket_name == BUCKET


def test_the_lock_works_in_a_bucket(server, options):
    from polar_cube.location import StoreLocation
    from polar_cube.target_lock import TargetBusyError, TargetLock

    location = StoreLocation(f"s3://{BUCKET}/locked-target", options)
    with TargetLock(location, settle_seconds=0.2) as holder:
        with pytest.raises(TargetBusyError, match=f"pid {holder.entry.pid} on "):
            TargetLock(location, settle_seconds=0.2).acquire()
    with TargetLock(location, settle_seconds=0.2):
        pass
    fs = location.fs
    fs.invalidate_cache()
    assert [
        p for p in fs.ls(location.path(".polar-cube-lock"), detail=False) if p.endswith(".json")
    ] == []
