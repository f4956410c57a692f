"""Test set-up: a private Prefect home and a quiet, patient ephemeral Prefect API."""

import os
import sys
import tempfile

# Must be set before prefect is imported anywhere.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="polar-cube-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The demo writes an AWS profile for its local S3 server: never into the real ~/.aws.
_aws = tempfile.mkdtemp(prefix="polar-cube-aws-")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(_aws, "credentials")
os.environ["AWS_CONFIG_FILE"] = os.path.join(_aws, "config")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the README's scheduled-builds block, run once per session (fixture `deployment_run`); the
# order in which `--dist loadfile` hands the modules to the workers (longest first)
pytest_plugins = ["tests.readme_deployment", "tests.schedule"]


def layer_count(spec) -> int:
    """The cube's 2-D layers (so its quicklooks and statistics rows): one per static
    variable, one per time step of each time-stepped variable."""
    return sum(len(variable.files_by_time) for variable in spec.variables)


@pytest.fixture(scope="session")
def repo_spec_path() -> Path:
    return REPO / "cube.geojson"


@pytest.fixture(scope="session")
def small_standins(tmp_path_factory) -> Path:
    """The `small` stand-in sources, made once per test session."""
    from polar_cube.sources.standins import make_standins

    folder = tmp_path_factory.mktemp("standins-small")
    make_standins(folder, "small")
    return folder


@pytest.fixture(scope="session", autouse=True)
def _ephemeral_prefect_ports_clear_of_the_readmes():
    """Prefect's temporary API server picks a random port in 8000-8999, where the README's
    servers have fixed ones (S3 8333-8340, sources 8400, viewer 8080): a worker's server
    there for the whole session failed another worker's README blocks. Keep it above them.
    (Importing the module costs a few seconds once per worker; nearly every worker starts
    the server anyway.)"""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer._port_range = range(8500, 9000)


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_prefect_server():
    """Stop Prefect's temporary API server while pytest's output streams are still open."""
    yield
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:  # never imported: no server was started (and importing costs ~4 s)
        return
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()


def free_port_block(size: int = 12) -> int:
    """A port P such that P .. P+size-1 are all free on 127.0.0.1 (for SeaweedFS)."""
    from polar_cube.servers.processes import free_port_block as free_ports

    return free_ports(size)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 with a bucket, stopped by pid at the end."""
    from polar_cube.servers.s3server import running_s3_server

    state = tmp_path_factory.mktemp("seaweedfs")
    with running_s3_server(
        state, port=free_port_block(), bucket="polar-test", stop_timeout_seconds=2
    ) as info:
        yield info
