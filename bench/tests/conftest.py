"""The benchmark's tests: a private Prefect home and a quiet ephemeral Prefect API."""

import os
import tempfile

# Must be set before prefect is imported anywhere.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="polar-cube-bench-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_prefect_server():
    """Stop Prefect's temporary API server while pytest's output streams are still open."""
    yield
    import sys

    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=30)  # or they retry against the stopped server at exit
    EventsWorker.drain_all(timeout=30)
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
