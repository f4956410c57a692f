"""`--format icechunk` (issue 20, item 3): each new version of a zarr 3 series committed to
the Icechunk repository `<series>.icechunk` by reference (`commit_by_reference`), tagged
`v<version>`, against the real SeaweedFS server (fixture `s3_server`) and a local folder.

The commit copies no chunk (the repository holds metadata, manifests and snapshots only);
each tag reads back equal to its version's zarr; a rerun commits nothing; a commit replaces
the whole hierarchy (a variable dropped in the new version is gone from it); a chunk changed
in place after the commit is refused on read (its ETag is recorded), not served; rollback and
prune follow in the repository; a SIGKILL at any moment of a commit leaves `main` at the old
version or the new one, both whole; the README's snippet opens it; and `polar-cube build
--format icechunk` does it all through Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube.icechunk_repo import (
    IcechunkError,
    commit_by_reference,
    delete_version_tags,
    list_versions,
    open_repository,
    open_version,
    reset_to_version,
)
from polar_cube.location import StoreLocation, remote_files
from tests.conftest import REPO
from tests.snippets import snippet

BUCKET = "polar-test"  # the bucket of conftest's s3_server
SERIES = "polar-test-zarr3"
REPO_KEY = f"{SERIES}.icechunk"


def cube_key(version: str) -> str:
    return f"{SERIES}-v{version}.zarr"


def version_dataset(seed: int, names=("a", "b")) -> xr.Dataset:
    """Random float32 variables (y, x) with ascending coordinates, like a small cube."""
    rng = np.random.default_rng(seed)
    shape = (96, 128)
    return xr.Dataset(
        {name: (("y", "x"), rng.random(shape, dtype="float32")) for name in names},
        coords={"x": np.arange(shape[1]) * 100.0 + 50, "y": np.arange(shape[0]) * 100.0 + 50},
        attrs={"title": f"version {seed}"},
    )


def write_version(location: StoreLocation, version: str, ds: xr.Dataset) -> None:
    """A zarr 3 cube version as a build leaves it: variable `a` sharded (2 x 2 chunks a
    shard), the others in plain chunks, consolidated metadata in the root zarr.json."""
    encoding = {name: {"chunks": (32, 32)} for name in ds.data_vars}
    encoding["a"] |= {"shards": (64, 64)}
    ds.to_zarr(
        location.url(cube_key(version)),
        zarr_format=3,
        consolidated=True,
        mode="w",
        encoding=encoding,
        storage_options=location.storage_options or None,
    )


def s3_location(server) -> StoreLocation:
    options = {
        "key": server.access_key,
        "secret": server.secret_key,
        "client_kwargs": {"endpoint_url": server.endpoint_url},
    }
    return StoreLocation(f"s3://{BUCKET}/ic-{uuid.uuid4().hex[:8]}", options)


@pytest.fixture(params=["s3", "local"])
def location(request, tmp_path) -> StoreLocation:
    if request.param == "local":
        return StoreLocation.local(tmp_path / "cubes")
    return s3_location(request.getfixturevalue("s3_server"))


def assert_same(opened: xr.Dataset, expected: xr.Dataset) -> None:
    assert sorted(opened.data_vars) == sorted(expected.data_vars)
    for name in expected.data_vars:
        np.testing.assert_array_equal(opened[name].values, expected[name].values, err_msg=name)
    assert opened.attrs["title"] == expected.attrs["title"]


def repository_objects(location: StoreLocation) -> dict[str, int]:
    return {k: s for k, s in remote_files(location, REPO_KEY).items() if not k.endswith("/")}


def test_versions_are_committed_by_reference_and_read_back(location):
    first, second = version_dataset(1), version_dataset(2, names=("a", "c"))
    write_version(location, "1.0.0", first)
    write_version(location, "1.0.1", second)
    stored = sum(remote_files(location, cube_key("1.0.1")).values())

    snapshot = commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one")
    assert snapshot
    assert commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one") is None
    assert commit_by_reference(location, REPO_KEY, cube_key("1.0.1"), "v1.0.1", "two")

    objects = repository_objects(location)
    assert not [k for k in objects if k.startswith("chunks/")], "no chunk is copied"
    assert sum(objects.values()) < stored / 4  # metadata, manifests, snapshots only
    assert_same(open_version(location, REPO_KEY, "v1.0.0"), first)
    assert_same(open_version(location, REPO_KEY, "v1.0.1"), second)
    newest = open_version(location, REPO_KEY)  # main: the new version, `b` gone from it
    assert_same(newest, second) and "b" not in newest
    repo = open_repository(location, REPO_KEY, create=False)
    assert [tag for tag, _ in list_versions(repo)] == ["v1.0.0", "v1.0.1"]
    history = [s.message for s in repo.ancestry(branch="main")]
    assert history[:2] == ["two", "one"]  # one commit per version, nothing more

    assert reset_to_version(location, REPO_KEY, "v1.0.0")  # a rollback
    assert_same(open_version(location, REPO_KEY), first)
    assert not reset_to_version(location, REPO_KEY, "v9.9.9")
    assert not reset_to_version(location, "nothing.icechunk", "v1.0.0")
    assert delete_version_tags(location, REPO_KEY, ["v1.0.1", "v9.9.9"]) == ["v1.0.1"]
    with pytest.raises(IcechunkError, match="no version v1.0.1"):
        open_version(location, REPO_KEY, "v1.0.1")


def test_a_zarr2_cube_is_refused_naming_it(tmp_path):
    location = StoreLocation.local(tmp_path)
    version_dataset(1).to_zarr(tmp_path / cube_key("1.0.0"), zarr_format=2)
    with pytest.raises(IcechunkError, match="not a zarr 3 cube") as caught:
        commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one")
    assert cube_key("1.0.0") in str(caught.value)


def test_a_chunk_changed_in_place_is_refused_on_read(s3_server):
    """Icechunk records each chunk's ETag: bit rot or an overwrite of a published chunk
    shows as an error naming the chunk, never as wrong values."""
    location = s3_location(s3_server)
    write_version(location, "1.0.0", version_dataset(1))
    commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one")
    chunk = location.path(cube_key("1.0.0"), "b/c/0/0")
    data = bytearray(location.fs.cat_file(chunk))
    data[-1] ^= 0xFF  # one flipped byte, the same size
    location.fs.pipe_file(chunk, bytes(data))
    opened = open_version(location, REPO_KEY, "v1.0.0")
    np.testing.assert_array_equal(opened["a"].values, version_dataset(1)["a"].values)
    with pytest.raises(Exception, match="checksum of the object .* has changed") as caught:
        opened["b"].values  # noqa: B018
    assert location.url(cube_key("1.0.0"), "b/c/0/0") in str(caught.value)  # names the chunk


CHILD = """
import json, sys
from polar_cube.cube.icechunk_repo import commit_by_reference
from polar_cube.location import StoreLocation

