"""What stopped or killed commands left behind: orphaned temporary Prefect servers, and state
files of `polar-cube s3|server|worker` whose process no longer runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from polar_cube.cli import lifecycle
from polar_cube.deployments import operate
from polar_cube.servers import processes, s3server


@dataclass(frozen=True)
class Finding:
    """One leftover: `description` says what and why, `fix` cleans it up."""

    description: str
    fixed: str  # the verb for the fix: "stopped", "removed"
    fix: Callable[[], None]


def find_leftovers(s3_state_dir: Path, prefect_state_dir: Path) -> list[Finding]:
    """Orphaned temporary servers and stale records of PREFECT_HOME, then stale state files in
    the given state folders of `polar-cube s3` and `polar-cube server|worker`."""
    findings = [
        Finding(server.describe(), "stopped" if server.running else "removed", server.clean_up)
        for server in lifecycle.temporary_servers()
        if not server.owner_running
    ]
    s3_state_dir = Path(s3_state_dir)
    s3_folder = s3_state_dir.resolve()  # as `polar-cube s3` names it in the server's arguments
    findings += _stale_state(
        s3_state_dir / "server.json",
        "S3 server",
        lambda state: s3server._is_our_server(state["pid"], s3_folder),
    )
    prefect_state_dir = Path(prefect_state_dir)
    findings += _stale_state(
        prefect_state_dir / "server.json",
        "Prefect server",
        lambda state: processes.is_our_process(state["pid"], operate._server_markers(state)),
    )
    for worker_file in sorted(prefect_state_dir.glob("worker-*.json")):
        pool = worker_file.stem.removeprefix("worker-")
        findings += _stale_state(
            worker_file,
            f"worker (pool {pool})",
            lambda state, pool=pool: processes.is_our_process(
                state["pid"], operate._worker_markers(pool)
            ),
        )
    return findings


def _stale_state(path: Path, what: str, running: Callable[[dict], bool]) -> list[Finding]:
    """A finding if `path` names a process that no longer runs (or a reused pid)."""
    state = processes.read_state(path)
    if state is None or running(state):
        return []

    def remove_if_still_stale() -> None:
        now = processes.read_state(path)
        if now is not None and not running(now):
            path.unlink(missing_ok=True)

    description = f"stale {what} state {path} (pid {state['pid']} no longer runs)"
    return [Finding(description, "removed", remove_if_still_stale)]
