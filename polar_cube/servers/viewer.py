"""The published cube in xcube's server and web viewer (`polar-cube view`): the process.

Three modules: `viewer_config` (pure: the xcube server configuration from the cube's
metadata), `viewer_branding` (the web viewer as polar-cube's, and its context map) and this
one, **the server** (`start_viewer`, `stop_viewer`, `viewer_status`): `xcube serve` in the
background on 127.0.0.1, like the local S3 server. One state folder (default
  `data/view/`) holds `config.json` (the xcube configuration), `viewer/` and `viewer-app/`
  (the web viewer's configuration and app: polar-cube's branding and context map, see
  `viewer_branding`), `xcube.log` and `server.json` (pid, port, URLs).

S3 keys never reach the configuration, the command line or the log: they are given to the
xcube process only in its environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`), which s3fs/botocore read; the configuration holds the endpoint only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from polar_cube.servers import processes
from polar_cube.servers.viewer_config import (
    CubeSource,
    ViewError,
    map_variables,
    open_cube_metadata,
    server_config,
    split_credentials,
    tile_url,
    time_steps,
    viewer_url,
    warm_up_tiles,
)

if TYPE_CHECKING:
    import xarray as xr

HOST = processes.LOCALHOST
DEFAULT_STATE_DIR = "data/view"
DEFAULT_PORT = 8080
STATE_FILE = "server.json"
CONFIG_FILE = "config.json"
LOG_FILE = "xcube.log"
VIEWER_DIR = "viewer"
VIEWER_APP_DIR = "viewer-app"
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# --- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewerInfo:
    """A running viewer: where it answers and what it shows."""

    server_url: str
    dataset_id: str
    cube_url: str
    pid: int
    port: int
    state_dir: Path

    @property
    def viewer_url(self) -> str:
        return viewer_url(self.server_url, self.dataset_id)

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_FILE


def xcube_binary() -> Path:
    """The `xcube` executable next to this Python, else on PATH."""
    found = processes.executable("xcube")
    if found is None:
        raise ViewError("no `xcube` executable found: install xcube-core")
    return found


def start_viewer(
    state_dir: str | Path,
    source: CubeSource,
    *,
    storage_options: dict | None = None,
    port: int | None = None,
    timeout_seconds: float = 120,
    check_dataset: bool = True,
) -> ViewerInfo:
    """Serve `source` with `xcube serve` in the background (or return the viewer already
    serving it from `state_dir`). `storage_options`: the full s3fs options of an S3 source
    (its keys reach the server's environment only). `port`: default 8080; 0 picks a free
    port; a running viewer is reused if it serves the same cube (on `port`, when given).

    With `check_dataset` (the default) it waits until the server describes the dataset (so
    wrong keys or a broken cube fail here, not in the browser) and then draws one tile per
    overview level, one after the other (see `warm_up`)."""
    state_dir = Path(state_dir).resolve()
    running = _running_state(state_dir)
    if running is not None:
        info = _info(running, state_dir)
        if running.get("cube_url") != source.cube_url or port not in (None, 0, info.port):
            raise ViewError(
                f"a viewer (pid {info.pid}) already serves {running.get('cube_url')} on port "
                f"{info.port} from {state_dir}; stop it first (polar-cube view stop)"
            )
        if not processes.wait_until(lambda: _answers(info), info.pid, timeout_seconds):
            raise ViewError(
                f"a viewer (pid {info.pid}) runs for {state_dir} but {info.server_url} does "
                f"not answer; stop it with `polar-cube view stop`"
            )
        return info
    options = storage_options if storage_options is not None else source.storage_options
    cube, num_levels = open_cube_metadata(source, options)
    port = DEFAULT_PORT if port is None else port or processes.free_port_block(1, HOST)
    if not processes.port_is_free(port, HOST):
        raise ViewError(f"port {port} on {HOST} is in use by something else: choose another")
    info = _launch(state_dir, source, cube, port, split_credentials(options or {})[1])
    started = time.monotonic()
    _wait_for_launch(info, timeout_seconds, check_dataset)
    if check_dataset:
        remaining = max(timeout_seconds - (time.monotonic() - started), 10)
        _fail_unless(info, warm_up(info, cube, num_levels, remaining))
    return info


def warm_up(info: ViewerInfo, cube: xr.Dataset, num_levels: int, timeout: float) -> str | None:
    """Draw one tile per overview level, one after the other; None, or what went wrong.

    pandas builds an index's lookup table on first use, and not thread-safely: when the
    viewer first asks for a dozen tiles of a level at once, xcube's threads select the time
    step on that level's fresh time index together and some tiles fail (HTTP 500,
    "Reindexing only valid with uniquely valued Index objects"). Done once per level here,
    first, the later concurrent look-ups find the table built."""
    import httpx

    variables = map_variables(cube)
    timed = [name for name in variables if "time" in cube[name].dims]
    variable = (timed or variables)[0]
    query = {"time": time_steps(cube)[0]} if timed else {}
    for tile in warm_up_tiles(cube, num_levels):
        url = tile_url(info.server_url, info.dataset_id, variable, tile, **query)
        try:
            response = httpx.get(url, timeout=timeout)
        except httpx.HTTPError as error:
            return f"{url}: {type(error).__name__}"
        if response.status_code != 200:
            return f"{url} answered {response.status_code}"
    return None


def stop_viewer(state_dir: str | Path, timeout_seconds: float = 30) -> bool:
    """Stop the viewer by its pid (SIGTERM, then SIGKILL); True if one was running."""
    state_dir = Path(state_dir).resolve()
    state = processes.read_state(state_dir / STATE_FILE)
    if state is None:
        return False
    running = _is_our_server(state["pid"], state_dir)
    if running and not processes.stop_process_group(state["pid"], timeout_seconds):
        raise ViewError(f"the viewer (pid {state['pid']}) did not exit after SIGKILL")
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return running


def viewer_status(state_dir: str | Path) -> ViewerInfo | None:
    """The running viewer, or None unless its pid is alive and its server answers."""
    state_dir = Path(state_dir).resolve()
    state = _running_state(state_dir)
    if state is None:
        return None
    info = _info(state, state_dir)
    return info if _answers(info) else None


def xcube_environment(credentials: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for xcube: without any inherited AWS keys when the source
    brings its own (the block's keys win), plus those keys."""
    env = dict(os.environ)
    if credentials:
        for name in _CREDENTIAL_ENV:
            env.pop(name, None)
        env.pop("AWS_PROFILE", None)
    env.update(credentials)
    return env