job = json.load(sys.stdin)
location = StoreLocation(job["root"], job["storage_options"])
print("committing", flush=True)
commit_by_reference(location, job["repo"], job["cube"], job["tag"], "two")
print("tagged", flush=True)
"""
KILL_AFTER = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 2.0]  # after "committing"


def test_a_commit_killed_at_any_moment_leaves_a_whole_version(s3_server, tmp_path):
    """SIGKILL at growing moments across the commit of v1.0.1 (about 0.3 s against
    SeaweedFS) until one lands after it took effect: each time `main` opens as v1.0.0 or
    v1.0.1, whole, and v1.0.0's tag is untouched; a last run commits (or has) it."""
    location = s3_location(s3_server)
    first, second = version_dataset(1), version_dataset(2, names=("a", "c"))
    write_version(location, "1.0.0", first)
    write_version(location, "1.0.1", second)
    commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one")
    job = {
        "root": location.root,
        "storage_options": location.storage_options,
        "repo": REPO_KEY,
        "cube": cube_key("1.0.1"),
        "tag": "v1.0.1",
    }
    seen = set()
    for delay in KILL_AFTER:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        child.stdin.write(json.dumps(job).encode())  # the keys: not on the command line
        child.stdin.close()
        assert child.stdout.readline().strip() == b"committing"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        newest = open_version(location, REPO_KEY)
        if newest.attrs["title"] == first.attrs["title"]:
            assert_same(newest, first)
            seen.add("old")
        else:
            assert_same(newest, second)
            seen.add("new")
        assert_same(open_version(location, REPO_KEY, "v1.0.0"), first)
        if "new" in seen:
            break
        reset = open_repository(location, REPO_KEY, create=False)
        assert [tag for tag, _ in list_versions(reset)] == ["v1.0.0"]
    assert seen == {"old", "new"}, "kills landed both before and after the commit took effect"
    commit_by_reference(location, REPO_KEY, cube_key("1.0.1"), "v1.0.1", "two")  # a rerun
    assert_same(open_version(location, REPO_KEY, "v1.0.1"), second)
    assert_same(open_version(location, REPO_KEY, "v1.0.0"), first)


