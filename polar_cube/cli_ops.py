"""`polar-cube server|pool|deploy|worker|run`: scheduled cube builds on a Prefect server.

The server and the worker run in their own sessions (they outlive the command starting
them), bind 127.0.0.1, log into the state folder and are stopped by their own process ids.
Everything else talks to the server in PREFECT_API_URL; nothing secret is ever printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE_DIR = "data/prefect"
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
}
REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
_POLL_SECONDS = 0.5
_children: dict[int, subprocess.Popen] = {}  # processes this one started (to reap them)


class OpsError(RuntimeError):
    """The Prefect server, worker, pool, deployment or run could not be used as asked."""


# --- the command line ---------------------------------------------------------------------


def add_ops_commands(commands: argparse._SubParsersAction) -> None:
    """`server`, `pool`, `deploy`, `worker` and `run`: scheduled builds through a server."""
    _add_server_commands(commands)
    _add_pool_commands(commands)
    _add_deploy_command(commands)
    _add_worker_commands(commands)
    _add_run_command(commands)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"pid and log files (default {DEFAULT_STATE_DIR})",
    )


def _add_server_commands(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser("server", help="a local Prefect server (API + UI)")
    actions = server.add_subparsers(dest="server_command", required=True)
    start = actions.add_parser(
        "start",
        help="start it in the background on 127.0.0.1 (idempotent)",
        description=(
            "Starts `prefect server start` in its own session. Its database is SQLite in "
            "PREFECT_HOME (default ~/.prefect) unless PREFECT_API_DATABASE_CONNECTION_URL is "
            "set, e.g. postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect. The first start "
            "of a new database takes about 30 s (migrations)."
        ),
    )
    _add_state_dir(start)
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    start.add_argument("--timeout", type=float, default=180, metavar="S", help="wait this long")
    start.set_defaults(func=cmd_server_start)
    stop = actions.add_parser("stop", help="stop it (by its process id)")
    _add_state_dir(stop)
    stop.set_defaults(func=cmd_server_stop)
    status = actions.add_parser("status", help="is it running? (exit code 1 if not)")
    _add_state_dir(status)
    status.set_defaults(func=cmd_server_status)


def _add_pool_commands(commands: argparse._SubParsersAction) -> None:
    pool = commands.add_parser("pool", help="the work pool the deployment runs on")
    actions = pool.add_subparsers(dest="pool_command", required=True)
    create = actions.add_parser("create", help="create a `process` work pool (idempotent)")
    create.add_argument("--name", default=DEFAULT_POOL)
    create.set_defaults(func=cmd_pool_create)


def _add_deploy_command(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser(
        "deploy",
        help=f"deploy {FLOW_NAME} from this folder with a monthly schedule (UTC)",
        description=(
            f"Creates or updates the deployment {FLOW_NAME}/NAME of {ENTRYPOINT}, run from "
            f"{REPO_ROOT} by a process worker. Default parameters: "
            f"{json.dumps(DEFAULT_PARAMETERS)} (the spec's resolution)."
        ),
    )
    deploy.add_argument("--name", default=DEFAULT_DEPLOYMENT)
    deploy.add_argument("--pool", default=DEFAULT_POOL)
    deploy.add_argument("--cron", default=DEFAULT_CRON, help=f"UTC (default {DEFAULT_CRON!r})")
    deploy.add_argument("--paused", action="store_true", help="deploy with its schedule paused")
    _add_params(deploy, "a default parameter of the deployment")
    deploy.set_defaults(func=cmd_deploy)


def _add_worker_commands(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="a process worker running the flow runs")
    actions = worker.add_subparsers(dest="worker_command", required=True)
    for name, help_text, func in (
        ("start", "start it in the background (idempotent)", cmd_worker_start),
        ("stop", "stop it (by its process id)", cmd_worker_stop),
        ("status", "is it running? (exit code 1 if not)", cmd_worker_status),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--pool", default=DEFAULT_POOL)
        _add_state_dir(action)
        action.set_defaults(func=func)


def _add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="trigger a run of a deployment now")
    run.add_argument("--deployment", default=f"{FLOW_NAME}/{DEFAULT_DEPLOYMENT}", metavar="F/D")
    _add_params(run, "a parameter of this run (overrides the deployment's)")
    run.add_argument("--watch", action="store_true", help="wait for its final state")
    run.add_argument(
        "--timeout", type=float, default=0, metavar="S", help="with --watch: give up after S s"
    )
    run.set_defaults(func=cmd_run)


def _add_params(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help=f"{what}; the value is JSON, else a plain string (repeatable)",
    )


def cmd_server_start(args: argparse.Namespace) -> int:
    state = start_server(Path(args.state_dir), port=args.port, timeout_seconds=args.timeout)
    print(f"Prefect server running at {state['url']} (pid {state['pid']})")
    print(f"  UI:       {state['url']}")
    print(f"  database: {database_description()}")
    print(f"  log:      {state['log']}")
    print(f"  next:     export PREFECT_API_URL={state['url']}/api")
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    if stop_server(Path(args.state_dir)):
        print(f"stopped the Prefect server of {args.state_dir}")
    else:
        print(f"no Prefect server was running for {args.state_dir}")
    return 0


def cmd_server_status(args: argparse.Namespace) -> int:
    state = server_status(Path(args.state_dir))
    if state is None:
        print(f"no Prefect server running for {args.state_dir}")
        return 1
    print(f"Prefect server running at {state['url']} (pid {state['pid']})")
    return 0


def cmd_pool_create(args: argparse.Namespace) -> int:
    created = create_pool(args.name)
    print(f"work pool {args.name!r} (process) {'created' if created else 'already exists'}")
    print(f"  next: polar-cube deploy --pool {args.name}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    deployment = deploy_build(
        name=args.name,
        pool=args.pool,
        cron=args.cron,
        paused=args.paused,
        parameters=parse_params(args.param),
    )
    full_name = f"{FLOW_NAME}/{args.name}"
    print(f"deployed {full_name} (id {deployment.id}) to work pool {args.pool!r}")
    print(f"  flow:       {ENTRYPOINT}, run in {REPO_ROOT}")
    print(f"  parameters: {json.dumps(deployment.parameters, sort_keys=True)}")
    for schedule in deployment.schedules:
        state = "active" if schedule.active else "paused"
        print(f"  schedule:   {args.cron} (UTC), {state}, id {schedule.id}")
        print(f"  pause:      prefect deployment schedule pause {full_name} {schedule.id}")
        print(f"  resume:     prefect deployment schedule resume {full_name} {schedule.id}")
    print(f"  run now:    polar-cube run --deployment {full_name} --watch")
    return 0


def cmd_worker_start(args: argparse.Namespace) -> int:
    state = start_worker(Path(args.state_dir), args.pool)
    print(f"worker {state['name']!r} polling work pool {args.pool!r} (pid {state['pid']})")
    print(f"  server: {state['api_url']}")
    print(f"  log:    {state['log']}")
    return 0


def cmd_worker_stop(args: argparse.Namespace) -> int:
    if stop_worker(Path(args.state_dir), args.pool):
        print(f"stopped the worker of pool {args.pool!r}")
    else:
        print(f"no worker was running for pool {args.pool!r} in {args.state_dir}")
    return 0


def cmd_worker_status(args: argparse.Namespace) -> int:
    state = worker_status(Path(args.state_dir), args.pool)
    if state is None:
        print(f"no worker running for pool {args.pool!r} in {args.state_dir}")
        return 1
    print(f"worker {state['name']!r} polling work pool {args.pool!r} (pid {state['pid']})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    flow_run = trigger_run(args.deployment, parse_params(args.param))
    print(f"flow run {flow_run.name!r} ({flow_run.id}) of {args.deployment} scheduled")
    print(f"  UI: {ui_url()}/runs/flow-run/{flow_run.id}")
    if not args.watch:
        return 0
    flow_run = watch_run(flow_run.id, timeout_seconds=args.timeout or None, report=print)
    state = flow_run.state
    print(f"flow run {flow_run.name!r} finished: {state.name}" + _message(state))
    return 0 if state.is_completed() else 1


def _message(state) -> str:
    return f" ({state.message})" if state.message else ""


# --- parameters ---------------------------------------------------------------------------


def parse_params(items: list[str]) -> dict:
    """`KEY=VALUE` pairs as a dict; each value is JSON if it parses, else the plain string."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OpsError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def _check_param_names(params: dict, known: set[str], what: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise OpsError(
            f"{what} has no parameter {', '.join(unknown)}; it has {', '.join(sorted(known))}"
        )


