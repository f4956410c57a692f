"""Issue 21's must-show, end to end through the command line: one flipped byte in a chunk of
a published version; `polar-cube verify --deep` names that variable and chunk and exits 2;
`polar-cube repair` recomputes it from its source and the version is again what the clean
build wrote, every chunk object byte for byte (and every other object untouched).

Against a local folder (the source from the download cache) and the session's SeaweedFS
(the cache gone: the source is downloaded again), builds of the small stand-ins at 3000 m
served by the stand-in mirror, through the session's Prefect server; the bucket's build
deep-verifies before it publishes (`--deep-verify`, as the scheduled deployment does).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.sources.mirror import MirrorServer
from polar_cube.spec import load_spec
from tests.conftest import REPO
from tests.prefect_api import session_api_env
from tests.test_faults import _rewrite_values

pytestmark = pytest.mark.slow
RESOLUTION = "3000"
KEYS = VersionKeys(load_spec(REPO / "cube.geojson").at_resolution(float(RESOLUTION)).data_id)
DAMAGED = f"{KEYS.cube}/magnetic_anomaly/0.0"


@pytest.fixture(scope="module")
def sources(small_standins, tmp_path_factory) -> Path:
    """A copy of the small stand-ins, one of which a test changes (and restores)."""
    folder = tmp_path_factory.mktemp("repair-sources")
    for path in small_standins.iterdir():
        shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def mirror(sources):
    server = MirrorServer(("127.0.0.1", 0), sources)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def polar_cube(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args, "--resolution", RESOLUTION],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def digests(location: StoreLocation) -> dict[str, str]:
    """{key: sha256} of every object of the target (the lock aside)."""
    location.fs.invalidate_cache()
    root = location.path().rstrip("/")
    found = location.fs.find(root)
    return {
        path[len(root) + 1 :]: hashlib.sha256(location.fs.cat_file(path)).hexdigest()
        for path in found
        if ".polar-cube-lock" not in path
    }


def flip_a_byte(location: StoreLocation, key: str) -> None:
    data = bytearray(location.fs.cat_file(location.path(key)))
    data[len(data) // 2] ^= 0x01
    location.fs.pipe_file(location.path(key), bytes(data))
    location.fs.invalidate_cache()


def check_flip_verify_repair(location: StoreLocation, where: list[str], cache: Path, env, mirror):
    clean = digests(location)
    assert KEYS.manifest in clean and DAMAGED in clean
    verified = polar_cube("verify", "--deep", *where, env=env)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert re.fullmatch(r"\d+ chunks of 13 variables verified: \S+\n", verified.stdout)

    flip_a_byte(location, DAMAGED)
    damaged = polar_cube("verify", "--deep", *where, env=env)
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    lines = damaged.stderr.splitlines()
    assert re.fullmatch(
        r"magnetic_anomaly: chunk 0\.0 damaged \(sha256 [0-9a-f]{12} ≠ manifest [0-9a-f]{12}\): "
        + re.escape(location.url(DAMAGED)),
        lines[0],
    ), damaged.stderr
    assert lines[1].startswith("polar-cube: 1 of ") and len(lines) == 2

    repair = ["repair", *where, "--cache", str(cache), "--source-mirror", mirror.base_url]
    repaired = polar_cube(*repair, env=env)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert repaired.stdout.splitlines()[0] == (
        f"recomputed {lines[0]}"  # the line verify printed, now recomputed
    )
    assert digests(location) == clean  # every object as the clean build wrote it
    again = polar_cube("verify", "--deep", *where, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    nothing = polar_cube(*repair, env=env)
    assert nothing.returncode == 0 and nothing.stdout.startswith("nothing to repair: ")


def build(where: list[str], cache: Path, mirror, env, *extra: str) -> None:
    args = ["build", *where, "--cache", str(cache), "--source-mirror", mirror.base_url, *extra]
    result = polar_cube(*args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_flipped_byte_in_a_folder_is_named_and_repaired_from_the_cache(tmp_path, mirror, sources):
    env = session_api_env()
    where = ["--output", str(tmp_path / "out")]
    build(where, tmp_path / "cache", mirror, env)
    location = StoreLocation.local(tmp_path / "out")
    check_flip_verify_repair(location, where, tmp_path / "cache", env, mirror)

    # the source changed upstream since: that version cannot be made whole from it
    served = sources / load_spec(REPO / "cube.geojson").source("magnetic_anomaly").file_name
    original = served.read_bytes()
    flip_a_byte(location, DAMAGED)
    damaged = location.fs.cat_file(location.path(DAMAGED))
    _rewrite_values(served)
    try:
        repair = ["repair", *where, "--cache", str(tmp_path / "cache")]
        refused = polar_cube(*repair, "--source-mirror", mirror.base_url, env=env)
    finally:
        served.write_bytes(original)  # the other test's source, as it was
        later = time.time_ns() + 4 * 10**9
        os.utime(served, ns=(later, later))
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("polar-cube: ")]
    assert len(errors) == 1 and re.match(
        r"polar-cube: error: magnetic_anomaly \(\S+\): changed upstream \(sha256 [0-9a-f]{12} "
        rf"≠ [0-9a-f]{{12}} it was built from\): {re.escape(KEYS.cube)} cannot be repaired "
        "from it, build a new version instead$",
        errors[0],
    ), refused.stderr
    assert location.fs.cat_file(location.path(DAMAGED)) == damaged  # nothing written


def test_a_flipped_byte_in_seaweedfs_is_named_and_repaired_downloading_again(
    tmp_path, mirror, s3_server
):
    from polar_cube.tasks.blocks import bucket_location, save_blocks

    env = session_api_env()
    save_blocks(
        bucket_block="polar-repair-bucket",
        credentials_block="polar-repair-credentials",
        bucket_name="polar-test",
        bucket_folder="repair",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    where = ["--bucket-block", "polar-repair-bucket"]
    build(where, tmp_path / "cache", mirror, env, "--deep-verify")
    shutil.rmtree(tmp_path / "cache")  # repair downloads the source again
    check_flip_verify_repair(
        bucket_location("polar-repair-bucket"), where, tmp_path / "cache", env, mirror
    )
    assert (tmp_path / "cache" / "magnetic_anomaly").is_dir()
