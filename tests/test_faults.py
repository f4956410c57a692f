"""Fault injection, end to end through the real command line: every way a build can meet bad
input or a broken environment ends with exit code 2 and one `polar-cube: error: …` line naming
the culprit, publishes nothing (the catalog, `latest`, and every published version stay as
they were), caches nothing bad, and once the fault is fixed the same command publishes a cube
equal to a clean build.

Real parts throughout: the small stand-in sources served over HTTP (a copy the tests break and
repair), the test session's Prefect server, and tmpfs mounts for a full, a small and a
read-only disk. Kills (of the build, the S3 server, a dask worker) are in
`test_kill_matrix.py`; the README's table of all of them is `test_fault_matrix.py`'s.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.sources.mirror import MirrorServer, _MirrorHandler
from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block
from tests.prefect_api import session_api_env

pytestmark = pytest.mark.slow
SPEC = REPO / "cube.geojson"
PATCH = REPO / "patch.yaml"
RESOLUTION = "3000"
LOCK_FOLDER = ".polar-cube-lock"


# --- servers ---------------------------------------------------------------------------------


class _StallingHandler(_MirrorHandler):
    """Serves like the mirror, but for the names in `server.stalled` it sends the headers and
    half the body, then goes silent (a server that hangs mid-transfer); a name in
    `server.unavailable` gets that many 503s (Retry-After: 1) first."""

    def _serve(self, send_body: bool) -> None:
        name = Path(self.path).name
        with self.server.lock:
            left = self.server.unavailable.get(name, 0)
            if left:
                self.server.unavailable[name] = left - 1
                self.server.answered_503.append(name)
        if not left:
            return super()._serve(send_body)
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_file(self, path: Path, start: int, length: int) -> None:
        if path.name not in self.server.stalled:
            return super()._send_file(path, start, length)
        with path.open("rb") as f:
            f.seek(start)
            self.wfile.write(f.read(length // 2))
        self.wfile.flush()
        self.server.released.wait(60)
        self.close_connection = True


class FaultyMirror(MirrorServer):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.verbose = False
        self.stalled: set[str] = set()
        self.unavailable: dict[str, int] = {}
        self.answered_503: list[str] = []
        self.answered: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        self.released = threading.Event()
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), _StallingHandler)


def copy_of(standins: Path, folder: Path) -> Path:
    """`folder` holding a copy of the stand-ins (for tests that break or change them)."""
    for path in standins.iterdir():
        shutil.copy2(path, folder / path.name)
    return folder


@contextmanager
def serving(folder: Path) -> Iterator[FaultyMirror]:
    """A FaultyMirror of `folder` on 127.0.0.1, shut down on leaving."""
    server = FaultyMirror(folder)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sources(small_standins, tmp_path_factory) -> Path:
    """A copy of the small stand-ins that the tests break and repair."""
    return copy_of(small_standins, tmp_path_factory.mktemp("faulty-sources"))


@pytest.fixture(scope="module")
def mirror(sources):
    with serving(sources) as server:
        yield server


@pytest.fixture(scope="module")
def api():
    """The environment of the builds of this module: the test session's Prefect server as
    their API (PREFECT_API_URL), as a user's builds use theirs; one server for every run
    instead of a temporary one each, and no server start of the module's own (~25 s)."""
    return session_api_env()


# --- running builds ---------------------------------------------------------------------------