# --- the server ---------------------------------------------------------------------------


def start_server(state_dir: Path, *, port: int = DEFAULT_PORT, timeout_seconds: float = 180):
    """Start `prefect server start` (or return the one already running there); wait for it."""
    state_dir = Path(state_dir).resolve()
    running = server_status(state_dir, timeout_seconds)
    if running is not None:
        return running
    stop_server(state_dir)  # a stale or unresponsive one
    if not _port_is_free(port):
        raise OpsError(f"port {port} on {HOST} is in use by something else: choose another port")
    command = [_prefect(), "server", "start", "--host", HOST, "--port", str(port)]
    env = os.environ | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,  # the UI calls the API at these (not at --port)
        "PREFECT_SERVER_API_PORT": str(port),
    }
    state = _launch(state_dir / "server", command, env)
    state |= {"port": port, "url": f"http://{HOST}:{port}"}
    _write_state(state_dir / "server.json", state)
    if not _wait_until(lambda: _healthy(state["url"]), state["pid"], timeout_seconds):
        _kill_failed(state_dir / "server.json", state, "the Prefect server", timeout_seconds)
    return state


def stop_server(state_dir: Path) -> bool:
    """Stop the server by its pid (SIGTERM to its group, then SIGKILL); True if it ran."""
    state_file = Path(state_dir).resolve() / "server.json"
    state = _read_state(state_file)
    return _stop(state_file, _server_markers(state or {}))


