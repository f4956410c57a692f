"""`polar-cube view`: the published cube in xcube's server and web viewer.

The slow tests build a small cube into a real S3 server (SeaweedFS), start `polar-cube view
--bucket-block …` (a real `xcube serve` in the background, keys only in its environment) and
drive the viewer in a real headless browser (Debian's chromium through selenium and
chromedriver): the page loads as polar-cube's (its title, no privacy dialog, no other
organisation named), a variable chosen in the UI is drawn over the context base map (the
cube's ice thickness in greys, served by the same xcube), the lake masks step through their
two time steps, and the tiles the browser got are decoded and checked.

`python -m tests.test_view --cube-dir DIR --out docs/viewer.png` takes the screenshot in
docs/ with the same browser.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from polar_cube.servers.viewer import (
    start_viewer,
    stop_viewer,
    viewer_status,
    xcube_environment,
)
from polar_cube.servers.viewer_branding import (
    context_layer,
    context_range,
    context_variable,
    logo_png,
    viewer_app_config,
    viewer_index,
    write_viewer_app,
    xcube_viewer_dist,
)
from polar_cube.servers.viewer_config import (
    CubeSource,
    ViewError,
    color_mapping,
    server_config,
    source_from_folder,
    split_credentials,
    tile_url,
    time_steps,
    value_range,
    viewer_url,
    web_mercator_tile,
    whole_cube_tile,
)
from polar_cube.spec import load_spec
from tests.prefect_api import session_api_env

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 3000.0
BUCKET = "polar-test"
BUCKET_FOLDER = "view"
BUCKET_BLOCK = "polar-view-bucket"
CREDENTIALS_BLOCK = "polar-view-credentials"
WINDOW = (1280, 800)
# who runs xcube's own deployment: named by its privacy note and imprint, never by ours
OTHER_ORGANISATION = ("Brockmann", "GmbH")

# --- the configuration, from metadata alone -------------------------------------------------


def small_cube(time_values=("2013-01-01", "2017-01-01")) -> xr.Dataset:
    """A cube's metadata as the build writes it: units, colour bars, statistics, flags."""
    x, y = np.arange(4) * 3000.0 - 1e6, np.arange(3) * 3000.0 - 5e5
    static, timed = np.zeros((3, 4), "float32"), np.zeros((2, 3, 4), "float32")
    stats = [{"time": None, "cells": 12, "valid_cells": 9, "minimum": 50.5, "maximum": 230.0}]
    magnetic_stats = [
        {"time": None, "minimum": -2087.5, "maximum": 2077.25, "cells": 12, "valid_cells": 12}
    ]
    lake_stats = [
        {"time": "2013-01-01", "minimum": 0.0, "maximum": 0.0},
        {"time": "2017-01-01", "minimum": None, "maximum": None},
    ]
    return xr.Dataset(
        {
            "crs": ((), np.int32(0), {"grid_mapping_name": "polar_stereographic"}),
            "heat_flow": (("y", "x"), static, {"units": "mW m-2", "polar_cube_stats": stats}),
            "magnetic_anomaly": (
                ("y", "x"),
                static,
                # stored as JSON text by older builds: read the same way
                {
                    "units": "nT",
                    "color_bar_name": "RdBu_r",
                    "polar_cube_stats": json.dumps(magnetic_stats),
                },
            ),
            "depth": (
                ("time", "y", "x"),
                timed,
                {
                    "units": "km",
                    "color_bar_name": "not-a-colour-map",
                    "polar_cube_stats": [
                        {"time": "2013-01-01", "minimum": -3.0, "maximum": 2.0},
                        {"time": "2017-01-01", "minimum": -5.0, "maximum": 1.0},
                    ],
                },
            ),
            "thw_70": (
                ("time", "y", "x"),
                timed,
                {
                    "units": "1",
                    "flag_values": [0, 1],
                    "color_bar_name": "GnBu",
                    "polar_cube_stats": lake_stats,
                },
            ),
            "empty": (("y", "x"), static, {"units": "m", "polar_cube_stats": []}),
            "profile": (("x",), np.zeros(4, "float32"), {"units": "m"}),
        },
        coords={"x": x, "y": y, "time": pd.to_datetime(list(time_values))},
        attrs={"title": "Polar Data Cube v1.1.0", "summary": "Layers of the\n  Amundsen Sea."},
    )