def polar_cube(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_args(work: Path, mirror_url: str, *extra: str) -> list[str]:
    return [
        "build",
        "--spec",
        str(SPEC),
        "--patch",
        str(PATCH),
        "--resolution",
        RESOLUTION,
        "--source-mirror",
        mirror_url,
        "--cache",
        str(work / "cache"),
        *extra,
    ]


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit code 2 and exactly one error line; no traceback after it (Prefect's own log of the
    failed task, before it, may show one)."""
    assert result.returncode == 2, result.stderr[-4000:]
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("polar-cube: error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert not any(line.startswith("Traceback") for line in lines[errors[0] :])
    return lines[errors[0]]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below `folder` with its size and mtime (the lock folder aside)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and LOCK_FOLDER not in p.parts
    }


def catalog_name() -> str:
    return f"{load_spec(SPEC).at_resolution(float(RESOLUTION)).series}.versions.json"


def latest_cube(target: Path) -> Path:
    """The cube the catalog in the folder `target` names `latest` (what readers open)."""
    return target / json.loads((target / catalog_name()).read_text())["latest_cube"]


def assert_same_cube(path: Path | str, reference: dict[str, np.ndarray], options=None) -> None:
    cube = xr.open_zarr(str(path), consolidated=True, storage_options=options)
    assert sorted(reference) == sorted(map(str, cube.data_vars))
    for name, values in reference.items():
        np.testing.assert_array_equal(cube[name].values, values, err_msg=name)


def cube_values(path: Path | str, options=None) -> dict[str, np.ndarray]:
    cube = xr.open_zarr(str(path), consolidated=True, storage_options=options)
    return {str(name): cube[name].values for name in cube.data_vars}


@pytest.fixture(scope="module")
def data_id() -> str:
    return load_spec(SPEC).at_resolution(float(RESOLUTION)).data_id


@pytest.fixture(scope="module")
def clean(tmp_path_factory, mirror, api, data_id):
    """A clean build: the reference every repaired build must equal. Its folders are shared by
    the download cases, which then each start from an empty cache entry for their source."""
    work = tmp_path_factory.mktemp("faults-clean")
    result = polar_cube(*build_args(work, mirror.base_url, "--output", str(work / "out")), env=api)
    assert result.returncode == 0, result.stderr[-4000:]
    assert latest_cube(work / "out") == work / "out" / data_id  # the first version, v1.1.0
    return work, cube_values(work / "out" / data_id)


# --- faults found before anything starts -------------------------------------------------------


def _spec_with(tmp_path: Path, change) -> Path:
    document = json.loads(SPEC.read_text())
    change(document["properties"])
    path = tmp_path / "cube.geojson"
    path.write_text(json.dumps(document))
    return path


def _bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "cube.geojson"
    path.write_text(SPEC.read_text()[:-40])
    return path


def _patch_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "patch.yaml"
    path.write_text(text)
    return path


PREFLIGHT_CASES = {
    "spec is not JSON": (
        lambda t: ["--spec", str(_bad_json(t))],
        "cube.geojson: not valid JSON: ",
    ),
    "spec field of the wrong type": (
        lambda t: ["--spec", str(_spec_with(t, lambda p: p["variables"][2].update(units=7)))],
        "cube.geojson: invalid spec: properties.variables[2:geothermal_heat_flow_200km].units",
    ),
    "spec resolution that does not divide the bbox": (
        lambda t: ["--spec", str(_spec_with(t, lambda p: p.update(spatial_res=[2000, 2000])))],
        "cube.geojson: invalid spec: properties.spatial_res: 2000 m does not divide",
    ),
    "--resolution 0": (
        lambda t: ["--resolution", "0"],
        "--resolution 0: must be a positive number of metres",
    ),
    "--resolution negative": (
        lambda t: ["--resolution=-500"],
        "--resolution -500: must be a positive number of metres",
    ),
    "--resolution not dividing": (
        lambda t: ["--resolution", "2000"],
        "--resolution 2000: 2000 m does not divide the bbox x extent 1953000 m",
    ),
    "patch is not YAML": (
        lambda t: ["--patch", str(_patch_file(t, "metadata: [\n  .zattrs: {"))],
        "patch.yaml: not valid YAML at line",
    ),
    "patch for an unknown variable": (
        lambda t: [
            "--patch",
            str(
                _patch_file(
                    t,
                    "zarr_consolidated_format: 1\nmetadata:\n  ice_thicknes/.zattrs: {units: m}\n",
                )
            ),
        ],
        "patch.yaml: entries for variables the cube does not have: ice_thicknes",
    ),
}


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_bad_input_is_refused_before_anything_starts(case, tmp_path, mirror):
    make_args, expected = PREFLIGHT_CASES[case]
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(home)
    args = build_args(tmp_path, mirror.base_url, "--output", str(tmp_path / "out"))
    result = polar_cube(*args, *make_args(tmp_path), env=env, timeout=120)
    line = the_error_line(result)
    assert expected in line, line
    assert "Traceback" not in result.stderr
    # no Prefect server was started (it would have made its database), nothing was written:
    # the same command with the input fixed is a clean build
    assert not list(home.rglob("*.db"))
    for folder in ("cache", "out"):
        assert not (tmp_path / folder).exists(), folder


def test_a_read_only_target_is_refused_before_anything_starts(
    tmp_path, mirror, readonly_mount, clean, api, data_id
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    work, reference = clean
    args = build_args(work, mirror.base_url, "--output", str(readonly_mount / "out"))
    line = the_error_line(polar_cube(*args, env=env, timeout=120))
    assert line == (
        f"polar-cube: error: --output {readonly_mount / 'out'}: cannot write into "
        f"{readonly_mount}: read-only file system"
    )
    assert not list((tmp_path / "prefect-home").rglob("*.db"))
    subprocess.run(["mount", "-o", "remount,rw", str(readonly_mount)], check=True)
    repaired = polar_cube(*args, env=api)
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert_same_cube(latest_cube(readonly_mount / "out"), reference)


# --- bad sources -------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _html(path: Path) -> None:
    path.write_text(
        "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
        "<body><form action='/login'>Please sign in to download this file.</form></body></html>"
    )


def _remove(path: Path) -> None:
    path.unlink()


def _zip_bomb(path: Path) -> None:
    """The zip replaced by one of a few kB whose one member expands to 1 GB (bzip2 zeros)."""
    zeros = bytes(2**24)
    with zipfile.ZipFile(path, "w") as bomb:
        member = zipfile.ZipInfo("WAIS_Max_Extent/WAIS_Jan_2017_Polygons.shp")
        member.compress_type = zipfile.ZIP_BZIP2
        with bomb.open(member, "w", force_zip64=True) as out:
            for _ in range(64):
                out.write(zeros)
    assert path.stat().st_size < 10_000


def _nested_archive(path: Path) -> None:
    """A zip added into the tar, as one more member."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("Thw70_2013_mask.tif", b"not what it seems")
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("more_masks.zip")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))