def server_status(state_dir: Path, timeout_seconds: float = 5) -> dict | None:
    """The running server's state (pid, url, log), or None unless it is ours and answers."""
    state = _read_state(Path(state_dir).resolve() / "server.json")
    if state is None or not _is_ours(state["pid"], _server_markers(state)):
        return None
    ready = _wait_until(lambda: _healthy(state["url"]), state["pid"], timeout_seconds)
    return state if ready else None


def _server_markers(state: dict) -> tuple[str, ...]:
    return ("server", "start", "--port", str(state.get("port", "")))


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
    import httpx

    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


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
    _write_state(_worker_file(state_dir, pool), state)

    def beating() -> bool:
        return _heartbeat_since(pool, name, started)

    if not _wait_until(beating, state["pid"], timeout_seconds):
        _kill_failed(_worker_file(state_dir, pool), state, f"the worker of {pool}", timeout_seconds)
    return state


def stop_worker(state_dir: Path, pool: str = DEFAULT_POOL) -> bool:
    """Stop the pool's worker by its pid (its group: flow runs it started go too)."""
    return _stop(_worker_file(Path(state_dir).resolve(), pool), ("worker", "start", pool))


def worker_status(state_dir: Path, pool: str = DEFAULT_POOL) -> dict | None:
    """The running worker's state (pid, name, log), or None."""
    state = _read_state(_worker_file(Path(state_dir).resolve(), pool))
    if state is None or not _is_ours(state["pid"], ("worker", "start", pool)):
        return None
    return state


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
        parameters=parameters,
        print_next_steps=False,
        ignore_warnings=True,
    )
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


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


def watch_run(flow_run_id, *, timeout_seconds: float | None = None, report=None):
    """Poll a flow run until it reaches a final state; returns the finished flow run."""
    from prefect.client.orchestration import get_client

    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    last = None
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
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


# --- background processes (by pid) --------------------------------------------------------


def _prefect() -> str:
    """The `prefect` executable next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "prefect"
    found = str(beside) if beside.is_file() else shutil.which("prefect")
    if not found:
        raise OpsError("no `prefect` executable found next to this Python or on PATH")
    return found


def _launch(stem: Path, command: list[str], env: dict) -> dict:
    """Spawn `command` in its own session, output appended to `<stem>.log`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    log_path = stem.with_suffix(".log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=stem.parent,
            start_new_session=True,
        )
    _children[process.pid] = process
    return {"pid": process.pid, "log": str(log_path)}


def _stop(state_file: Path, markers: tuple[str, ...], timeout_seconds: float = 30) -> bool:
    """Stop the process of `state_file` by its pid; remove the file; True if it ran."""
    state = _read_state(state_file)
    if state is None:
        return False
    pid = state["pid"]
    running = _is_ours(pid, markers)
    if running:
        _signal_group(pid, signal.SIGTERM)
        if not _wait_for_exit(pid, timeout_seconds):
            _signal_group(pid, signal.SIGKILL)
            if not _wait_for_exit(pid, 10):
                raise OpsError(f"process {pid} did not exit after SIGKILL")
    state_file.unlink(missing_ok=True)
    return running


def _kill_failed(state_file: Path, state: dict, what: str, timeout_seconds: float) -> None:
    """A start that never became ready: kill it, forget it, raise with its log's tail."""
    exited = not _pid_alive(state["pid"])
    _signal_group(state["pid"], signal.SIGKILL)
    _wait_for_exit(state["pid"], 10)
    state_file.unlink(missing_ok=True)
    how = "exited early" if exited else f"was not ready within {timeout_seconds:g} s"
    raise OpsError(
        f"{what} (pid {state['pid']}) {how}; last lines of {state['log']}:\n"
        f"{_log_tail(Path(state['log']))}"
    )


def _wait_until(ready, pid: int, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while _pid_alive(pid):
        try:
            if ready():
                return True
        except Exception:  # the server not answering yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return False


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("pid"), int) else None


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, path)


def _command_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_ours(pid: int, markers: tuple[str, ...]) -> bool:
    """True if `pid` runs and is the prefect command we started (not a reused pid)."""
    if not _pid_alive(pid):
        return False
    if sys.platform != "linux":
        return True  # no /proc to check: trust the live pid
    command = " ".join(_command_of(pid))
    return "prefect" in command and all(marker in command for marker in markers)


def _pid_alive(pid: int) -> bool:
    """True if the process runs (our own children are reaped; others' zombies count as gone)."""
    process = _children.get(pid)
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return sys.platform != "linux"


def _signal_group(pid: int, signum: int) -> None:
    """Signal the process group it leads (its own session), else just the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_for_exit(pid: int, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
