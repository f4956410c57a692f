"""`polar-cube sources start|stop|status`: the stand-in sources served in the background
(`polar_cube.servers.mirror_service`), for builds and deployments on a machine with no
internet."""

from __future__ import annotations

import argparse
from pathlib import Path

from polar_cube.servers.mirror_service import (
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    mirror_status,
    sources_folder,
    start_mirror,
    stop_mirror,
)


def make_spec_standins(spec_path: str, out_dir: Path, scale: str) -> list[Path]:
    """Stand-ins of every source of the spec at `spec_path` (errors name the file)."""
    from polar_cube.sources.standins import make_standins
    from polar_cube.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    try:
        return make_standins(out_dir, scale, spec)
    except SpecError as error:
        raise SpecError(f"{spec_path}: {error}") from None


def add_mirror_commands(sources: argparse._SubParsersAction) -> None:
    """`start`, `stop` and `status` under `polar-cube sources`."""
    start = sources.add_parser(
        "start",
        help="make the stand-ins (once) and serve them in the background on 127.0.0.1",
        description=(
            "Makes the stand-ins of every source of the spec into STATE_DIR/sources-SCALE (once) "
            "and serves them over HTTP in the background, like `s3 start`; idempotent. Its URL "
            "is what `build --source-mirror` and `deploy --demo` take."
        ),
    )
    start.add_argument("--spec", default="cube.geojson", help="cube spec (default ./cube.geojson)")
    start.add_argument("--scale", choices=["small", "full"], default="small")
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    _add_state_dir(start)
    start.set_defaults(func=cmd_sources_start)
    stop = sources.add_parser("stop", help="stop the background mirror (by its process id)")
    _add_state_dir(stop)
    stop.set_defaults(func=cmd_sources_stop)
    status = sources.add_parser("status", help="is it running? (exit code 1 if not)")
    _add_state_dir(status)
    status.set_defaults(func=cmd_sources_status)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"stand-ins, pid and log (default {DEFAULT_STATE_DIR})",
    )


def cmd_sources_start(args: argparse.Namespace) -> int:
    folder = sources_folder(args.state_dir, args.scale)
    if mirror_status(args.state_dir) is None and not (folder / ".complete").is_file():
        print(f"making {args.scale} stand-ins of {args.spec} in {folder} ...", flush=True)
        make_spec_standins(args.spec, folder, args.scale)
        (folder / ".complete").touch()
    info = start_mirror(args.state_dir, folder, port=args.port)
    print(f"serving {info.folder} at {info.url} (pid {info.pid}; log {info.log})")
    return 0


def cmd_sources_stop(args: argparse.Namespace) -> int:
    print("stopped the mirror" if stop_mirror(args.state_dir) else "no mirror was running")
    return 0


def cmd_sources_status(args: argparse.Namespace) -> int:
    info = mirror_status(args.state_dir)
    if info is None:
        print(f"no mirror is running for {args.state_dir}")
        return 1
    print(f"serving {info.folder} at {info.url} (pid {info.pid})")
    return 0
