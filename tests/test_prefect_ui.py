"""The Prefect UI in a real browser (Playwright driving Debian's headless chromium) after a
deployment run: the parent flow run's Artifacts tab lists the summary and the progress at
100 %, and the summary page shows the quicklook thumbnails (images that really loaded).

Both UIs of Prefect 3.8 are checked: the classic one at `/runs/flow-run/<id>` (the link
`polar-cube run` and Prefect's logs print) and the new one at `/v2/...` (where the server's
front page sends a browser). Screenshots go to pytest's tmp folder; with
POLAR_CUBE_UPDATE_DOCS=1 they also replace docs/prefect-ui-flow-run.png and
docs/prefect-ui-artifacts.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from polar_cube.deployments.operate import stop_server, stop_worker
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block, layer_count

pytestmark = pytest.mark.slow
POOL = "polar-cube"
DEPLOYMENT = "build-cube/monthly"
UPDATE_DOCS = os.environ.get("POLAR_CUBE_UPDATE_DOCS") == "1"
UIS = {"classic": "", "v2": "/v2"}  # Prefect 3.8's two UIs, by their path prefix
VIEWPORT = {"width": 1600, "height": 1200}
SPEC = load_spec(REPO / "cube.geojson")


# --- the run ------------------------------------------------------------------------------
# TO SWAP: `deployment_run` below is this module's own until the shared fixture of the same
# name and interface (`.ui_url`, `.api_url`, `.flow_run_id` of the parent build-cube run)
# arrives from tests/conftest.py or its plugin; then delete this section.


@dataclass
class DeploymentRun:
    ui_url: str  # http://127.0.0.1:PORT
    api_url: str  # http://127.0.0.1:PORT/api
    flow_run_id: str  # the parent (build-cube) flow run
    output: str  # what `polar-cube run --watch` printed
    env: dict


def _polar_cube(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"polar-cube {args[:2]}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory, s3_server, small_standins) -> Iterator[DeploymentRun]:
    """A Prefect server (own PREFECT_HOME), pool, bucket blocks, the deployment at 3 km from
    the small stand-ins, a process worker and `polar-cube run --watch`; stopped by pid."""
    root = tmp_path_factory.mktemp("prefect-ui")
    state = root / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env |= {"PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    port = free_port_block(1)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _polar_cube(env, "server", "start", "--state-dir", str(state), "--port", str(port))
        env |= {"PREFECT_API_URL": api}
        _polar_cube(env, "pool", "create", "--name", POOL)
        keys = {
            "AWS_ENDPOINT_URL": s3_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        }
        blocks = ["blocks", "create", "--bucket-block", "ui-test-bucket"]
        blocks += ["--credentials-block", "ui-test-credentials", "--bucket", "polar-test"]
        _polar_cube(env | keys, *blocks, "--folder", "ui-test")
        with serving_mirror(small_standins) as mirror:
            values = {
                "spec_path": str(REPO / "cube.geojson"),
                "patch_path": str(REPO / "patch.yaml"),
                "resolution": 3000,
                "source_mirror": mirror,
                "cache_dir": str(root / "cache"),
                "datasets_dir": str(root / "datasets"),
                "bucket_block": "ui-test-bucket",
            }
            params = [f"--param={key}={json.dumps(value)}" for key, value in values.items()]
            _polar_cube(env, "deploy", "--pool", POOL, "--paused", *params)
            _polar_cube(env, "worker", "start", "--pool", POOL, "--state-dir", str(state))
            run = _polar_cube(
                env, "run", "--deployment", DEPLOYMENT, "--watch", "--timeout", "600", timeout=700
            )
        flow_run_id = re.search(r"\(([0-9a-f-]{36})\)", run.stdout).group(1)
        yield DeploymentRun(api.removesuffix("/api"), api, flow_run_id, run.stdout, env)
    finally:
        stop_worker(state, POOL)
        stop_server(state)


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
    for task_run in ("download-ice_thickness_cryosmos", "merge-polar-3km", "publish-polar-3km"):
        assert re.search(rf"^  task run {task_run}\S*: Completed in ", output, flags=re.M)
    assert re.search(r"^  subflow run datasets-polar-3km-\S+: Completed", output, flags=re.M)


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
    expect(page.get_by_text(re.compile(r"^100 % · published polar-3km-"))).to_be_visible()
    built = f"{len(SPEC.sources)} of {len(SPEC.sources)} per-dataset cubes built"
    expect(page.get_by_text(re.compile(rf"polar-3km-\S+ at 3000 m: {built}"))).to_be_visible()
    summary_card.scroll_into_view_if_needed()
    save_screenshot(page, tmp_path, "prefect-ui-flow-run.png", docs=ui == "classic")

    summary_card.click()
    if ui == "v2":  # the card opens the key's page (its versions): open the latest one
        page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    expect(page.get_by_text("Built and reused", exact=True)).to_be_visible(timeout=30_000)
    page.wait_for_function(
        "Array.from(document.images).some(i => i.src.startsWith('data:image/png')"
        " && i.complete && i.naturalWidth > 0)",
        timeout=30_000,
    )
    thumbnails = page.evaluate(
        "Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
        ".map(i => [i.alt, i.naturalWidth])"
    )
    assert any(alt == "ice_thickness" and width > 100 for alt, width in thumbnails)
    assert len(thumbnails) == layer_count(SPEC) and all(width > 0 for _, width in thumbnails)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})  # down to the maps
    save_screenshot(page, tmp_path, "prefect-ui-artifacts.png", docs=ui == "classic")
    page.close()
