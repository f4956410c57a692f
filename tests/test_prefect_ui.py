"""The Prefect UI in a real browser (Playwright driving Debian's headless chromium) after the
README's scheduled-builds block ran (fixture `deployment_run`, tests/readme_deployment.py,
the 1 km demo deployment): the parent flow run's Artifacts tab lists the summary and the progress at
100 %, and the summary page shows the quicklook thumbnails (images that really loaded).

Both UIs of Prefect 3.8 are checked: the classic one at `/runs/flow-run/<id>` (the link
`polar-cube run` and Prefect's logs print) and the new one at `/v2/...` (where the server's
front page sends a browser). Screenshots go to pytest's tmp folder; with
POLAR_CUBE_UPDATE_DOCS=1 they also replace docs/prefect-ui-flow-run.png and
docs/prefect-ui-artifacts.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from polar_cube.spec import load_spec
from tests.conftest import REPO, layer_count

pytestmark = pytest.mark.slow
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
    for task_run in ("download-ice_thickness_cryosmos", f"merge-{CUBE}", f"publish-{CUBE}"):
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
    page.evaluate("window.scrollTo(0, 0)")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})  # down to the maps
    save_screenshot(page, tmp_path, "prefect-ui-artifacts.png", docs=ui == "classic")
    page.close()
