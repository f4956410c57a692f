"""Scheduled cube builds on a Prefect server: the server, a worker, a pool, deployment, runs.

The server and the worker run in their own sessions (they outlive the command starting
them), bind 127.0.0.1, log into the state folder and are stopped by their own process ids.
Everything else talks to the server in PREFECT_API_URL; nothing secret is ever printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.servers import processes

DEFAULT_PORT = 4200
DEFAULT_POOL = "polar-cube"
DEFAULT_DEPLOYMENT = "monthly"
DEFAULT_CRON = "0 3 1 * *"  # 03:00 UTC on the 1st of every month
FLOW_NAME = "build-cube"
ENTRYPOINT = "flows/build_cube.py:build_cube"
DEFAULT_PARAMETERS = {
    "spec_path": "cube.geojson",
    "patch_path": "patch.yaml",
    "bucket_block": "polar-cube-bucket",
    "deep_verify": True,  # unattended: every chunk read back against the manifest first
}
DEMO_DEPLOYMENT = "demo"
DEMO_RESOLUTION = 1000.0
REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = processes.LOCALHOST


class OpsError(PolarCubeError, RuntimeError):
    """The Prefect server, worker, pool, deployment or run could not be used as asked."""


# --- the server ---------------------------------------------------------------------------


def start_server(state_dir: Path, *, port: int = DEFAULT_PORT, timeout_seconds: float = 180):
    """Start `prefect server start` (or return the one already running there); wait for it."""
    state_dir = Path(state_dir).resolve()
    running = server_status(state_dir, timeout_seconds)
    if running is not None:
        return running
    stop_server(state_dir)  # a stale or unresponsive one
    if not processes.port_is_free(port, HOST):
        raise OpsError(f"port {port} on {HOST} is in use by something else: choose another port")
    command = [_prefect(), "server", "start", "--host", HOST, "--port", str(port)]
    env = os.environ | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,  # the UI calls the API at these (not at --port)
        "PREFECT_SERVER_API_PORT": str(port),
    }
    state = _launch(state_dir / "server", command, env)
    state |= {"port": port, "url": f"http://{HOST}:{port}"}
    processes.write_private_state(state_dir / "server.json", state)
    if not processes.wait_until(lambda: _healthy(state["url"]), state["pid"], timeout_seconds):
        _kill_failed(state_dir / "server.json", state, "the Prefect server", timeout_seconds)
    return state


def stop_server(state_dir: Path) -> bool:
    """Stop the server by its pid (SIGTERM to its group, then SIGKILL); True if it ran."""
    state_file = Path(state_dir).resolve() / "server.json"
    state = processes.read_state(state_file)
    return _stop(state_file, _server_markers(state or {}))


def server_status(state_dir: Path, timeout_seconds: float = 5) -> dict | None:
    """The running server's state (pid, url, log), or None unless it is ours and answers."""
    state = processes.read_state(Path(state_dir).resolve() / "server.json")
    if state is None or not processes.is_our_process(state["pid"], _server_markers(state)):
        return None
    ready = processes.wait_until(lambda: _healthy(state["url"]), state["pid"], timeout_seconds)
    return state if ready else None


def _server_markers(state: dict) -> tuple[str, ...]:
    return ("prefect", "server", "start", "--port", str(state.get("port", "")))


def database_description() -> str:
    """The server's database, without its connection URL (that may hold a password)."""
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.database.connection_url
    url = secret.get_secret_value() if secret else ""
    if url.startswith("sqlite"):
        return f"SQLite ({url.partition(':///')[2] or url})"
    if url:
        return f"{url.partition(':')[0]} (PREFECT_API_DATABASE_CONNECTION_URL)"
    return "SQLite in PREFECT_HOME"


def _healthy(url: str) -> bool:
    return processes.answers_ok(f"{url}/api/health")


# --- the worker ---------------------------------------------------------------------------


