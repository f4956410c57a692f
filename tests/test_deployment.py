"""Scheduled builds end to end with real processes: a Prefect server, a process work pool,
the build-cube deployment, a worker, a triggered run into a real S3 server (SeaweedFS)."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import xarray as xr

from polar_cube.deployments.operate import server_status, stop_server, stop_worker, worker_status
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block

pytestmark = pytest.mark.slow
BUCKET_BLOCK = "deploy-test-bucket"
FOLDER = "deployed"
POOL = "polar-cube"
DEPLOYMENT = "build-cube/monthly"
# The sub-commands through the same parser and error handling as `polar-cube`.
OPS = """
import argparse, sys
from polar_cube.cli.ops import add_ops_commands
from polar_cube.deployments.operate import OpsError
from polar_cube.errors import user_errors
parser = argparse.ArgumentParser(prog="polar-cube")
add_ops_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
try:
    sys.exit(args.func(args))
except (*user_errors(), OpsError) as error:
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
def client(server):
    """A Prefect client of that server (the test session's own Prefect is left alone)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def mirror(small_standins):
    with serving_mirror(small_standins) as url:
        yield url


def save_bucket_blocks(server, s3_server):
    """`polar-cube blocks create` on that server, keys from the environment (not argv)."""
    keys = {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    command = [sys.executable, "-m", "polar_cube.cli", "blocks", "create"]
    command += ["--bucket-block", BUCKET_BLOCK, "--credentials-block", "deploy-test-credentials"]
    command += ["--bucket", "polar-test", "--folder", FOLDER]
    result = subprocess.run(
        command, env=server.env | keys, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert s3_server.secret_key not in result.stdout + result.stderr


def deploy_parameters(tmp_path, mirror, repo_spec_path) -> list[str]:
    values = {
        "spec_path": str(repo_spec_path),
        "patch_path": str(REPO / "patch.yaml"),
        "resolution": 3000,
        "source_mirror": mirror,
        "cache_dir": str(tmp_path / "cache"),
        "datasets_dir": str(tmp_path / "datasets"),
        "bucket_block": BUCKET_BLOCK,
    }
    return [f"--param={key}={json.dumps(value)}" for key, value in values.items()]


@pytest.fixture(scope="module")
def finished_run(server, s3_server, mirror, repo_spec_path, tmp_path_factory):
    """pool create, blocks, deploy, worker start, run --watch: (flow run id, its output)."""
    work = tmp_path_factory.mktemp("deployed-build")
    for _ in range(2):  # idempotent
        pool = server.ops("pool", "create", "--name", POOL)
        assert pool.returncode == 0, pool.stderr
    assert "already exists" in pool.stdout
    save_bucket_blocks(server, s3_server)
    params = deploy_parameters(work, mirror, repo_spec_path)
    deployed = server.ops("deploy", "--pool", POOL, "--paused", *params)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"deployed {DEPLOYMENT}" in deployed.stdout
    worker = server.ops("worker", "start", "--pool", POOL, "--state-dir", str(server.state_dir))
    assert worker.returncode == 0, worker.stdout + worker.stderr
    run = server.ops("run", "--deployment", DEPLOYMENT, "--watch", "--timeout", "600", timeout=700)
    log = server.worker_log()
    assert run.returncode == 0, f"{run.stdout}{run.stderr}\n--- worker log:\n{log}"
    flow_run_id = re.search(r"\(([0-9a-f-]{36})\)", run.stdout).group(1)
    return flow_run_id, run.stdout, deployed.stdout


def test_run_completes_and_the_cube_is_in_the_bucket(finished_run, s3_server, repo_spec_path):
    _, output, _ = finished_run
    assert "finished: Completed" in output
    spec = load_spec(repo_spec_path)
    options = {
        "key": s3_server.access_key,
        "secret": s3_server.secret_key,
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"},
    }
    url = f"s3://polar-test/{FOLDER}/{spec.at_resolution(3000).data_id}"
    cube = xr.open_zarr(url, consolidated=True, storage_options=options)
    assert {v.name for v in spec.variables} <= set(cube.data_vars)
    assert cube.attrs["title"] == "Polar Data Cube v1.1.0"


def test_the_server_lists_the_runs_artifacts(finished_run, client):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = finished_run[0]
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=runs)}
    assert {"polar-cube-coverage", "polar-cube-summary"} <= set(artifacts)
    assert artifacts["polar-cube-coverage"].type == "table"
    assert str(artifacts["polar-cube-summary"].flow_run_id) == flow_run_id


def test_the_deployment_is_monthly_paused_and_runs_in_the_repo(finished_run, client):
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/build_cube.py:build_cube"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 1 * *" and schedule.schedule.timezone == "UTC"
    assert not schedule.active  # deployed --paused; the printed command resumes it
    deployed_output = finished_run[2]
    assert f"prefect deployment schedule resume {DEPLOYMENT} {schedule.id}" in deployed_output
    assert deployment.parameters["resolution"] == 3000
    assert deployment.global_concurrency_limit.limit == 1  # one build at a time; others queue
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    flow_run = client.read_flow_run(finished_run[0])
    assert flow_run.deployment_id == deployment.id and flow_run.state.is_completed()


def test_server_and_worker_run_in_their_own_sessions_and_start_is_idempotent(server):
    state = server_status(server.state_dir)
    worker = worker_status(server.state_dir, POOL)
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