def test_server_config_is_generated_from_the_cube_metadata():
    from xcube.webapi.datasets.config import CONFIG_SCHEMA
    from xcube.webapi.viewer.config import CONFIG_SCHEMA as VIEWER_SCHEMA

    source = CubeSource(
        "s3://polar-cube/cubes",
        "polar-3000m.zarr",
        {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9333", "region_name": "us-east-1"}},
    )
    config = server_config(small_cube(), source, viewer_dir="/state/viewer")
    CONFIG_SCHEMA.validate_instance({k: v for k, v in config.items() if k != "Viewer"})
    VIEWER_SCHEMA.validate_instance({"Viewer": config["Viewer"]})
    assert config["DataStores"] == [
        {
            "Identifier": "polar-cube",
            "StoreId": "s3",
            "StoreParams": {
                "root": "polar-cube/cubes",
                "storage_options": {
                    "client_kwargs": {
                        "endpoint_url": "http://127.0.0.1:9333",
                        "region_name": "us-east-1",
                    }
                },
            },
            "Datasets": [
                {
                    "Identifier": "polar-3000m",
                    "Path": "polar-3000m.levels",  # the overview levels, not the full grid
                    "Title": "Polar Data Cube v1.1.0",
                    "Style": "polar-3000m",
                    "Variables": ["heat_flow", "magnetic_anomaly", "depth", "thw_70", "empty"],
                    "Description": "Layers of the Amundsen Sea.",
                }
            ],
        }
    ]
    assert config["Styles"] == [
        {
            "Identifier": "polar-3000m",
            "ColorMappings": {
                "heat_flow": {"ColorBar": "viridis", "ValueRange": [50.5, 230.0]},
                "magnetic_anomaly": {"ColorBar": "RdBu_r", "ValueRange": [-2087.5, 2077.25]},
                "depth": {"ColorBar": "viridis", "ValueRange": [-5.0, 2.0]},  # all time steps
                "thw_70": {"ColorBar": "GnBu", "ValueRange": [0.0, 1.0]},  # flag_values
                "empty": {"ColorBar": "viridis", "ValueRange": [0.0, 1.0]},
            },
        }
    ]
    assert config["EntrypointDatasetId"] == "polar-3000m"
    assert config["Viewer"] == {"Configuration": {"Path": "/state/viewer"}}
    local = server_config(small_cube(), source_from_folder("/data/cube", "polar-3000m.zarr"))
    assert local["DataStores"][0]["StoreId"] == "file"
    assert local["DataStores"][0]["StoreParams"] == {"root": "/data/cube"}
    assert "Viewer" not in local


def test_value_ranges_and_colour_bars_cover_the_edge_cases():
    assert value_range({"flag_values": np.array([0, 1, 2], dtype="int8")}) == (0.0, 2.0)
    assert value_range({"flag_values": [1]}) == (0.5, 1.5)
    assert value_range({"polar_cube_stats": [{"minimum": 4.0, "maximum": 4.0}]}) == (3.5, 4.5)
    assert value_range({"polar_cube_stats": "not json"}) == (0.0, 1.0)
    assert value_range({}) == (0.0, 1.0)
    assert color_mapping({"color_bar_name": "Blues"})["ColorBar"] == "Blues"


def test_secrets_never_reach_the_configuration():
    options = {
        "key": "AKIDEXAMPLE",
        "secret": "very-secret",
        "token": "session",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9333"},
    }
    public, env = split_credentials(options)
    assert public == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9333"}}
    assert env == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_SESSION_TOKEN": "session",
    }
    with pytest.raises(ValueError, match="secrets"):
        CubeSource("s3://b", "c.zarr", options)
    config = json.dumps(server_config(small_cube(), CubeSource("s3://b", "c.zarr", public)))
    assert "very-secret" not in config and "AKIDEXAMPLE" not in config


def test_xcube_gets_the_blocks_keys_only_in_its_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-elses")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "someone-elses-secret")
    monkeypatch.setenv("AWS_PROFILE", "other")
    env = xcube_environment({"AWS_ACCESS_KEY_ID": "ours", "AWS_SECRET_ACCESS_KEY": "our-secret"})
    assert env["AWS_ACCESS_KEY_ID"] == "ours" and env["AWS_SECRET_ACCESS_KEY"] == "our-secret"
    assert "AWS_PROFILE" not in env
    assert xcube_environment({})["AWS_ACCESS_KEY_ID"] == "someone-elses"  # e.g. an IAM setup


def test_time_must_be_a_datetime_coordinate_to_step_through():
    assert time_steps(small_cube()) == ["2013-01-01", "2017-01-01"]
    assert time_steps(small_cube().isel(time=0, drop=True)) == []
    with pytest.raises(ViewError, match="no datetime coordinate"):
        server_config(small_cube().assign_coords(time=[0, 1]), CubeSource("/c", "c.zarr"))


def test_web_mercator_tiles():
    assert web_mercator_tile(0.0, 0.0, 0) == (0, 0)
    assert web_mercator_tile(-109.2, -74.3, 4) == (3, 13)
    assert web_mercator_tile(180.0, -90.0, 2) == (3, 3)  # clamped into the grid