def start_worker(state_dir: Path, pool: str = DEFAULT_POOL, timeout_seconds: float = 90):
    """Start a process worker for `pool` (or return the running one); wait for its heartbeat."""
    state_dir = Path(state_dir).resolve()
    url = api_url()
    running = worker_status(state_dir, pool)
    if running is not None:
        return running
    stop_worker(state_dir, pool)
    _read_pool(pool)
    name = f"{pool}@{socket.gethostname()}"
    command = [_prefect(), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    started = time.time()
    state = _launch(state_dir / f"worker-{pool}", command, os.environ | {"PREFECT_API_URL": url})
    state |= {"name": name, "api_url": url}
    processes.write_private_state(_worker_file(state_dir, pool), state)

    def beating() -> bool:
        return _heartbeat_since(pool, name, started)

    if not processes.wait_until(beating, state["pid"], timeout_seconds):
        _kill_failed(_worker_file(state_dir, pool), state, f"the worker of {pool}", timeout_seconds)
    return state


def stop_worker(state_dir: Path, pool: str = DEFAULT_POOL) -> bool:
    """Stop the pool's worker by its pid (SIGTERM to its process group, then SIGKILL)."""
    return _stop(_worker_file(Path(state_dir).resolve(), pool), _worker_markers(pool))


def worker_status(state_dir: Path, pool: str = DEFAULT_POOL) -> dict | None:
    """The running worker's state (pid, name, log), or None."""
    state = processes.read_state(_worker_file(Path(state_dir).resolve(), pool))
    if state is None or not processes.is_our_process(state["pid"], _worker_markers(pool)):
        return None
    return state


def _worker_markers(pool: str) -> tuple[str, ...]:
    return ("prefect", "worker", "start", pool)


def _worker_file(state_dir: Path, pool: str) -> Path:
    return state_dir / f"worker-{pool}.json"


def _heartbeat_since(pool: str, name: str, started: float) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return any(
        w.name == name and w.last_heartbeat_time and w.last_heartbeat_time.timestamp() >= started
        for w in workers
    )


# --- pool, deployment, runs ---------------------------------------------------------------


def api_url() -> str:
    """PREFECT_API_URL, checked to answer; deployments need a real server."""
    from prefect.settings import PREFECT_API_URL

    url = (PREFECT_API_URL.value() or "").rstrip("/")
    if not url:
        raise OpsError(
            "PREFECT_API_URL is not set: deployments, workers and runs need a Prefect server, "
            "not the temporary in-process API; start one with `polar-cube server start` and "
            "export the PREFECT_API_URL it prints"
        )
    import httpx

    try:
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as error:
        raise OpsError(
            f"cannot reach the Prefect server at {url} ({type(error).__name__}); "
            "is it running? (`polar-cube server status`)"
        ) from None
    return url


def ui_url() -> str:
    return api_url().removesuffix("/api")


def create_pool(name: str = DEFAULT_POOL) -> bool:
    """Create a `process` work pool; False if it exists already (with that type)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    api_url()
    pool = WorkPoolCreate(
        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
    )
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(pool)
            return True
        except ObjectAlreadyExists:
            existing = client.read_work_pool(name)
    if existing.type != "process":
        raise OpsError(f"work pool {name!r} exists with type {existing.type!r}, not 'process'")
    return False


def _read_pool(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name)
        except ObjectNotFound:
            raise OpsError(
                f"no work pool {name!r}; create it with `polar-cube pool create --name {name}`"
            ) from None


def _check_param_names(params: dict, known: set[str], what: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise OpsError(
            f"{what} has no parameter {', '.join(unknown)}; it has {', '.join(sorted(known))}"
        )


def deploy_build(
    *,
    name: str = DEFAULT_DEPLOYMENT,
    pool: str = DEFAULT_POOL,
    cron: str = DEFAULT_CRON,
    paused: bool = False,
    parameters: dict | None = None,
):
    """Create or update `build-cube/<name>` from this folder; returns the deployment."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    api_url()
    if not (REPO_ROOT / ENTRYPOINT.partition(":")[0]).is_file():
        raise OpsError(f"no {ENTRYPOINT} in {REPO_ROOT}: deploy from a checkout of the project")
    flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    parameters = DEFAULT_PARAMETERS | (parameters or {})
    _check_param_names(parameters, set(flow.parameters.properties), f"flow {FLOW_NAME}")
    _read_pool(pool)
    try:
        schedule = Cron(cron, timezone="UTC", active=not paused)
    except ValueError as error:
        raise OpsError(f"--cron {cron!r}: {error}") from None
    deployment_id = flow.deploy(
        name=name,
        work_pool_name=pool,
        schedule=schedule,
        # a run that finds another one running is queued (besides the lock in the target)
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE"),
        parameters=parameters,
        print_next_steps=False,
        ignore_warnings=True,
    )
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


def demo_parameters(mirror_state_dir: Path, workdir: Path, resolution: float) -> dict:
    """The parameters of a deployment that runs with no internet: the sources from the
    running stand-in mirror of `mirror_state_dir` (`polar-cube sources start`), the download
    cache in `workdir`, at `resolution` metres."""
    from polar_cube.servers.mirror_service import mirror_status

    mirror = mirror_status(mirror_state_dir)
    if mirror is None:
        raise OpsError(
            f"no stand-in mirror runs for {mirror_state_dir}: start it with "
            "`polar-cube sources start` (a demo deployment reads its sources from it)"
        )
    workdir = Path(workdir).resolve()
    return {
        "source_mirror": mirror.url,
        "resolution": resolution,
        "cache_dir": str(workdir / "cache"),
    }


def trigger_run(deployment: str, parameters: dict | None = None):
    """Create a flow run of `flow/deployment` now; returns it (scheduled, not yet running)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    api_url()
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise OpsError(
                f"no deployment {deployment!r}; deploy it with `polar-cube deploy` "
                "(names are FLOW/DEPLOYMENT, e.g. build-cube/monthly)"
            ) from None
        parameters = parameters or {}
        known = set((found.parameter_openapi_schema or {}).get("properties", {}))
        _check_param_names(parameters, known, f"deployment {deployment}")
        return client.create_flow_run_from_deployment(found.id, parameters=parameters)


PROGRESS_KEY = "polar-cube-progress"  # the parent run's progress artifact (flows/artifacts.py)


def watch_run(flow_run_id, *, timeout_seconds: float | None = None, report=None):
    """Poll a flow run until it reaches a final state; returns the finished flow run.

    With `report` (called with one line at a time): the run's state changes, its progress
    (the percentage and phase of its progress artifact) whenever it moves, and each task run
    of it and its subflows as it finishes.
    """
    from prefect.client.orchestration import get_client

    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    last, seen = None, _Seen()
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if report:
                for line in seen.new_lines(client, flow_run_id):
                    report(line)
            if report and flow_run.state and flow_run.state.name != last:
                last = flow_run.state.name
                report(f"  state: {last}")
            if flow_run.state and flow_run.state.is_final():
                return flow_run
            if deadline is not None and time.monotonic() > deadline:
                raise OpsError(
                    f"flow run {flow_run_id} not finished after {timeout_seconds:g} s "
                    f"(still {last}); it keeps running"
                )
            time.sleep(2)


class _Seen:
    """What `watch_run` has printed: the last progress, the finished task runs."""

    def __init__(self) -> None:
        self.progress: str | None = None
        self.task_runs: set = set()

    def new_lines(self, client, flow_run_id) -> list[str]:
        """Lines for what changed since the last call (the API's hiccups skip a turn)."""
        try:
            task_runs, subflows = _finished_task_runs(client, flow_run_id)
            progress = _progress(client, flow_run_id)
        except Exception:  # a missed poll is harmless; the next one catches up
            return []
        lines = []
        for task_run in task_runs:
            if task_run.id not in self.task_runs:
                self.task_runs.add(task_run.id)
                lines.append(describe_task_run(task_run, subflows.get(task_run.id)))
        if progress is not None and progress != self.progress:
            self.progress = progress
            lines.append(f"  progress: {progress}")
        return lines


def _finished_task_runs(client, flow_run_id) -> tuple[list, dict]:
    """The run's and its subflows' task runs in a final state, oldest end first; and the
    names of the subflow runs by the id of the task run standing for each in its parent."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import TERMINAL_STATES

    subflows = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
        )
    )
    runs = [flow_run_id, *(run.id for run in subflows)]
    task_runs = client.read_task_runs(
        task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=runs),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(TERMINAL_STATES))),
        )
    )
    names = {run.parent_task_run_id: run.name for run in subflows if run.parent_task_run_id}
    return sorted(task_runs, key=lambda t: (t.end_time is None, t.end_time or t.created)), names


def _progress(client, flow_run_id) -> str | None:
    """The description of the run's progress artifact (`42 % · merge: …`), else its
    percentage; None if it has none yet."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[PROGRESS_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        ),
        limit=1,
    )
    if not artifacts:
        return None
    artifact = artifacts[0]
    return artifact.description or f"{float(artifact.data or 0):.0f} %"


def describe_task_run(task_run, subflow_name: str | None = None) -> str:
    """`  task run merge-…: Completed in 12.3 s`; for the task run standing for a subflow in
    its parent, `  subflow run <its name>: …`."""
    state = task_run.state.name if task_run.state else "?"
    took = ""
    if task_run.start_time and task_run.end_time:
        took = f" in {(task_run.end_time - task_run.start_time).total_seconds():.1f} s"
    what = f"subflow run {subflow_name}" if subflow_name else f"task run {task_run.name}"
    return f"  {what}: {state}{took}"


# --- background processes (by pid) --------------------------------------------------------


def _prefect() -> str:
    """The `prefect` executable next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "prefect"
    found = str(beside) if beside.is_file() else shutil.which("prefect")
    if not found:
        raise OpsError("no `prefect` executable found next to this Python or on PATH")
    return found


def _launch(stem: Path, command: list[str], env: dict) -> dict:
    """Spawn `command` in its own session, its output appended to `<stem>.log`."""
    log_path = stem.with_name(stem.name + ".log")
    pid = processes.launch_in_background(command, log_path, env=env, append=True)
    return {"pid": pid, "log": str(log_path)}


def _stop(state_file: Path, markers: tuple[str, ...], timeout_seconds: float = 30) -> bool:
    """Stop the process of `state_file` by its pid; remove the file; True if it ran."""
    state = processes.read_state(state_file)
    if state is None:
        return False
    running = processes.is_our_process(state["pid"], markers)
    if running and not processes.stop_process_group(state["pid"], timeout_seconds):
        raise OpsError(f"process {state['pid']} did not exit after SIGKILL")
    state_file.unlink(missing_ok=True)
    return running


def _kill_failed(state_file: Path, state: dict, what: str, timeout_seconds: float) -> None:
    """A start that never became ready: kill it, forget it, raise with its log's tail."""
    exited = not processes.pid_alive(state["pid"])
    processes.kill_process_group(state["pid"])
    state_file.unlink(missing_ok=True)
    how = "exited early" if exited else f"was not ready within {timeout_seconds:g} s"
    raise OpsError(
        f"{what} (pid {state['pid']}) {how}; last lines of {state['log']}:\n"
        f"{processes.log_tail(Path(state['log']))}"
    )
