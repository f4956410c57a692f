"""Scheduled builds end to end with real processes: the README's block run as written
(`tests/readme_deployment.py`: a Prefect server, SeaweedFS, the stand-in mirror, a process
work pool, the demo deployment, a worker and a watched run), and the commands' own checks
on a server of their own."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import xarray as xr

from polar_cube.deployments.operate import (
    DEMO_RESOLUTION,
    server_status,
    stop_server,
    stop_worker,
    worker_status,
)
from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block, layer_count
from tests.snippets import snippet

pytestmark = pytest.mark.slow
POOL = "polar-cube"
# The sub-commands through the same parser and error handling as `polar-cube`.
OPS = """
import argparse, sys
from polar_cube.cli.ops import add_ops_commands
from polar_cube.errors import PolarCubeError
parser = argparse.ArgumentParser(prog="polar-cube")
add_ops_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
try:
    sys.exit(args.func(args))
except PolarCubeError as error:
    print(f"polar-cube: error: {error}", file=sys.stderr)
    sys.exit(2)
"""


@dataclass
class Server:
    url: str  # the API, like PREFECT_API_URL
    env: dict  # for processes using it (its PREFECT_HOME and PREFECT_API_URL)
    state_dir: Path

    def ops(self, *args, timeout=300, env=None):
        """Run `polar-cube <args>` (the ops sub-commands) against this server."""
        return subprocess.run(
            [sys.executable, "-c", OPS, *args],
            env=self.env if env is None else env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def worker_log(self) -> str:
        path = self.state_dir / f"worker-{POOL}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no worker log)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server in its own PREFECT_HOME; it and the worker are stopped by pid."""
    root = tmp_path_factory.mktemp("prefect-server")
    state_dir = root / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env |= {"PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    port = free_port_block(1)
    args = ["server", "start", "--state-dir", str(state_dir), "--port", str(port)]
    try:
        started = Server("", env, state_dir).ops(*args, timeout=400)
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={url}" in started.stdout
        yield Server(url, env | {"PREFECT_API_URL": url}, state_dir)
    finally:
        stop_worker(state_dir, POOL)
        stop_server(state_dir)
    assert server_status(state_dir) is None and not (state_dir / "server.json").exists()


@pytest.fixture(scope="module")
def worker(server):
    """A pool and its worker on that server."""
    created = server.ops("pool", "create", "--name", POOL)
    assert created.returncode == 0, created.stdout + created.stderr
    started = server.ops("worker", "start", "--pool", POOL, "--state-dir", str(server.state_dir))
    assert started.returncode == 0, started.stdout + started.stderr
    return worker_status(server.state_dir, POOL)


@pytest.fixture(scope="module")
def client(deployment_run):
    """A Prefect client of the README run's server (the test session's own is left alone)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: deployment_run.api_url}):
        with get_client(sync_client=True) as client:
            yield client


def bucket_options(run) -> dict:
    server = run.s3_server()
    return {
        "key": server.access_key,
        "secret": server.secret_key,
        "client_kwargs": {"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
    }


def open_in_bucket(run, key: str) -> xr.Dataset:
    options = bucket_options(run)
    return xr.open_zarr(f"s3://polar-cube/{key}", consolidated=True, storage_options=options)


def read_in_bucket(run, key: str) -> dict:
    """A JSON object of the bucket (e.g. a version catalog), read afresh."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **bucket_options(run))
    return json.loads(fs.cat_file(f"polar-cube/{key}"))


def test_the_readme_block_runs_as_written_and_the_cube_is_in_the_bucket(deployment_run):
    """Issue 18: the README's block, verbatim, in a fresh folder, with no internet. The run
    published the first version of the 1 km cube, and the catalog names it `latest`."""
    assert "finished: Completed" in deployment_run.output
    spec = load_spec(REPO / "cube.geojson").at_resolution(DEMO_RESOLUTION)
    assert spec.data_id == "polar-1km-1x2048x2048-v1.1.0.zarr"
    catalog = read_in_bucket(deployment_run, "polar-1km-1x2048x2048.versions.json")
    assert (catalog["latest"], catalog["latest_cube"]) == ("1.1.0", spec.data_id)
    assert [v["cube"] for v in catalog["versions"]] == [spec.data_id]
    cube = open_in_bucket(deployment_run, spec.data_id)
    assert {v.name for v in spec.variables} <= set(cube.data_vars)
    assert cube.sizes == {"time": 2, "y": 2121, "x": 1953}
    assert cube.attrs["title"] == "Polar Data Cube v1.1.0"
    # every state folder is in the folder the block ran in, none in HOME
    home = deployment_run.folder / "home"
    assert not (home / ".prefect").exists() and not (home / ".aws").exists()


def test_the_demo_deployment_names_the_mirror_and_the_resolution(deployment_run, client):
    deployment = client.read_deployment_by_name("build-cube/demo")
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/build_cube.py:build_cube"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]
    demo = deployment_run.folder.resolve() / "data" / "demo"
    assert deployment.parameters == {
        "spec_path": "cube.geojson",
        "patch_path": "patch.yaml",
        "bucket_block": "polar-cube-bucket",
        "deep_verify": True,  # scheduled runs read every chunk back before publishing
        "source_mirror": "http://127.0.0.1:8400",
        "resolution": DEMO_RESOLUTION,
        "cache_dir": str(demo / "cache"),
    }
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 1 * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active
    assert f"prefect deployment schedule pause build-cube/demo {schedule.id}" in (
        deployment_run.output
    )
    assert deployment.global_concurrency_limit.limit == 1  # one build at a time; others queue
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    flow_run = client.read_flow_run(deployment_run.flow_run_id)
    assert flow_run.deployment_id == deployment.id and flow_run.state.is_completed()
    assert flow_run.name == "cube-polar-1km-1x2048x2048-v1.1.0-to-polar-cube-bucket"


def test_the_server_lists_the_parent_runs_artifacts(deployment_run, client):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[deployment_run.flow_run_id]))
    artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=runs)}
    assert {"polar-cube-coverage", "polar-cube-summary"} <= set(artifacts)
    assert artifacts["polar-cube-coverage"].type == "table"
    assert str(artifacts["polar-cube-summary"].flow_run_id) == deployment_run.flow_run_id