def test_a_missing_cube_is_one_clear_line(tmp_path):
    """Nothing published (no catalog naming `latest`), or a --cube-id that is not there."""
    series = load_spec(REPO / "cube.geojson").at_resolution(RESOLUTION).series
    state = str(tmp_path / "view")
    result = run_cli(
        *("view", "--cube-dir", str(tmp_path), "--resolution", "3000", "--state-dir", state)
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"polar-cube: error: {tmp_path / series}.versions.json: no published version of "
        f"{series}; build it first (`polar-cube build`)\n"
    )
    named = run_cli(
        *("view", "--cube-dir", str(tmp_path), "--cube-id", f"{series}-v1.1.0.zarr"),
        *("--state-dir", state),
    )
    assert named.returncode == 2, named.stderr
    [line] = named.stderr.strip().splitlines()
    assert line.startswith(
        f"polar-cube: error: no published cube at {tmp_path / series}-v1.1.0.zarr "
    )
    assert not (tmp_path / "view" / "server.json").exists()


# --- the viewer's branding and context layer ------------------------------------------------


def test_the_context_layer_is_the_ice_thickness_in_light_greys():
    cube = small_cube()
    assert context_variable(cube) == "heat_flow"  # no ice: the first static map variable
    cube["ice"] = cube["heat_flow"].assign_attrs(
        standard_name="land_ice_thickness",
        long_name="Ice Thickness",
        polar_cube_stats=[{"time": None, "minimum": 0.0, "maximum": 3500.0}],
    )
    assert context_variable(cube) == "ice"
    layer = context_layer(cube, "http://127.0.0.1:8080", "polar-3km")
    assert layer == {
        "id": "cube-context",
        "title": "Ice Thickness (greys, from the cube)",
        "url": "http://127.0.0.1:8080/tiles/polar-3km/ice/{z}/{y}/{x}?crs=EPSG:3857"
        "&cmap=Greys&vmin=-2000&vmax=8000",
        "attribution": "Polar Data Cube v1.1.0: ice",
    }
    low, high = context_range(0.0, 3500.0)
    assert (0.0 - low) / (high - low) == pytest.approx(0.2)  # light grey, not white
    assert (3500.0 - low) / (high - low) == pytest.approx(0.55)  # mid grey, not black
    assert context_variable(cube[["depth", "thw_70"]]) is None  # time-stepped only
    assert context_layer(cube[["depth", "thw_70"]], "http://h", "d") is None


def test_the_viewer_config_is_polar_cubes_with_the_context_as_only_base_map():
    layer = {"id": "cube-context", "title": "t", "url": "http://h/tiles/{z}/{y}/{x}"}
    config = viewer_app_config("http://127.0.0.1:8080", "Polar Data Cube", "polar-3km", layer)
    branding = config["branding"]
    assert config["name"] == "polar-cube"
    assert branding["appBarTitle"] == branding["windowTitle"] == "polar-cube: Polar Data Cube"
    assert branding["logoImage"] == "images/logo.png"
    assert branding["organisationUrl"] == "http://127.0.0.1:8080/viewer/?dataset=polar-3km"
    assert branding["allowSharing"] is False
    assert branding["layers"] == {"baseMaps": [layer]}  # replaces xcube's internet base maps
    assert branding["layerVisibilities"] == {"baseMaps.cube-context": True}
    assert "layers" not in viewer_app_config("http://h", "T", "d")["branding"]
    # every key is one the installed viewer reads (an xcube upgrade that renames one fails)
    [script] = (xcube_viewer_dist() / "assets").glob("main-*.js")
    code = script.read_text()
    for key in branding:
        assert f"{key}:" in code or f".{key}" in code, key
    assert "privacyNoticeAccepted" in code and "xcube.${this.brandingName}.${e}" in code


def test_the_web_app_folder_links_xcubes_viewer_with_our_page_and_notes(tmp_path):
    dist = xcube_viewer_dist()
    app = write_viewer_app(tmp_path / "app")
    assert write_viewer_app(tmp_path / "app") == app  # rewritten on each start
    assert {p.name for p in app.iterdir()} == {p.name for p in dist.iterdir()}
    assert {p.name for p in (app / "docs").iterdir()} == {p.name for p in (dist / "docs").iterdir()}
    assert (app / "assets").resolve() == (dist / "assets").resolve()
    for note in (app / "docs").glob("*.md"):
        text = note.read_text()
        if note.name.startswith(("privacy-note", "imprint")):
            assert not note.is_symlink()
            assert not any(name in text for name in OTHER_ORGANISATION), note.name
        else:
            assert note.resolve() == (dist / "docs" / note.name).resolve()
    index = (app / "index.html").read_text()
    assert "<title>polar-cube</title>" in index and "xcube Viewer" not in index
    consent = index.index('localStorage.setItem("xcube.polar-cube.privacyNoticeAccepted"')
    assert consent < index.index("</head>")
    assert 'type="module"' in index  # xcube's own app script, unchanged
    assert json.loads((app / "manifest.json").read_text())["name"] == "polar-cube"
    with pytest.raises(ValueError, match="no </head>"):
        viewer_index("<html><body></body></html>")