SOURCE_CASES = {
    # case: (source id, how the served file is broken, what the message says)
    "truncated GMT netCDF": ("geothermal_heat_flow_200km", _truncate, "truncated"),
    "truncated netCDF-4": ("ice_thickness_cryosmos", _truncate, "truncated"),
    "truncated GeoTIFF": ("magnetic_anomaly", _truncate, "truncated"),
    "truncated tar": ("subglacial_lakes_thwaites", _truncate, "truncated"),
    "truncated zip": ("supraglacial_lakes_wais", _truncate, "truncated"),
    "HTML page with status 200": (
        "curie_depth_200km",
        _html,
        "returned an HTML page (a login or error page?) instead of data",
    ),
    "404": ("curie_depth_300km", _remove, "HTTP 404 Not Found"),
    "server stalls mid-body": ("geothermal_heat_flow_300km", None, "gave up after 2 attempts"),
    "zip bomb": (
        "supraglacial_lakes_wais",
        _zip_bomb,
        "to 1.1 GB; at most 1,000 allowed): a bomb?",
    ),
    "nested archive": ("subglacial_lakes_thwaites", _nested_archive, "a nested zip archive"),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_a_bad_source_is_refused_never_cached_and_a_rerun_after_the_fix_equals_a_clean_build(
    case, clean, sources, mirror, api, data_id
):
    work, reference = clean
    source_id, breaks, expected = SOURCE_CASES[case]
    spec = load_spec(SPEC)
    file_name = spec.source(source_id).file_name
    url = f"{mirror.base_url}/{file_name}"
    shutil.rmtree(work / "cache" / source_id, ignore_errors=True)  # as if never downloaded
    kept = tree(work / "out")
    served = sources / file_name
    original = served.read_bytes()
    env = api | {"POLAR_CUBE_DOWNLOAD_ATTEMPTS": "2", "POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS": "3"}
    args = build_args(work, mirror.base_url, "--output", str(work / "out"))
    try:
        if breaks is None:
            mirror.stalled.add(file_name)
        else:
            breaks(served)
        line = the_error_line(polar_cube(*args, env=env))
    finally:
        mirror.stalled.discard(file_name)
        served.write_bytes(original)
    assert source_id in line and url in line and expected in line, line
    cached = [p for p in (work / "cache" / source_id).rglob("*") if p.is_file()]
    assert cached == [], cached  # nothing bad cached (not even a .part)
    assert tree(work / "out") == kept  # nothing built or published, no version touched

    repaired = polar_cube(*args, env=api)
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert_same_cube(latest_cube(work / "out"), reference)


def _rewrite_geotiff(path: Path, **changes) -> None:
    """The GeoTIFF written again with some of its profile changed (a valid file)."""
    import rasterio

    with rasterio.open(path) as src:
        profile, values = src.profile, src.read()
    profile.update(changes)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values)


