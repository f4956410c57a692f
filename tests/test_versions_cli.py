"""`polar-cube versions | rollback VERSION | prune --keep N`, run as a user runs them
(`.venv/bin/polar-cube … --resolution 3000` from the repository root, the spec's default
`cube.geojson`), on versions written through the library: each a tiny real zarr cube with
its levels, inputs, quicklooks and STAC item under `<series>-vX.Y.Z.*`, published with
`polar_cube.cube.versions.publish_version` (the one catalog write a build ends with).

In a local folder (`--output DIR`) and in SeaweedFS through a Prefect block
(`--bucket-block NAME`, slow: the block needs Prefect's API): the listing shows every
version and marks `latest`; rollback moves `latest` and says so, an unknown version is one
`polar-cube: error:` line naming the published ones; prune keeps the N newest and `latest`,
deletes every object of the others (and of unpublished drafts), never `latest`'s; no
command prints a key."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube.versions import latest_cube, publish_version, read_catalog
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.spec import load_spec
from tests.conftest import REPO

RESOLUTION = "3000"
SPEC = load_spec(REPO / "cube.geojson").at_resolution(float(RESOLUTION))
SERIES = SPEC.series  # polar-3km-1x2048x2048
POLAR_CUBE = REPO / ".venv" / "bin" / "polar-cube"
BUCKET_BLOCK = "polar-versions-bucket"
BUCKET_FOLDER = "versions-cli"
PARTS = (".zarr", ".levels", ".inputs", ".quicklooks", ".stac-item.json")  # of a version


def cube_name(version: str) -> str:
    return f"{SERIES}-v{version}.zarr"


def fingerprint(version: str) -> str:
    """A distinct inputs fingerprint per version (64 hex digits, as the build's)."""
    return (version.replace(".", "") * 64)[:64]


def write_version(location: StoreLocation, version: str, *, publish: bool = True) -> None:
    """Every part of version `version` as a build leaves it (a tiny cube whose attribute
    `version` and data say which it is), then, if `publish`, the catalog write."""
    draft = SPEC.at_version(version)
    keys = VersionKeys(draft.data_id)
    assert keys.cube == cube_name(version)
    value = float(version.replace(".", ""))
    cube = xr.Dataset(
        {"magnetic_anomaly": (("y", "x"), np.full((2, 3), value, "float32"), {"units": "nT"})},
        coords={"x": [0.0, 3000.0, 6000.0], "y": [3000.0, 0.0]},
        attrs={"title": f"tiny cube {version}", "version": version},
    )
    cube.to_zarr(
        location.url(keys.cube),
        zarr_format=2,
        consolidated=True,
        storage_options=location.storage_options or None,
    )
    small = {
        f"{keys.levels}/0.link": f"../{keys.cube}",
        f"{keys.levels}/.zlevels": json.dumps({"version": "1.0", "num_levels": 1}),
        f"{keys.input_key('magnetic_anomaly')}/.zattrs": json.dumps({"fingerprint": version}),
        f"{keys.quicklooks}/stats.json": "[]",
        keys.stac_item: json.dumps({"id": keys.stem}),
    }
    for key, text in small.items():
        location.fs.pipe_file(location.path(key), text.encode())
    location.fs.invalidate_cache()
    if publish:
        publish_version(location, draft, fingerprint(version), "0" * 64, ["magnetic_anomaly"])


def stored(location: StoreLocation, version: str) -> dict[str, int]:
    """{key: size} of every object of a version (cube, levels, inputs, quicklooks, STAC)."""
    parts = VersionKeys(cube_name(version)).all_keys()
    return {k: size for k, size in objects(location).items() if k.split("/")[0] in parts}


def objects(location: StoreLocation) -> dict[str, int]:
    """{key: size} of every object (file) in the target; folders are no objects (SeaweedFS
    lists a prefix whose objects are all deleted as an empty folder)."""
    location.fs.invalidate_cache()
    root = location.path().rstrip("/")
    found = location.fs.find(root, detail=True)
    return {
        path[len(root) + 1 :]: int(info["size"])
        for path, info in found.items()
        if info["type"] == "file"
    }


def polar_cube(*args: str, where: list[str], env=None) -> subprocess.CompletedProcess:
    """`.venv/bin/polar-cube ARGS --resolution 3000 WHERE` from the repository root."""
    return subprocess.run(
        [str(POLAR_CUBE), *args, *where, "--resolution", RESOLUTION],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def listed(output: str) -> dict[str, list[str]]:
    """`versions`' lines by version: [published, cube, 'inputs', fingerprint, ('latest')]."""
    rows = {}
    for line in output.splitlines()[1:]:
        version, *rest = line.split()
        rows[version] = rest
    return rows


def check_versions_rollback_prune(
    location: StoreLocation, where: list[str], env=None, secrets=()
) -> None:
    """The three commands on `location` (where `where` points them, in `env`), from an empty
    target to a pruned one; every output free of `secrets`."""
    outputs = []

    def run(*args: str) -> subprocess.CompletedProcess:
        result = polar_cube(*args, where=where, env=env)
        outputs.append(result.stdout + result.stderr)
        return result

    empty = run("versions")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.splitlines() == [
        f"{SERIES} in {location.root} ({SERIES}.versions.json)",
        "  nothing published yet",
    ]

    for version in ("1.1.0", "1.1.1", "1.1.2", "1.1.3"):
        write_version(location, version)
    write_version(location, "1.1.4", publish=False)  # a draft: written, never published
    before = {v: stored(location, v) for v in ("1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4")}
    assert all(len(files) >= 8 for files in before.values()), before

    # the listing: every published version (not the draft), `latest` marked once
    shown = run("versions")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"{SERIES} in {location.root} ({SERIES}.versions.json)"
    rows = listed(shown.stdout)
    assert set(rows) == {"1.1.0", "1.1.1", "1.1.2", "1.1.3"}
    for version, (published, cube, inputs, short, *mark) in rows.items():
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", published)
        assert (cube, inputs, short) == (cube_name(version), "inputs", fingerprint(version)[:12])
        assert mark == (["latest"] if version == "1.1.3" else []), (version, mark)

    # rollback: `latest` moves (the catalog says so to readers too), nothing is deleted
    back = run("rollback", "1.1.1")
    assert back.returncode == 0, back.stderr
    assert back.stdout == (f"latest of {SERIES} is now 1.1.1: {location.url(cube_name('1.1.1'))}\n")
    assert latest_cube(location, SERIES) == cube_name("1.1.1")
    record = json.loads(location.fs.cat_file(location.path(f"{SERIES}.versions.json")))
    assert (record["latest"], record["latest_cube"]) == ("1.1.1", cube_name("1.1.1"))
    opened = xr.open_zarr(
        location.url(record["latest_cube"]),
        consolidated=True,
        storage_options=location.storage_options or None,
    )
    assert opened.attrs["version"] == "1.1.1"
    assert float(opened["magnetic_anomaly"].max()) == 111.0
    rows = listed(run("versions").stdout)
    assert [v for v, row in rows.items() if row[-1] == "latest"] == ["1.1.1"]
    assert {v: stored(location, v) for v in before} == before

    # an unknown version, or none: one error line naming the published ones; nothing moves
    for wrong in ("9.9.9", "1.1.4"):  # 1.1.4 is stored, but a draft
        refused = run("rollback", wrong)
        assert refused.returncode == 2
        assert refused.stdout == ""
        assert refused.stderr == (
            f"polar-cube: error: {SERIES}: no published version {wrong} "
            "(published: 1.1.0, 1.1.1, 1.1.2, 1.1.3)\n"
        )
    assert latest_cube(location, SERIES) == cube_name("1.1.1")

    # prune --keep 2: the two newest (1.1.3, 1.1.2) and latest (1.1.1) stay; 1.1.0 and the
    # draft go, every object of them
    pruned = run("prune", "--keep", "2")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout == f"removed from {location.root}: 1.1.0, 1.1.4 (unpublished draft)\n"
    assert stored(location, "1.1.0") == {} and stored(location, "1.1.4") == {}
    for version in ("1.1.1", "1.1.2", "1.1.3"):
        assert stored(location, version) == before[version], version
    catalog = read_catalog(location, SERIES)
    assert sorted(v.version for v in catalog.versions) == ["1.1.1", "1.1.2", "1.1.3"]
    assert catalog.latest == "1.1.1"
    assert set(listed(run("versions").stdout)) == {"1.1.1", "1.1.2", "1.1.3"}

    # prune --keep 1: the newest (1.1.3) and latest (1.1.1, older) stay: latest never goes
    # (what a later prune reports is compared at the end, after everything else is checked)
    pruned = run("prune", "--keep", "1")
    assert pruned.returncode == 0, pruned.stderr
    reports = [(pruned.stdout, f"removed from {location.root}: 1.1.2\n")]
    assert stored(location, "1.1.2") == {}
    assert stored(location, "1.1.1") == before["1.1.1"]
    assert stored(location, "1.1.3") == before["1.1.3"]
    assert latest_cube(location, SERIES) == cube_name("1.1.1")

    again = run("prune", "--keep", "2")
    assert again.returncode == 0, again.stderr
    reports.append((again.stdout, f"nothing to remove: {SERIES} has at most 2 version(s)\n"))
    refused = run("prune", "--keep", "0")
    assert refused.returncode == 2
    assert refused.stderr == "polar-cube: error: --keep 0: keep at least 1 version\n"
    assert sorted(v.version for v in read_catalog(location, SERIES).versions) == [
        "1.1.1",
        "1.1.3",
    ]

    # and back to the newest: readers open 1.1.3 again
    forward = run("rollback", "v1.1.3")  # as `versions` lists it, or with its `v`
    assert forward.returncode == 0, forward.stderr
    assert forward.stdout.startswith(f"latest of {SERIES} is now 1.1.3: ")
    assert latest_cube(location, SERIES) == cube_name("1.1.3")

    for text in outputs:
        assert "Traceback" not in text
        for secret in secrets:
            assert secret not in text
    # a removed version is reported once, never again as a draft by a later prune
    assert [report for report, _ in reports] == [expected for _, expected in reports]


def test_versions_rollback_prune_in_a_local_folder(tmp_path):
    folder = tmp_path / "cube"
    location = StoreLocation.local(folder)
    check_versions_rollback_prune(location, ["--output", str(folder)])
    # nothing left behind by the commands' lock, nothing but the two versions and the catalog
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{SERIES}.versions.json"]
        + [f"{SERIES}-v{v}{part}" for v in ("1.1.1", "1.1.3") for part in PARTS]
    )


def test_rollback_to_a_version_whose_cube_is_gone_is_refused(tmp_path):
    folder = tmp_path / "cube"
    location = StoreLocation.local(folder)
    for version in ("1.1.0", "1.1.1"):
        write_version(location, version)
    (folder / cube_name("1.1.0") / ".zmetadata").unlink()  # damaged by hand
    refused = polar_cube("rollback", "1.1.0", where=["--output", str(folder)])
    assert refused.returncode == 2
    assert refused.stderr == (
        f"polar-cube: error: {folder / cube_name('1.1.0')}: version 1.1.0 is gone from the store\n"
    )
    assert latest_cube(location, SERIES) == cube_name("1.1.1")


def test_the_commands_name_the_series_of_the_resolution(tmp_path):
    """Versions of the 3 km series are not those of the spec's own (100 m) series."""
    folder = tmp_path / "cube"
    write_version(StoreLocation.local(folder), "1.1.0")
    own = subprocess.run(
        [str(POLAR_CUBE), "versions", "--output", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert own.returncode == 0, own.stderr
    series = load_spec(REPO / "cube.geojson").series
    assert series != SERIES
    assert own.stdout.splitlines() == [
        f"{series} in {folder} ({series}.versions.json)",
        "  nothing published yet",
    ]
    assert "1.1.0" in listed(polar_cube("versions", where=["--output", str(folder)]).stdout)


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A block of a folder of the session's SeaweedFS bucket (saved through this session's
    Prefect API), and that folder's location."""
    from polar_cube.tasks.blocks import bucket_location, save_blocks

    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-versions-credentials",
        bucket_name="polar-test",
        bucket_folder=BUCKET_FOLDER,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return bucket_location(BUCKET_BLOCK)


def session_api_url() -> str:
    """The API of this session's temporary Prefect server (the one the block is saved in):
    the commands use it as a user's commands use theirs (PREFECT_API_URL), instead of
    starting a temporary server of their own each (20 s apiece)."""
    from prefect.server.api.server import SubprocessASGIServer

    (server,) = SubprocessASGIServer._instances.values()
    return server.api_url


@pytest.mark.slow
def test_versions_rollback_prune_in_a_bucket(bucket, s3_server):
    assert bucket.root == f"s3://polar-test/{BUCKET_FOLDER}"
    check_versions_rollback_prune(
        bucket,
        ["--bucket-block", BUCKET_BLOCK],
        env=os.environ | {"PREFECT_API_URL": session_api_url()},
        secrets=(s3_server.access_key, s3_server.secret_key),
    )
    names = {key.split("/")[0] for key in objects(bucket)}
    assert names == {f"{SERIES}.versions.json"} | {
        f"{SERIES}-v{v}{part}" for v in ("1.1.1", "1.1.3") for part in PARTS
    }