def test_the_logo_is_ours():
    from PIL import Image

    logo = Image.open(io.BytesIO(logo_png()))
    assert logo.size == (64, 64) and logo.mode == "RGBA"
    assert logo.getpixel((25, 25))[:3] == (255, 255, 255)  # the grid cell
    assert logo.getpixel((2, 32))[:3] == (31, 78, 121)  # on the header colour


# --- helpers: the command line, tiles, the browser ------------------------------------------


def run_cli(*args: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def get_png(url: str) -> np.ndarray:
    """The RGBA pixels of a PNG tile (HTTP 200 and a PNG required)."""
    import httpx
    from PIL import Image

    response = httpx.get(url, timeout=120)
    assert response.status_code == 200, (url, response.text[:500])
    assert response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))


def colour_bar_rgb(name: str) -> set[tuple[int, int, int]]:
    """Every RGB value xcube paints with this colour bar (255 * colour, truncated)."""
    from matplotlib import colormaps

    lut = (255 * colormaps[name](np.linspace(0, 1, colormaps[name].N))).astype("uint8")
    return {tuple(int(c) for c in colour[:3]) for colour in lut}


def chromium_driver(width: int = WINDOW[0], height: int = WINDOW[1]):
    """A headless chromium (Debian's, with its chromedriver) with a width x height viewport,
    recording its network events."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        raise FileNotFoundError("needs Debian's chromium and chromium-driver (apt-get install)")
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return chrome


@contextmanager
def browser():
    pytest.importorskip("selenium")
    try:
        chrome = chromium_driver()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    try:
        yield ViewerPage(chrome)
    finally:
        chrome.quit()


class ViewerPage:
    """xcube's viewer in the browser, through its UI, and the tile responses it received."""

    def __init__(self, driver):
        self.driver = driver
        self.responses: list[tuple[int, str]] = []

    def wait(self, condition, timeout: float = 60, message: str = ""):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _: condition(), message
        )

    def open(self, url: str) -> None:
        """Load the viewer (a fresh profile: nothing in its local storage) and wait for its
        controls. No privacy dialog may come up on the way."""
        from selenium.webdriver.common.by import By

        self.driver.get(url)
        self.wait(
            lambda: (
                self.privacy_dialog()
                or self.driver.find_elements(By.ID, "mui-component-select-variable")
            ),
            message="the viewer's controls did not come up",
        )
        assert not self.privacy_dialog(), self.privacy_dialog()[0].text

    def privacy_dialog(self) -> list:
        """xcube's privacy dialog (its 'Accept and continue' button), if it is up."""
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.XPATH, "//*[@role='dialog'][.//button]")

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def tiles(self) -> list[tuple[int, str]]:
        """(HTTP status, URL) of every map tile response the browser received so far."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.responseReceived":
                response = message["params"]["response"]
                if "/tiles/" in response["url"]:
                    self.responses.append((response["status"], response["url"]))
        return self.responses

    def tiles_with(self, prefix: str) -> list[tuple[int, str]]:
        return [(status, url) for status, url in self.tiles() if url.startswith(prefix)]

    def tiles_of(self, variable: str, date: str | None = None) -> list[tuple[int, str]]:
        return [
            (status, url)
            for status, url in self.tiles()
            if f"/{variable}/" in url
            and (date is None or parse_qs(urlparse(url).query)["time"][0].startswith(date))
        ]

    def wait_for_tiles(self, variable: str, date: str | None = None, settle: float = 1.5):
        """Wait until the browser has tiles of `variable` and no new one came for `settle` s."""
        self.wait(lambda: self.tiles_of(variable, date), message=f"no tile of {variable}")
        count, still = -1, time.monotonic()
        while time.monotonic() - still < settle:
            now = len(self.tiles())
            if now != count:
                count, still = now, time.monotonic()
            time.sleep(0.2)
        return self.tiles_of(variable, date)

    def selected_variable(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, "mui-component-select-variable").text

    def choose_variable(self, name: str, title: str) -> None:
        """Open the variable menu and click the variable's entry (again if the menu was still
        sliding in and the click went nowhere)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By

        option = f"li[role=option][data-value='{name}']"
        for _ in range(3):
            self.driver.find_element(By.ID, "mui-component-select-variable").click()
            entry = self.wait(lambda: self.driver.find_elements(By.CSS_SELECTOR, option))[0]
            time.sleep(0.5)  # the menu's transition
            self.driver.execute_script("arguments[0].scrollIntoView(); arguments[0].click()", entry)
            try:
                self.wait(lambda: title in self.selected_variable(), timeout=5)
                return
            except TimeoutException:
                self.driver.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape
        raise AssertionError(f"cannot choose {name} in the variable menu")

    def first_time_step(self) -> None:
        from selenium.webdriver.common.by import By

        icon = self.driver.find_element(By.CSS_SELECTOR, "svg[data-testid=FirstPageIcon]")
        icon.find_element(By.XPATH, "./ancestor::button").click()

    def shown_time(self) -> str:
        from selenium.webdriver.common.by import By

        values = [
            e.get_attribute("value") or "" for e in self.driver.find_elements(By.TAG_NAME, "input")
        ]
        return next((v for v in values if v[:2] in ("19", "20") and "-" in v), "")

    def error_banners(self) -> list[str]:
        from selenium.webdriver.common.by import By

        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, "[role=alert]")]