def _without_crs(path: Path) -> None:
    _rewrite_geotiff(path, crs=None)


def _moved_off_the_region(path: Path) -> None:
    """The same grid 10,000 km east: a valid file in EPSG:3031 that misses the cube's bbox."""
    import rasterio

    with rasterio.open(path) as src:
        transform = src.transform
    _rewrite_geotiff(path, transform=rasterio.Affine.translation(1e7, 0) * transform)


READER_CASES = {
    # case: (source id, how the served file is changed, what the message says); the file is a
    # valid download (cached as it is), refused when its reader opens it
    "GeoTIFF without CRS": ("magnetic_anomaly", _without_crs, "has no CRS (the spec says"),
    "GeoTIFF outside the cube's region": (
        "magnetic_anomaly",
        _moved_off_the_region,
        "lie outside the cube's region",
    ),
}


@pytest.mark.parametrize("case", READER_CASES)
def test_a_source_its_reader_refuses_publishes_nothing_and_the_fixed_source_equals_a_clean_build(
    case, clean, sources, mirror, api, data_id
):
    work, reference = clean
    source_id, changes, expected = READER_CASES[case]
    file_name = load_spec(SPEC).source(source_id).file_name
    served = sources / file_name
    original = served.read_bytes()
    catalog = (work / "out" / catalog_name()).read_text()
    args = build_args(work, mirror.base_url, "--output", str(work / "out"))
    try:
        changes(served)
        line = the_error_line(polar_cube(*args, env=api))
    finally:
        served.write_bytes(original)
    assert source_id in line and file_name in line and expected in line, line
    assert (work / "out" / catalog_name()).read_text() == catalog  # nothing published

    repaired = polar_cube(*args, env=api)  # the restored file is downloaded again (new ETag)
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert_same_cube(latest_cube(work / "out"), reference)


def test_a_target_too_small_for_the_grid_is_refused_with_an_estimate(small_disk, tmp_path, api):
    args = ["build", "--spec", str(SPEC), "--resolution", "500", "--cache", str(tmp_path / "c")]
    line = the_error_line(polar_cube(*args, "--output", str(small_disk / "out"), env=api))
    assert line == (
        f"polar-cube: error: --output {small_disk / 'out'}: the 500m cube needs at least "
        "140.8 MB (17 layers of 3,906 x 4,242 cells; up to 1.5 GB uncompressed), "
        f"{small_disk} has 6.3 MB free"
    )
    assert not (small_disk / "out").exists()


