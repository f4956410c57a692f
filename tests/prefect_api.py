"""The test session's Prefect API for commands run as subprocesses.

A `polar-cube` command that needs Prefect and finds no PREFECT_API_URL starts a temporary
server of its own (~7 s on a migrated database, ~20 s on a new one). Tests whose subject is
not that server run their commands against the session's instead, as a user's commands run
against the server they started: one server for every command of the session.
"""

from __future__ import annotations

import os


def session_api_url() -> str:
    """The API URL of this session's temporary Prefect server (the one blocks and flow runs of
    the tests are saved in), started first if no test of this worker started it yet."""
    from prefect.client.orchestration import get_client
    from prefect.server.api.server import SubprocessASGIServer

    with get_client(sync_client=True) as client:  # starts the session's server if not yet
        error = client.api_healthcheck()
    assert error is None, error
    (server,) = SubprocessASGIServer._instances.values()
    return server.api_url


def session_api_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with PREFECT_API_URL set to the session's
    server."""
    return dict(os.environ if env is None else env) | {"PREFECT_API_URL": session_api_url()}