def save_viewer_screenshot(
    server_url: str,
    dataset_id: str,
    variable: str,
    out: Path,
    size: tuple[int, int] = WINDOW,
    zoom_out: int = 1,
) -> Path:
    """Open the viewer on `variable` in a headless chromium, zoom out `zoom_out` steps from
    the dataset's extent (web mercator stretches the cube's polar side beyond it), wait for
    the tiles and save a PNG."""
    from selenium.webdriver.common.by import By

    chrome = chromium_driver(*size)
    try:
        page = ViewerPage(chrome)
        page.open(viewer_url(server_url, dataset_id, variable))
        page.wait_for_tiles(variable, settle=2)
        for _ in range(zoom_out):
            chrome.find_element(By.CSS_SELECTOR, "button[title='Zoom out']").click()
            time.sleep(0.5)
        page.wait_for_tiles(variable, settle=3)
        time.sleep(1)  # the tiles fade in
        out.parent.mkdir(parents=True, exist_ok=True)
        chrome.save_screenshot(str(out))
    finally:
        chrome.quit()
    return out


# --- end to end: a cube in the bucket, the server, the browser ------------------------------


@pytest.fixture(scope="module")
def bucket_options(s3_server):
    from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks

    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block=CREDENTIALS_BLOCK,
        bucket_name=BUCKET,
        bucket_folder=BUCKET_FOLDER,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return storage_options_from_blocks(load_bucket(BUCKET_BLOCK))


@pytest.fixture(scope="module")
def published(bucket_options, small_standins, repo_spec_path, tmp_path_factory):
    """The cube at 3000 m, built with its levels into <bucket>/view/; opened (metadata)."""
    from polar_cube.flows.build_cube import build_cube
    from polar_cube.sources.mirror import serving_mirror

    work = tmp_path_factory.mktemp("view-build")
    with serving_mirror(small_standins) as mirror:
        built = build_cube(
            spec_path=str(repo_spec_path),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            bucket_block=BUCKET_BLOCK,
        )
    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    assert built.url == f"s3://{BUCKET}/{BUCKET_FOLDER}/{spec.data_id}"  # the first version
    return built.url, xr.open_zarr(built.url, consolidated=True, storage_options=bucket_options)


def cube_id(published) -> str:
    """The built cube's name, `<series>-vX.Y.Z.zarr` (it depends on the resolution)."""
    return published[0].rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def viewer(published, repo_spec_path, tmp_path_factory):
    """`polar-cube view --bucket-block … --resolution 3000` started as a user does (the cube
    `latest` names: the built one); stopped at the end."""
    state = tmp_path_factory.mktemp("view-state")
    started = run_cli(
        "view",
        "--bucket-block",
        BUCKET_BLOCK,
        "--spec",
        str(repo_spec_path),
        "--resolution",
        "3000",
        "--port",
        "0",
        "--state-dir",
        str(state),
    )
    assert started.returncode == 0, started.stderr[-3000:]
    info = viewer_status(state)
    assert info is not None, started.stdout
    try:
        yield info, started.stdout
    finally:
        stop_viewer(state)