def test_an_unwritable_cache_is_refused_before_anything_starts(readonly_mount, tmp_path, api):
    args = ["build", "--spec", str(SPEC), "--resolution", RESOLUTION]
    cache = readonly_mount / "cache"
    line = the_error_line(
        polar_cube(*args, "--cache", str(cache), "--output", str(tmp_path / "o"), env=api)
    )
    assert line == (
        f"polar-cube: error: --cache {cache}: cannot write into {readonly_mount}: "
        "read-only file system"
    )
    assert not (tmp_path / "o").exists()


def test_a_source_answering_503_twice_then_serving_builds(clean, mirror, api, data_id):
    """Issue 21: a host that is unavailable for a while (503 with Retry-After) is waited for."""
    work, reference = clean
    spec = load_spec(SPEC)
    file_name = spec.source("magnetic_anomaly").file_name
    shutil.rmtree(work / "cache" / "magnetic_anomaly", ignore_errors=True)
    mirror.unavailable[file_name] = 2
    try:
        built = polar_cube(
            *build_args(work, mirror.base_url, "--output", str(work / "out")), env=api
        )
    finally:
        mirror.unavailable.pop(file_name, None)
    assert built.returncode == 0, built.stderr[-4000:]
    assert mirror.answered_503.count(file_name) == 2
    assert "HTTP 503 Service Unavailable (Retry-After: 1 s); retrying in 1.00 s" in built.stderr
    assert_same_cube(latest_cube(work / "out"), reference)


def _rewrite_values(tif: Path) -> None:
    """New bytes at the same name: the GeoTIFF's values doubled (a valid file, a later mtime)."""
    import rasterio

    with rasterio.open(tif, "r+") as raster:
        raster.write(raster.read(1) * 2, 1)
    later = time.time_ns() + 2 * 10**9
    os.utime(tif, ns=(later, later))


def test_a_source_changed_at_the_same_url_is_fetched_and_recomputed_alone(
    clean, sources, mirror, api
):
    """Issue 21, item 1: the mirror's ETag/Last-Modified answer each source's conditional
    request; the one with new bytes is downloaded again and its variable alone recomputed,
    the published cube shows its new values; the others cost one 304 each."""
    work, reference = clean
    spec = load_spec(SPEC)
    changed = spec.source("magnetic_anomaly").file_name
    served = sources / changed
    original = served.read_bytes()
    args = build_args(work, mirror.base_url, "--output", str(work / "out"))
    assert polar_cube(*args, env=api).returncode == 0  # every source cached, validators kept
    mirror.answered.clear()
    _rewrite_values(served)
    try:
        rebuilt = polar_cube(*args, env=api)
        assert rebuilt.returncode == 0, rebuilt.stderr[-4000:]
        answered = list(mirror.answered)
        cube = cube_values(latest_cube(work / "out"))
    finally:
        served.write_bytes(original)  # the other cases' sources, as they were
        later = time.time_ns() + 4 * 10**9
        os.utime(served, ns=(later, later))
        restored = polar_cube(*args, env=api)
    assert restored.returncode == 0, restored.stderr[-4000:]
    assert_same_cube(latest_cube(work / "out"), reference)

    by_file = {}
    for method, path, status in answered:
        by_file.setdefault(Path(path).name, []).append((method, status))
    assert by_file.pop(changed) == [("GET", 200), ("GET", 200)]  # asked, then fetched again
    assert by_file and all(seen == [("GET", 304)] for seen in by_file.values()), by_file
    assert re.search(
        rf"magnetic_anomaly: {re.escape(mirror.base_url)}/\S+: the server has new bytes at this",
        rebuilt.stderr,
    )
    assert "reusing" in rebuilt.stderr or "unchanged since" in rebuilt.stderr
    for name, values in reference.items():  # magnetic_anomaly alone has new values
        if name == "magnetic_anomaly":
            finite = np.isfinite(values) & (values != 0)
            np.testing.assert_allclose(cube[name][finite], 2 * values[finite], rtol=1e-5)
        else:
            np.testing.assert_array_equal(cube[name], values, err_msg=name)


