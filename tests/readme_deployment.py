"""The README's "Scheduled builds on a worker" block, run as written in a fresh folder.

A pytest plugin (`tests/conftest.py` loads it) with one session fixture, `deployment_run`:
the block runs verbatim with `bash -euo pipefail` in a new folder that holds only links to
the checkout's `.venv`, `cube.geojson` and `patch.yaml` (and HOME is another new folder), so
every state folder the commands make is new. The block ends by stopping every server; the
fixture then starts the Prefect server and the S3 server again in the same folders, so tests
can look at the finished run in the API and the UI, and at the cube in the bucket.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from polar_cube.servers import processes
from polar_cube.servers.s3server import stop_s3_server
from tests.snippets import REPO, snippet

PREFECT_PORT, S3_PORT, MIRROR_PORT = 4200, 8333, 8400  # the block's defaults
TIMEOUT_SECONDS = 900


@dataclass
class DeploymentRun:
    folder: Path  # where the block ran (its state folders are under data/)
    env: dict  # the block's environment, PREFECT_API_URL included
    output: str  # what the block printed (stdout and stderr)
    flow_run_id: str  # the parent (build-cube) flow run
    api_url: str  # http://127.0.0.1:4200/api
    ui_url: str  # http://127.0.0.1:4200

    def polar_cube(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`.venv/bin/polar-cube ARGS` in that folder, with that environment."""
        return subprocess.run(
            [".venv/bin/polar-cube", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def s3_server(self):
        """The restarted S3 server's info (endpoint, keys)."""
        from polar_cube.servers.s3server import s3_server_status

        return s3_server_status(self.folder / "data" / "s3")


def _busy_ports(wait_seconds: float = 60) -> list[int]:
    """The block's ports still in use after waiting up to `wait_seconds` (servers that are
    stopping, e.g. an earlier session's, free theirs within seconds)."""
    ports = [PREFECT_PORT, MIRROR_PORT, *range(S3_PORT, S3_PORT + 8)]
    deadline = time.monotonic() + wait_seconds
    while True:
        busy = [p for p in ports if not processes.port_is_free(p)]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(1)


@pytest.fixture(scope="session")
def deployment_run(tmp_path_factory) -> Iterator[DeploymentRun]:
    busy = _busy_ports()
    if busy:
        pytest.fail(f"the README block needs ports {busy} on 127.0.0.1, which are in use")
    folder = tmp_path_factory.mktemp("readme-scheduled-builds")
    for name in (".venv", "cube.geojson", "patch.yaml"):
        (folder / name).symlink_to(REPO / name)
    (folder / "home").mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "AWS_", "MPLCONFIGDIR"))
    }
    env |= {"HOME": str(folder / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    block = snippet("README.md", "scheduled-builds")
    run = DeploymentRun(folder, env, "", "", f"http://127.0.0.1:{PREFECT_PORT}/api", "")
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
        log = folder / "data" / "prefect" / "worker-polar-cube.log"
        worker_log = log.read_text(errors="replace")[-6000:] if log.exists() else "(none)"
        assert done.returncode == 0, f"{done.stdout[-8000:]}\n--- worker log:\n{worker_log}"
        found = re.search(r"flow run '[^']*' \(([0-9a-f-]{36})\) of build-cube/demo", done.stdout)
        assert found, done.stdout[-3000:]
        run.output, run.flow_run_id = done.stdout, found.group(1)
        run.env = env | {"PREFECT_API_URL": run.api_url}
        run.ui_url = run.api_url.removesuffix("/api")
        for again in (["server", "start"], ["s3", "start"]):
            started = run.polar_cube(*again)
            assert started.returncode == 0, started.stdout + started.stderr
        yield run
    finally:
        for stop in (["worker", "stop"], ["sources", "stop"], ["server", "stop"]):
            subprocess.run(
                [".venv/bin/polar-cube", *stop], cwd=folder, env=env, capture_output=True
            )
        # as `polar-cube s3 stop` (the block's last command ran it), but SIGKILL after 2 s:
        # SeaweedFS's filer waits 15 s for the gateway's metadata stream on SIGTERM, and this
        # runs at the very end of the session
        stop_s3_server(folder / "data" / "s3", timeout_seconds=2)
        shutil.rmtree(folder / "data" / "demo", ignore_errors=True)  # the download cache