@pytest.mark.slow
def test_the_command_prints_where_to_open_the_viewer(viewer, published):
    info, output = viewer
    url, _ = published
    assert info.cube_url == url and info.dataset_id == cube_id(published).removesuffix(".zarr")
    assert f"(pid {info.pid}), showing {url}\n" in output  # the version `latest` names
    assert f"open: {info.server_url}/viewer/?dataset={info.dataset_id}" in output
    assert info.server_url.startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_the_server_shows_the_levels_with_units_colour_bars_ranges_and_time(viewer, published):
    import httpx

    info, _ = viewer
    _, cube = published
    config = json.loads(info.config_path.read_text())
    assert config["DataStores"][0]["Datasets"][0]["Path"].endswith(".levels")
    dataset = httpx.get(f"{info.server_url}/datasets/{info.dataset_id}", timeout=60).json()
    # the published levels (3000 m, 6000 m): xcube did not make levels of its own
    assert dataset["resolutions"] == [RESOLUTION, 2 * RESOLUTION]
    assert dataset["spatialRef"] == "EPSG:3031"
    shown = {variable["name"]: variable for variable in dataset["variables"]}
    assert set(shown) == {name for name in cube.data_vars if name != "crs"}
    for name, variable in shown.items():
        attrs = cube[name].attrs
        assert variable["units"] == attrs["units"], name
        expected = color_mapping(attrs)
        assert variable["colorBarName"] == expected["ColorBar"], name
        assert [variable["colorBarMin"], variable["colorBarMax"]] == expected["ValueRange"], name
    assert shown["magnetic_anomaly"]["colorBarName"] == "RdBu_r"  # patch.yaml's colour bar
    stats = cube["magnetic_anomaly"].attrs["polar_cube_stats"]
    assert shown["magnetic_anomaly"]["colorBarMin"] == min(s["minimum"] for s in stats)
    assert [shown["thw_70"]["colorBarMin"], shown["thw_70"]["colorBarMax"]] == [0, 1]  # flags
    [time_dimension] = [d for d in dataset["dimensions"] if d["name"] == "time"]
    assert time_dimension["coordinates"] == ["2013-01-01T00:00:00Z", "2017-01-01T00:00:00Z"]
    assert shown["thw_124"]["dims"] == ["time", "y", "x"]


@pytest.mark.slow
def test_the_viewer_in_a_browser_draws_the_chosen_variable_and_steps_through_time(
    viewer, published, tmp_path
):
    info, _ = viewer
    _, cube = published
    with browser() as page:
        page.open(viewer_url(info.server_url, info.dataset_id, "thw_124"))
        page.wait(lambda: "Subglacial Lake Thw 124" in page.selected_variable())
        assert page.driver.title == f"polar-cube: {cube.attrs['title']}"
        # the latest time step first, then the first one through the time controls
        assert page.wait_for_tiles("thw_124", "2017-01-01")
        assert page.shown_time().startswith("2017-01-01")
        page.first_time_step()
        assert page.wait_for_tiles("thw_124", "2013-01-01")
        page.wait(lambda: page.shown_time().startswith("2013-01-01"))
        # another variable, chosen in the variable menu
        page.choose_variable("magnetic_anomaly", "Magnetic Anomaly")
        magnetic = page.wait_for_tiles("magnetic_anomaly")
        page.driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert page.error_banners() == []
        assert page.driver.find_elements("css selector", "#root canvas")  # the map drew
        assert [t for t in page.tiles() if t[0] != 200] == []  # no tile failed
    # the tiles the browser got: coloured with RdBu_r where the cube has data
    palette = colour_bar_rgb("RdBu_r")
    painted = []
    for _, url in magnetic:
        query = parse_qs(urlparse(url).query)
        assert query["cmap"] == ["RdBu_r"] and query["crs"] == ["EPSG:3857"]
        stats = cube["magnetic_anomaly"].attrs["polar_cube_stats"]
        assert float(query["vmin"][0]) == pytest.approx(min(s["minimum"] for s in stats))
        pixels = get_png(url)
        opaque = pixels[pixels[..., 3] > 0][:, :3]
        if len(opaque):
            assert {tuple(int(c) for c in p) for p in np.unique(opaque, axis=0)} <= palette
            painted.append(len(np.unique(opaque, axis=0)))
    assert painted and max(painted) > 20, painted  # many colours, not one flat fill


@pytest.mark.slow
def test_the_viewer_is_polar_cubes_and_shows_a_variable_on_the_context_map(viewer, tmp_path):
    import httpx

    info, _ = viewer
    served = httpx.get(f"{info.server_url}/viewer/config/config.json", timeout=60).json()
    [layer] = served["branding"]["layers"]["baseMaps"]
    assert layer["url"].startswith(f"{info.server_url}/tiles/{info.dataset_id}/ice_thickness/")
    context_prefix = layer["url"].split("{z}")[0]
    for note in ("privacy-note.en.md", "privacy-note.de.md", "imprint.en.md"):
        text = httpx.get(f"{info.server_url}/viewer/docs/{note}", timeout=60).text
        assert "polar-cube" in text and not any(n in text for n in OTHER_ORGANISATION), note
    logo = httpx.get(f"{info.server_url}/viewer/config/images/logo.png", timeout=60)
    assert logo.headers["content-type"] == "image/png" and logo.content == logo_png()
    shot = tmp_path / "viewer-context.png"
    with browser() as page:
        page.open(viewer_url(info.server_url, info.dataset_id, "magnetic_anomaly"))
        assert page.driver.title.startswith("polar-cube: ")
        page.wait(lambda: page.tiles_of("magnetic_anomaly") and page.tiles_with(context_prefix))
        page.wait_for_tiles("magnetic_anomaly", settle=2)
        time.sleep(1)  # the tiles fade in
        page.driver.save_screenshot(str(shot))
        header = page.driver.find_element("css selector", "header h1").text
        assert header.startswith("polar-cube: ")
        assert not any(name in page.text() for name in OTHER_ORGANISATION)
        assert not page.privacy_dialog() and page.error_banners() == []
        context = page.tiles_with(context_prefix)
    print(f"screenshot: {shot}")
    # the context tiles: all answered, painted in the greys where the cube has ice
    assert context and all(status == 200 for status, _ in context), context
    greys = colour_bar_rgb("Greys")
    painted = 0
    for _, url in context:
        assert parse_qs(urlparse(url).query)["cmap"] == ["Greys"]
        pixels = get_png(url)
        opaque = pixels[pixels[..., 3] > 0][:, :3]
        assert {tuple(int(c) for c in p) for p in np.unique(opaque, axis=0)} <= greys
        painted += len(opaque)
    assert painted > 10_000, painted
    # on screen: the variable in its own colours, the ice around it in the context's greys
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))[170:760, 60:1000].reshape(-1, 3)
    level = pixels.astype(int)
    grey = (level.max(axis=1) - level.min(axis=1) <= 1) & (level[:, 0] < 230) & (level[:, 0] > 60)
    coloured = level.max(axis=1) - level.min(axis=1) > 40
    assert grey.sum() > 5_000 and coloured.sum() > 5_000, (grey.sum(), coloured.sum())