def test_a_refused_connection_gives_up_in_bounded_time_naming_the_url(clean, mirror, api, data_id):
    work, reference = clean
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    # the cache is keyed by what a source is, not by the mirror: only this one is fetched
    shutil.rmtree(work / "cache" / "magnetic_anomaly", ignore_errors=True)
    kept = tree(work / "out")
    started = time.monotonic()
    result = polar_cube(*build_args(work, dead, "--output", str(work / "out")), env=api)
    took = time.monotonic() - started
    line = the_error_line(result)
    assert line.startswith(f"polar-cube: error: magnetic_anomaly: {dead}/"), line
    assert "gave up after" in line, line
    assert took < 90  # the downloads' own bound is 30 s; Prefect and Python start on top
    assert tree(work / "out") == kept
    assert not [p for p in (work / "cache").rglob("*.part")]

    args = build_args(work, mirror.base_url, "--output", str(work / "out"))
    repaired = polar_cube(*args, env=api)  # the mirror named right
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert_same_cube(latest_cube(work / "out"), reference)


# --- a broken environment -------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, *options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture()
def readonly_mount(tmp_path):
    folder = tmp_path / "readonly"
    _mount_tmpfs(folder, "ro", "size=256m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture()
def small_disk(tmp_path):
    folder = tmp_path / "small-disk"
    # room for the 3 km cube's estimate (at least 3.9 MB), not for the cube itself (10.7 MB)
    _mount_tmpfs(folder, "size=6m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_names_the_target_and_a_rerun_with_space_completes(
    clean, small_disk, mirror, api, data_id
):
    work, reference = clean
    args = build_args(work, mirror.base_url, "--output", str(small_disk / "out"))
    line = the_error_line(polar_cube(*args, env=api))
    assert f"{small_disk / 'out'}" in line and "no space left on device" in line, line
    # the chunks went straight into the new version, which ran out of space: not published
    assert (small_disk / "out" / data_id).is_dir()
    assert not (small_disk / "out" / catalog_name()).exists()  # no catalog, so no `latest`
    assert not (small_disk / "out" / data_id / ".zmetadata").exists()  # never merged
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    repaired = polar_cube(*args, env=api)
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert latest_cube(small_disk / "out") == small_disk / "out" / data_id  # the same draft
    assert_same_cube(small_disk / "out" / data_id, reference)


def test_two_builds_into_one_target_one_refuses_naming_the_holder(
    clean, tmp_path, mirror, api, data_id
):
    work, reference = clean
    target = tmp_path / "shared-target"
    commands = []
    for name in ("first", "second"):  # own caches: only the target is shared
        args = build_args(tmp_path / name, mirror.base_url, "--output", str(target))
        commands.append([sys.executable, "-m", "polar_cube.cli", *args])
    runs = [
        subprocess.Popen(c, env=api, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in commands
    ]
    outcomes = [(run.pid, run.wait(timeout=600), run.stderr.read().decode()) for run in runs]
    codes = sorted(code for _, code, _ in outcomes)
    assert codes == [0, 2], [o[2][-2000:] for o in outcomes]
    (winner,) = [pid for pid, code, _ in outcomes if code == 0]
    (refused,) = [err for _, code, err in outcomes if code == 2]
    line = the_error_line(subprocess.CompletedProcess([], 2, "", refused))
    assert f"{target} is being built by pid {winner} on " in line, line
    assert f"{target / LOCK_FOLDER}" in line
    assert latest_cube(target) == target / data_id
    assert_same_cube(target / data_id, reference)
    assert not list((target / LOCK_FOLDER).glob("*.json"))  # released at the end
    published = tree(target)

    again = polar_cube(*commands[1][3:], env=api)  # the refused build, run again
    assert again.returncode == 0, again.stderr[-4000:]
    assert latest_cube(target) == target / data_id  # the same sources: nothing new
    assert_same_cube(target / data_id, reference)
    assert tree(target) == published  # the catalog and the published version as they were