def test_the_readme_snippet_opens_a_repository_in_the_bucket(s3_server, tmp_path):
    location = s3_location(s3_server)
    write_version(location, "1.0.0", version_dataset(1))
    commit_by_reference(location, REPO_KEY, cube_key("1.0.0"), "v1.0.0", "one")
    prefix = location.root.removeprefix(f"s3://{BUCKET}/")
    code = (
        snippet("README.md", "open-icechunk")
        .replace("http://127.0.0.1:8333", s3_server.endpoint_url)
        .replace('"polar-cube"', f'"{BUCKET}"')
        .replace("s3://polar-cube/", f"{location.root}/")
        .replace("polar-1km-1x2048x2048-zarr3-shards4.icechunk", f"{prefix}/{REPO_KEY}")
        .replace('tag="v1.1.0"', 'tag="v1.0.0"')
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    shown = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "version 1" in shown.stdout and "<xarray.Dataset>" in shown.stdout


def test_format_icechunk_needs_zarr_3(tmp_path):
    shown = subprocess.run(
        [
            str(REPO / ".venv/bin/polar-cube"),
            "build",
            "--format",
            "icechunk",
            "--zarr-format",
            "2",
            "--output",
            str(tmp_path / "cube"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 2
    assert (
        shown.stderr.strip()
        .splitlines()[-1]
        .startswith("polar-cube: error: --format icechunk holds zarr 3, not --zarr-format 2")
    )
    assert not (tmp_path / "cube").exists()


@pytest.mark.slow
def test_build_format_icechunk_commits_each_new_version_once(
    small_standins, repo_spec_path, tmp_path
):
    """The user's command: the 3 km cube into a folder, `--format icechunk`; the tag reads
    back equal to the version's zarr; an unchanged rerun commits nothing."""
    from polar_cube.sources.mirror import serving_mirror

    output = tmp_path / "cube"
    env = os.environ | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    with serving_mirror(small_standins) as mirror:
        command = [
            str(REPO / ".venv/bin/polar-cube"),
            "build",
            "--spec",
            str(repo_spec_path),
            "--patch",
            str(REPO / "patch.yaml"),
            "--resolution",
            "3000",
            "--source-mirror",
            mirror,
            "--cache",
            str(tmp_path / "cache"),
            "--output",
            str(output),
            "--format",
            "icechunk",
        ]
        runs = [
            subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
            for _ in range(2)
        ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    series = "polar-3km-1x2048x2048-zarr3-shards4"
    location = StoreLocation.local(output)
    version = json.loads((output / f"{series}.versions.json").read_text())["latest"]
    assert f"Icechunk repository: {output}/{series}.icechunk (tag v{version})" in runs[0].stdout
    assert "nothing to publish" in runs[1].stderr
    assert f"has v{version} already" in runs[1].stderr
    zarr = xr.open_zarr(output / f"{series}-v{version}.zarr", zarr_format=3)
    committed = open_version(location, f"{series}.icechunk", f"v{version}")
    assert sorted(committed.data_vars) == sorted(zarr.data_vars)
    for name in zarr.data_vars:
        np.testing.assert_array_equal(committed[name].values, zarr[name].values, err_msg=name)
    assert committed.attrs == zarr.attrs
    repo = open_repository(location, f"{series}.icechunk", create=False)
    assert len(list(repo.ancestry(branch="main"))) == 2  # the empty root and one commit
    assert not list((output / f"{series}.icechunk").glob("chunks/*"))