@pytest.mark.slow
def test_lake_tiles_differ_between_the_time_steps_and_tiles_outside_are_empty(viewer, published):
    import pyproj

    info, _ = viewer
    _, cube = published
    lake = cube["thw_124"].load()
    changed = (lake.isel(time=0) != lake.isel(time=1)) & lake.notnull().all("time")
    assert int(changed.sum()) > 0  # the stand-in lake shrank between 2013 and 2017
    rows, columns = np.nonzero(changed.values)
    x, y = float(cube.x[int(np.median(columns))]), float(cube.y[int(np.median(rows))])
    lon, lat = pyproj.Transformer.from_crs(3031, 4326, always_xy=True).transform(x, y)
    tile = (7, *web_mercator_tile(lon, lat, 7))
    style = {"vmin": "0", "vmax": "1", "cmap": "GnBu"}
    first = get_png(
        tile_url(info.server_url, info.dataset_id, "thw_124", tile, time="2013-01-01", **style)
    )
    last = get_png(
        tile_url(info.server_url, info.dataset_id, "thw_124", tile, time="2017-01-01", **style)
    )
    assert (first[..., 3] > 0).sum() > 100 and (last[..., 3] > 0).sum() > 100
    assert (first != last).any(axis=-1).sum() > 10
    # the whole cube in one tile, and a tile far from it (xcube: 200, fully transparent)
    whole = get_png(
        tile_url(info.server_url, info.dataset_id, "ice_thickness", whole_cube_tile(cube))
    )
    assert (whole[..., 3] > 0).sum() > 500
    outside = (4, *web_mercator_tile(10.0, 50.0, 4))  # central Europe
    empty = get_png(tile_url(info.server_url, info.dataset_id, "ice_thickness", outside))
    assert empty.shape == (256, 256, 4) and (empty[..., 3] == 0).all()


@pytest.mark.slow
def test_no_key_in_the_configuration_log_served_pages_or_command_line(viewer, s3_server):
    import httpx

    info, output = viewer
    secrets = (s3_server.secret_key, s3_server.access_key)
    texts = {
        "output": output,
        "config": info.config_path.read_text(),
        "log": info.log_path.read_text(),
        "viewer config": (info.state_dir / "viewer" / "config.json").read_text(),
        "state": (info.state_dir / "server.json").read_text(),
        "cmdline": Path(f"/proc/{info.pid}/cmdline").read_bytes().decode().replace("\0", " "),
    }
    for path in ("/", "/viewer/config/config.json", f"/datasets/{info.dataset_id}"):
        texts[path] = httpx.get(f"{info.server_url}{path}", timeout=60).text
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, name
    assert "xcube" in texts["cmdline"] and "serve" in texts["cmdline"]
    store = json.loads(texts["config"])["DataStores"][0]
    assert store["StoreParams"]["storage_options"]["client_kwargs"]["endpoint_url"] == (
        s3_server.endpoint_url
    )
    # the keys went to the server through its environment (readable by its owner only)
    environment = Path(f"/proc/{info.pid}/environ").read_bytes().split(b"\0")
    assert f"AWS_SECRET_ACCESS_KEY={s3_server.secret_key}".encode() in environment


