"""`polar-cube server|pool|deploy|worker|run`: the command line of `polar_cube.deployments.operate`;
`polar-cube doctor`: what stopped or killed commands left behind.

Scheduled cube builds on a Prefect server; nothing secret is ever printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polar_cube.deployments.operate import (
    DEFAULT_CRON,
    DEFAULT_DEPLOYMENT,
    DEFAULT_PARAMETERS,
    DEFAULT_POOL,
    DEFAULT_PORT,
    DEMO_DEPLOYMENT,
    DEMO_RESOLUTION,
    ENTRYPOINT,
    FLOW_NAME,
    REPO_ROOT,
    OpsError,
    create_pool,
    database_description,
    demo_parameters,
    deploy_build,
    server_status,
    start_server,
    start_worker,
    stop_server,
    stop_worker,
    trigger_run,
    ui_url,
    watch_run,
    worker_status,
)

DEFAULT_STATE_DIR = "data/prefect"
DEFAULT_S3_STATE_DIR = "data/s3"
DEFAULT_MIRROR_STATE_DIR = "data/mirror"
DEFAULT_DEMO_WORKDIR = "data/demo"


def add_ops_commands(commands: argparse._SubParsersAction) -> None:
    """`server`, `pool`, `deploy`, `worker` and `run`: scheduled builds through a server."""
    _add_server_commands(commands)
    _add_pool_commands(commands)
    _add_deploy_command(commands)
    _add_worker_commands(commands)
    _add_run_command(commands)
    _add_doctor_command(commands)


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
            "PREFECT_HOME (polar-cube's default: ./data/prefect/home) unless "
            "PREFECT_API_DATABASE_CONNECTION_URL is "
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
    deploy.add_argument(
        "--name", help=f"default {DEFAULT_DEPLOYMENT!r}, with --demo {DEMO_DEPLOYMENT!r}"
    )
    deploy.add_argument(
        "--demo",
        action="store_true",
        help=(
            "a deployment that runs with no internet: sources from the stand-in mirror "
            "(`polar-cube sources start`), cache and per-dataset cubes in --workdir, at "
            "--resolution"
        ),
    )
    deploy.add_argument(
        "--resolution",
        type=float,
        metavar="M",
        help=f"metres (default: the spec's; with --demo {DEMO_RESOLUTION:g})",
    )
    deploy.add_argument(
        "--mirror-state-dir",
        default=DEFAULT_MIRROR_STATE_DIR,
        metavar="DIR",
        help=f"with --demo: of `polar-cube sources start` (default {DEFAULT_MIRROR_STATE_DIR})",
    )
    deploy.add_argument(
        "--workdir",
        default=DEFAULT_DEMO_WORKDIR,
        metavar="DIR",
        help=f"with --demo: download cache and per-dataset cubes (default {DEFAULT_DEMO_WORKDIR})",
    )
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
    run.add_argument(
        "--watch",
        action="store_true",
        help="wait for its final state, printing its progress and finished task runs",
    )
    run.add_argument(
        "--timeout", type=float, default=0, metavar="S", help="with --watch: give up after S s"
    )
    run.set_defaults(func=cmd_run)


def _add_doctor_command(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="find and clean up what stopped or killed commands left behind",
        description=(
            "Reports, one line each, temporary Prefect servers whose polar-cube process is gone "
            "(recorded in PREFECT_HOME) and state files of `polar-cube s3|server|worker` whose "
            "process no longer runs; stops or removes them unless --check is given."
        ),
    )
    doctor.add_argument(
        "--check", action="store_true", help="only report; exit code 1 if anything was found"
    )
    doctor.add_argument(
        "--s3-state-dir",
        default=DEFAULT_S3_STATE_DIR,
        metavar="DIR",
        help=f"of `polar-cube s3` (default {DEFAULT_S3_STATE_DIR})",
    )
    doctor.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"of `polar-cube server|worker` (default {DEFAULT_STATE_DIR})",
    )
    doctor.set_defaults(func=cmd_doctor)


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
    name = args.name or (DEMO_DEPLOYMENT if args.demo else DEFAULT_DEPLOYMENT)
    parameters = {}
    if args.demo:
        resolution = args.resolution or DEMO_RESOLUTION
        parameters = demo_parameters(Path(args.mirror_state_dir), Path(args.workdir), resolution)
    elif args.resolution:
        parameters = {"resolution": args.resolution}
    deployment = deploy_build(
        name=name,
        pool=args.pool,
        cron=args.cron,
        paused=args.paused,
        parameters=parameters | parse_params(args.param),
    )
    full_name = f"{FLOW_NAME}/{name}"
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
    print("  (progress, finished task runs and state changes as they happen)")
    flow_run = watch_run(flow_run.id, timeout_seconds=args.timeout or None, report=print)
    state = flow_run.state
    print(f"flow run {flow_run.name!r} finished: {state.name}" + _message(state))
    print(f"  summary: the Artifacts tab of {ui_url()}/runs/flow-run/{flow_run.id}")
    return 0 if state.is_completed() else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from polar_cube.cli.doctor import find_leftovers

    findings = find_leftovers(Path(args.s3_state_dir), Path(args.state_dir))
    for finding in findings:
        if args.check:
            print(finding.description)
        else:
            finding.fix()
            print(f"{finding.fixed} {finding.description}")
    if not findings:
        print("nothing left behind: no orphaned temporary Prefect server, no stale state file")
    return 1 if args.check and findings else 0


def _message(state) -> str:
    return f" ({state.message})" if state.message else ""


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
