"""A publish killed at any moment, against the real S3 server (SeaweedFS): `latest` names the
old or the new version, never anything else, and both open with exactly their own values;
the next build resumes the killed one's draft and publishes.

Each round starts a child (`tests/publish_child.py`) that builds the next version of a
small cube (new values) and SIGKILLs it a chosen time after it says `PUBLISHING` (0 to
~60 ms: before, during and after the one catalog write), or while it writes its draft.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube.versions import read_catalog
from polar_cube.location import StoreLocation
from tests.conftest import REPO
from tests.publish_child import SPEC, expected

pytestmark = pytest.mark.slow
PATCH = """\
zarr_consolidated_format: 1
metadata:
  .zattrs:
    title: Polar Data Cube (kill test)
  magnetic_anomaly/.zattrs: {color_bar_name: RdBu_r}
"""


@pytest.fixture(scope="module")
def bucket(s3_server):
    options = {
        "key": s3_server.access_key,
        "secret": s3_server.secret_key,
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url},
    }
    return StoreLocation("s3://polar-test/publish-kill", options)


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("publish-kill") / "patch.yaml"
    path.write_text(PATCH)
    return path


def start_child(location: StoreLocation, shift: int, patch_file) -> subprocess.Popen:
    request = {
        "root": location.root,
        "storage_options": location.storage_options,
        "shift": shift,
        "patch": str(patch_file),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.publish_child", json.dumps(request)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(child: subprocess.Popen, word: str) -> list[str]:
    """Lines the child printed up to (and with) the first starting with `word`."""
    lines = []
    for line in child.stdout:
        lines.append(line.strip())
        if line.startswith(word):
            return lines
    raise AssertionError(f"the child ended without {word}: {lines} {child.stderr.read()[-2000:]}")


def values_of(location: StoreLocation, cube: str) -> dict[str, np.ndarray]:
    opened = xr.open_zarr(location.mapper(cube), consolidated=True, chunks={})
    return {v.name: opened[v.name].values for v in SPEC.variables}


def assert_holds(location: StoreLocation, cube: str, shift: int) -> None:
    for name, values in values_of(location, cube).items():
        np.testing.assert_array_equal(values, expected(name, shift), err_msg=f"{cube}: {name}")


def test_a_publish_killed_at_any_moment_leaves_latest_at_the_old_or_the_new_version(
    bucket, patch_file
):
    first = start_child(bucket, 1, patch_file)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    shifts = {read_catalog(bucket, SPEC.series).latest: 1}
    # One kill per moment that leads somewhere else (each round is a whole child build, ~6 s):
    # the catalog write is one PUT of ~10 ms, so 0 s lands as it starts (or just before it),
    # 0.01 s within or at its end (later on a loaded machine), 0.06 s after it (the new version
    # is `latest`: "new"). None kills the child while it writes its draft ("old"); the next
    # round resumes that draft with new values, and the finisher resumes the last one. (Kills
    # at 0.003 and 0.03 s, and a second one while writing a draft, fell in these same windows.)
    delays = [0.0, 0.01, 0.06, None]
    outcomes = []
    for round_number, delay in enumerate(delays, start=2):
        before = read_catalog(bucket, SPEC.series).latest_version
        child = start_child(bucket, round_number, patch_file)
        draft = wait_for(child, "DRAFT")[-1].split()[1]
        shifts[draft] = round_number
        if delay is None:  # while it writes the draft (its sources take ~3 s)
            time.sleep(0.3)
        else:
            wait_for(child, "PUBLISHING")
            time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
        after = read_catalog(bucket, SPEC.series).latest_version
        assert after.version in (before.version, draft), (before, draft, after)
        assert_holds(bucket, after.cube, shifts[after.version])  # latest opens whole
        assert_holds(bucket, before.cube, shifts[before.version])  # the old one too
        outcomes.append("new" if after.version == draft else "old")
        if after.version != draft:  # the next round resumes this draft with new values
            del shifts[draft]
    # the kills landed on both sides of the catalog write
    assert "old" in outcomes and "new" in outcomes, outcomes
    finisher = start_child(bucket, 99, patch_file)
    assert finisher.wait(timeout=300) == 0, finisher.stderr.read()[-2000:]
    latest = read_catalog(bucket, SPEC.series).latest_version
    assert_holds(bucket, latest.cube, 99)
    for entry in read_catalog(bucket, SPEC.series).versions:  # every version still opens
        assert_holds(bucket, entry.cube, shifts.get(entry.version, 99))