def bucket_listing(run, prefix: str) -> dict[str, tuple]:
    """Every object under `polar-cube/<prefix>`: (ETag, LastModified) by key."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **bucket_options(run))
    found = fs.find("polar-cube", prefix=prefix, detail=True)
    return {k: (i.get("ETag"), i.get("LastModified")) for k, i in found.items()}


def test_a_3km_build_through_a_mirror_on_another_port(deployment_run):
    """Issue 18: the cache is keyed by what a source is, not by the mirror's address (nothing
    is downloaded again), and a build at another resolution publishes the first version of
    its own series without touching the 1 km one (its versions' objects and its catalog)."""
    run = deployment_run
    one_km = load_spec(REPO / "cube.geojson").at_resolution(1000).series
    before = bucket_listing(run, one_km)
    assert len(before) > 100  # the cube's chunks and metadata, its levels and quicklooks
    assert f"polar-cube/{one_km}.versions.json" in before
    assert f"polar-cube/{one_km}-v1.1.0.zarr/.zmetadata" in before
    log = run.folder / "data" / "mirror" / "mirror.log"
    port = free_port_block(1)
    started = run.polar_cube("sources", "start", "--port", str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    downloads = re.compile(r'"GET \S+ HTTP/1\.1" 200 ')  # a 304 (revalidation) is not one
    requests_before = len(downloads.findall(log.read_text()))
    assert requests_before >= 10  # the README run downloaded every source from it
    demo = run.folder / "data" / "demo"
    built = run.polar_cube(
        *("build", "--resolution", "3000", "--source-mirror", f"http://127.0.0.1:{port}"),
        *("--cache", str(demo / "cache"), "--bucket-block", "polar-cube-bucket"),
    )
    run.polar_cube("sources", "stop")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert len(downloads.findall(log.read_text())) == requests_before  # not one download
    assert log.read_text().count('" 304 ') >= 10  # each source revalidated: one 304 each
    three_km = "polar-3km-1x2048x2048-v1.1.0.zarr"
    assert f"the cube is at s3://polar-cube/{three_km}\n" in built.stdout
    # the printed snippet opens the version the 3 km series' catalog names
    catalog = "s3://polar-cube/polar-3km-1x2048x2048.versions.json"
    assert catalog in built.stdout.split("--- open the cube ---")[1]
    assert read_in_bucket(run, catalog.removeprefix("s3://polar-cube/"))["latest_cube"] == three_km
    assert open_in_bucket(run, three_km).sizes == {"time": 2, "y": 707, "x": 651}
    assert bucket_listing(run, one_km) == before  # the 1 km series, untouched


def test_server_and_worker_run_in_their_own_sessions_and_start_is_idempotent(server, worker):
    state = server_status(server.state_dir)
    assert state is not None and worker is not None
    for pid in (state["pid"], worker["pid"]):
        assert os.getsid(pid) == pid
    port = server.url.rsplit(":", 1)[1].removesuffix("/api")
    again = server.ops("server", "start", "--state-dir", str(server.state_dir), "--port", port)
    assert again.returncode == 0 and f"(pid {state['pid']})" in again.stdout
    status = server.ops("worker", "status", "--pool", POOL, "--state-dir", str(server.state_dir))
    assert status.returncode == 0 and f"(pid {worker['pid']})" in status.stdout


def test_errors_are_one_clear_line(server):
    without_api = {k: v for k, v in server.env.items() if k != "PREFECT_API_URL"}
    result = server.ops("pool", "create", env=without_api)
    assert result.returncode == 2
    assert "PREFECT_API_URL is not set" in result.stderr and "Traceback" not in result.stderr
    result = server.ops("run", "--deployment", "build-cube/no-such-deployment")
    assert result.returncode == 2 and "no deployment 'build-cube/no-such-deployment'" in (
        result.stderr
    )
    result = server.ops("deploy", "--param", "no_such_parameter=1")
    assert result.returncode == 2 and "has no parameter no_such_parameter" in result.stderr
    closed = server.env | {"PREFECT_API_URL": f"http://127.0.0.1:{free_port_block(1)}/api"}
    result = server.ops("run", env=closed)
    assert result.returncode == 2 and "cannot reach the Prefect server" in result.stderr


def test_the_readme_view_block_shows_the_demo_cube(deployment_run):
    """Issue 18: the README's `polar-cube view` lines, as written, after the 1 km build."""
    shown = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", snippet("README.md", "view")],
        cwd=deployment_run.folder,
        env=deployment_run.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "viewer/?dataset=polar-1km-1x2048x2048-v1.1.0" in shown.stdout
    assert "showing s3://polar-cube/polar-1km-1x2048x2048-v1.1.0.zarr" in shown.stdout


# --- the Prefect UI in a real browser, after the README's run ---------------------------------
# Playwright drives Debian's headless chromium after the README's scheduled-builds block ran
# (the 1 km demo deployment): the parent flow run's Artifacts tab lists the summary and the
# progress at 100 %, and the summary page shows the quicklook thumbnails (images that loaded).
#
# Both UIs of Prefect 3.8 are checked: the classic one at `/runs/flow-run/<id>` (the link
# `polar-cube run` and Prefect's logs print) and the new one at `/v2/...` (where the server's
# front page sends a browser). Screenshots go to pytest's tmp folder; with
# POLAR_CUBE_UPDATE_DOCS=1 they also replace docs/prefect-ui-flow-run.png and
# docs/prefect-ui-artifacts.png.

CUBE = "polar-1km"  # the demo deployment's resolution, in the cube's name
UPDATE_DOCS = os.environ.get("POLAR_CUBE_UPDATE_DOCS") == "1"
UIS = {"classic": "", "v2": "/v2"}  # Prefect 3.8's two UIs, by their path prefix
VIEWPORT = {"width": 1600, "height": 1200}
SPEC = load_spec(REPO / "cube.geojson")


# --- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("no `chromium` on PATH: bin/setup installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


def save_screenshot(page, tmp_path: Path, name: str, docs: bool) -> None:
    page.screenshot(path=tmp_path / name)
    if docs and UPDATE_DOCS:
        shutil.copyfile(tmp_path / name, REPO / "docs" / name)


def test_run_watch_prints_progress_and_task_runs(deployment_run):
    output = deployment_run.output
    assert "finished: Completed" in output
    progress = re.findall(r"^  progress: (\d+) % · ", output, flags=re.M)
    assert progress and progress[-1] == "100"
    assert [int(p) for p in progress] == sorted(int(p) for p in progress)
    # the scheduled deployment deep-verifies what it publishes (its `deep_verify`)
    tasks = ("download-ice_thickness_cryosmos", f"merge-{CUBE}", f"deep-verify-{CUBE}")
    for task_run in (*tasks, f"publish-{CUBE}"):
        assert re.search(rf"^  task run {task_run}\S*: Completed in ", output, flags=re.M)
    assert re.search(rf"^  subflow run datasets-{CUBE}-\S+: Completed", output, flags=re.M)


@pytest.mark.parametrize("ui", UIS)
def test_the_parent_runs_artifacts_tell_the_story(deployment_run, browser, ui, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport=VIEWPORT)
    prefix = UIS[ui]
    page.goto(f"{deployment_run.ui_url}{prefix}/runs/flow-run/{deployment_run.flow_run_id}")
    page.get_by_text("Artifacts", exact=True).first.click()
    summary_card = page.get_by_text("polar-cube-summary", exact=True)
    expect(summary_card).to_be_visible(timeout=30_000)
    for key in ("polar-cube-progress", "polar-cube-coverage", "polar-cube-stac-item"):
        expect(page.get_by_text(key, exact=True)).to_be_visible()
    expect(page.get_by_text("polar-cube-viewer", exact=True)).to_be_visible()
    # the progress card's description carries its percentage
    expect(page.get_by_text(re.compile(rf"^100 % · published {CUBE}-"))).to_be_visible()
    built = f"{len(SPEC.sources)} of {len(SPEC.sources)} per-dataset cubes built"
    expect(page.get_by_text(re.compile(rf"{CUBE}-\S+ at 1000 m: {built}"))).to_be_visible()
    summary_card.scroll_into_view_if_needed()
    save_screenshot(page, tmp_path, "prefect-ui-flow-run.png", docs=ui == "classic")

    summary_card.click()
    if ui == "v2":  # the card opens the key's page (its versions): open the latest one
        page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    expect(page.get_by_text("Built and reused", exact=True)).to_be_visible(timeout=30_000)
    maps = layer_count(SPEC)
    expect(page.locator("img[src^='data:image/png']")).to_have_count(maps, timeout=30_000)
    for image in page.locator("img[src^='data:image/png']").all():
        image.scroll_into_view_if_needed()  # a lazily loaded image loads once on screen
    page.wait_for_function(  # every thumbnail decoded, as a browser shows it
        "Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=30_000,
    )
    thumbnails = page.evaluate(
        "Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
        ".map(i => [i.alt, i.naturalWidth])"
    )
    assert any(alt == "ice_thickness" and width > 100 for alt, width in thumbnails), thumbnails
    assert len(thumbnails) == maps
    page.get_by_text("Built and reused", exact=True).scroll_into_view_if_needed()  # its top
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})  # down to the maps
    save_screenshot(page, tmp_path, "prefect-ui-artifacts.png", docs=ui == "classic")
    page.close()