@pytest.mark.slow
def test_a_cube_in_a_local_folder(published, bucket_options, tmp_path):
    """The version, its levels and the catalog copied into a folder: `view --cube-dir` shows
    the version the catalog names `latest`."""
    import fsspec

    url, cube = published
    name = url.rsplit("/", 1)[1]
    stem = name.removesuffix(".zarr")
    series = load_spec(REPO / "cube.geojson").at_resolution(RESOLUTION).series
    fs = fsspec.filesystem("s3", **bucket_options)
    folder = tmp_path / "cube"
    for part in (name, f"{stem}.levels"):
        fs.get(f"{BUCKET}/{BUCKET_FOLDER}/{part}", str(folder / part), recursive=True)
    catalog = f"{series}.versions.json"
    fs.get(f"{BUCKET}/{BUCKET_FOLDER}/{catalog}", str(folder / catalog))
    assert json.loads((folder / catalog).read_text())["latest_cube"] == name
    assert (folder / f"{stem}.levels" / "0.link").read_text() == f"../{name}"
    state = tmp_path / "view"
    started = run_cli(
        *("view", "--cube-dir", str(folder), "--resolution", "3000"),
        *("--port", "0", "--state-dir", str(state)),
    )
    assert started.returncode == 0, started.stderr[-3000:]
    info = viewer_status(state)
    try:
        assert info is not None, started.stdout
        assert f"showing {folder / name}\n" in started.stdout
        assert json.loads(info.config_path.read_text())["DataStores"][0]["StoreId"] == "file"
        tile = whole_cube_tile(cube)
        pixels = get_png(tile_url(info.server_url, stem, "magnetic_anomaly", tile))
        assert (pixels[..., 3] > 0).sum() > 500
    finally:
        assert stop_viewer(state)
    assert viewer_status(state) is None
    shutil.rmtree(folder / f"{stem}.levels")
    with pytest.raises(ViewError, match="overview levels are missing"):
        start_viewer(state, source_from_folder(folder, name), port=0)


@pytest.mark.slow
def test_start_again_status_and_stop(viewer, published, repo_spec_path):
    """Last: stops the module's viewer."""
    import psutil

    info, _ = viewer
    state = str(info.state_dir)
    again = run_cli(
        "view",
        "--bucket-block",
        BUCKET_BLOCK,
        "--spec",
        str(repo_spec_path),
        "--cube-id",
        cube_id(published),
        "--state-dir",
        state,
        # the block from the session's API (the module's viewer read it through a temporary
        # server of the command's own, as a user without a server does: no second one)
        env=session_api_env(),
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(pid {info.pid})" in again.stdout  # the same server, not a second one
    other = run_cli(
        "view", "--cube-dir", "/nonexistent", "--cube-id", "x.zarr", "--state-dir", state
    )
    assert other.returncode == 2 and "already serves" in other.stderr
    status = run_cli("view", "status", "--state-dir", state)
    assert status.returncode == 0 and info.server_url in status.stdout
    stopped = run_cli("view", "stop", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped the viewer" in stopped.stdout
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == "zombie"
    assert not (info.state_dir / "server.json").exists()
    status = run_cli("view", "status", "--state-dir", state)
    assert status.returncode == 1 and "no viewer running" in status.stdout


# --- the screenshot in docs/ ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Take the viewer screenshot: serve a published cube, open it on a variable, save."""
    parser = argparse.ArgumentParser(prog="python -m tests.test_view", description=main.__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cube-dir", metavar="DIR", help="folder the cube was published into")
    where.add_argument("--bucket-block", metavar="NAME", help="S3Bucket block of its bucket")
    parser.add_argument(
        "--cube-id", default=None, help="<series>-vX.Y.Z.zarr (default: the one `latest` names)"
    )
    parser.add_argument("--spec", default=str(REPO / "cube.geojson"))
    parser.add_argument("--resolution", type=float, default=None, help="the cube's (spec's)")
    parser.add_argument("--variable", default="magnetic_anomaly")  # on the context map
    parser.add_argument("--zoom-out", type=int, default=1, help="steps out from its extent")
    parser.add_argument("--out", default=str(REPO / "docs" / "viewer.png"))
    args = parser.parse_args(argv)
    from polar_cube.cli.view import source_from_bucket_block
    from polar_cube.cube.versions import latest_cube
    from polar_cube.location import StoreLocation

    name = args.cube_id
    if name is None:
        series = load_spec(args.spec).at_resolution(args.resolution).series
        if args.bucket_block:
            from polar_cube.tasks.blocks import bucket_location

            name = latest_cube(bucket_location(args.bucket_block), series)
        else:
            name = latest_cube(StoreLocation.local(args.cube_dir), series)
    if args.bucket_block:
        source, options = source_from_bucket_block(args.bucket_block, name)
    else:
        source, options = source_from_folder(args.cube_dir, name), None
    state = Path(tempfile.mkdtemp(prefix="polar-cube-view-"))
    info = start_viewer(state, source, storage_options=options, port=0)
    try:
        out = save_viewer_screenshot(
            info.server_url, info.dataset_id, args.variable, Path(args.out)
        )
    finally:
        stop_viewer(state)
        shutil.rmtree(state, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