def _launch(
    state_dir: Path, source: CubeSource, cube: xr.Dataset, port: int, credentials: dict
) -> ViewerInfo:
    from polar_cube.servers import viewer_branding as branding

    server_url = f"http://{HOST}:{port}"
    viewer_dir = state_dir / VIEWER_DIR
    title = str(cube.attrs.get("title") or source.stem)
    context = branding.context_layer(cube, server_url, source.stem)
    app_config = branding.viewer_app_config(server_url, title, source.stem, context)
    branding.write_viewer_config(viewer_dir, app_config, branding.about_page(cube, source, context))
    app_dir = branding.write_viewer_app(state_dir / VIEWER_APP_DIR)
    config_path = state_dir / CONFIG_FILE
    processes.write_private_state(config_path, server_config(cube, source, viewer_dir=viewer_dir))
    command = [
        str(xcube_binary()),
        "serve",
        "--config",
        str(config_path),
        "--address",
        HOST,
        "--port",
        str(port),
        "-v",  # INFO: requests, datasets opened
    ]
    env = branding.viewer_environment(xcube_environment(credentials), app_dir)
    pid = processes.launch_in_background(command, state_dir / LOG_FILE, env=env)
    state = {
        "pid": pid,
        "port": port,
        "server_url": server_url,
        "dataset_id": source.stem,
        "cube_url": source.cube_url,
        "started": time.time(),
    }
    processes.write_private_state(state_dir / STATE_FILE, state)
    return _info(state, state_dir)


def _wait_for_launch(info: ViewerInfo, timeout_seconds: float, check_dataset: bool) -> None:
    """Wait until the server answers (and describes the dataset); else stop it and raise with
    its log's tail."""
    started = time.monotonic()
    if not processes.wait_until(lambda: _answers(info), info.pid, timeout_seconds):
        exited = not processes.pid_alive(info.pid)
        what = "exited early" if exited else f"did not answer within {timeout_seconds:g} s"
        _fail_unless(info, what, prefix="")
    if check_dataset:
        remaining = max(timeout_seconds - (time.monotonic() - started), 10)
        _fail_unless(info, _dataset_problem(info, remaining))


def _fail_unless(info: ViewerInfo, problem: str | None, prefix: str = "cannot show ") -> None:
    """Nothing if there is no problem; else stop the server and raise with its log's tail."""
    if problem is None:
        return
    what = f"{prefix}{info.cube_url}: {problem}" if prefix else problem
    processes.stop_process_group(info.pid, 10)
    (info.state_dir / STATE_FILE).unlink(missing_ok=True)
    raise ViewError(
        f"the viewer (xcube serve, {info.server_url}) {what}; last lines of {info.log_path}:\n"
        f"{processes.log_tail(info.log_path)}"
    )


def _answers(info: ViewerInfo) -> bool:
    return processes.answers_ok(f"{info.server_url}/")


def _dataset_problem(info: ViewerInfo, timeout_seconds: float) -> str | None:
    """None if the server describes the dataset, else what it said instead."""
    import httpx

    url = f"{info.server_url}/datasets/{quote(info.dataset_id)}"
    try:
        response = httpx.get(url, timeout=timeout_seconds)
    except httpx.HTTPError as error:
        return f"{url}: {type(error).__name__}"
    if response.status_code == 200:
        return None
    try:
        message = response.json().get("error", {}).get("message")
    except ValueError:
        message = None
    return f"{url} answered {response.status_code}" + (f": {message}" if message else "")


def _running_state(state_dir: Path) -> dict | None:
    state = processes.read_state(state_dir / STATE_FILE, ("port", "server_url", "dataset_id"))
    if state is None or not _is_our_server(state["pid"], state_dir):
        return None
    return state


def _info(state: dict, state_dir: Path) -> ViewerInfo:
    return ViewerInfo(
        server_url=state["server_url"],
        dataset_id=state["dataset_id"],
        cube_url=state.get("cube_url", ""),
        pid=int(state["pid"]),
        port=int(state["port"]),
        state_dir=state_dir,
    )


def _is_our_server(pid: int, state_dir: Path) -> bool:
    """True if `pid` is alive and is the xcube server of this state folder."""
    return processes.is_our_process(pid, ("xcube", "serve", str(state_dir / CONFIG_FILE)))
