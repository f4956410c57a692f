"""`polar-cube view [start|stop|status]`: the published cube in xcube's web viewer.

Thin: picks the cube (a bucket block or a local folder, the spec's data id) and calls
`polar_cube.servers.viewer`. Nothing secret is printed: the S3 keys go to the server's environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polar_cube.servers.viewer import (
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
)
from polar_cube.servers.viewer_config import (
    CubeSource,
    split_credentials,
)

DEFAULT_CUBE_DIR = "data/cube"


def add_view_command(commands: argparse._SubParsersAction) -> None:
    """`view [start|stop|status]`: serve the cube with xcube's server and viewer."""
    view = commands.add_parser(
        "view",
        help="show the published cube in xcube's web viewer (xcube serve, in the background)",
        description=(
            "start (the default): serve the published cube's overview levels with `xcube "
            "serve` on 127.0.0.1 in the background and print the viewer's address "
            "(idempotent); stop: stop it by its process id; status: is it running? (exit "
            "code 1 if not). The cube is --bucket-block's bucket, else the folder --cube-dir "
            f"(default {DEFAULT_CUBE_DIR}), named by --cube-id (default: the version `latest` "
            "names for the spec's cube at --resolution, e.g. polar-1km-…-v1.1.0.zarr after the "
            "1 km demo)."
        ),
    )
    view.add_argument(
        "action",
        nargs="?",
        choices=["start", "stop", "status"],
        default="start",
        help="start (the default), stop or status",
    )
    where = view.add_mutually_exclusive_group()
    where.add_argument(
        "--bucket-block",
        metavar="NAME",
        help="prefect-aws S3Bucket block of the bucket the cube was published into",
    )
    where.add_argument(
        "--cube-dir",
        metavar="DIR",
        help=f"local folder the cube was published into (default {DEFAULT_CUBE_DIR})",
    )
    view.add_argument(
        "--cube-id",
        metavar="NAME",
        help="a version's cube there, <series>-vX.Y.Z.zarr (default: latest)",
    )
    view.add_argument("--spec", default="cube.geojson", help="cube spec (for the cube's name)")
    view.add_argument(
        "--resolution",
        type=float,
        metavar="M",
        help="the cube's resolution in metres, for its name (default: the spec's)",
    )
    view.add_argument(
        "--port", type=int, metavar="P", help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any)"
    )
    view.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"its configuration, log and pid (default {DEFAULT_STATE_DIR})",
    )
    view.add_argument(
        "--timeout", type=float, default=120, metavar="S", help="wait this long for it to answer"
    )
    view.set_defaults(func=cmd_view)


def cmd_view(args: argparse.Namespace) -> int:
    """A ViewError becomes the one `polar-cube: error:` line (`polar_cube.errors`)."""
    return {"start": _start, "stop": _stop, "status": _status}[args.action](args)


def _start(args: argparse.Namespace) -> int:
    from polar_cube.servers.viewer import start_viewer
    from polar_cube.servers.viewer_config import source_from_folder

    cube_name = args.cube_id or _latest_cube(args)
    if args.bucket_block:
        source, options = source_from_bucket_block(args.bucket_block, cube_name)
    else:
        source, options = source_from_folder(args.cube_dir or DEFAULT_CUBE_DIR, cube_name), None
    info = start_viewer(
        Path(args.state_dir),
        source,
        storage_options=options,
        port=args.port,
        timeout_seconds=args.timeout,
    )
    print(f"viewer running at {info.server_url} (pid {info.pid}), showing {info.cube_url}")
    print(f"  open: {info.viewer_url}")
    print(f"  log:  {info.log_path}")
    print(f"  stop: polar-cube view stop --state-dir {args.state_dir}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from polar_cube.servers.viewer import stop_viewer

    if stop_viewer(Path(args.state_dir)):
        print(f"stopped the viewer of {args.state_dir}")
    else:
        print(f"no viewer was running for {args.state_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from polar_cube.servers.viewer import viewer_status

    info = viewer_status(Path(args.state_dir))
    if info is None:
        print(f"no viewer running for {args.state_dir}")
        return 1
    print(f"viewer running at {info.server_url} (pid {info.pid}), showing {info.cube_url}")
    print(f"  open: {info.viewer_url}")
    return 0


def _latest_cube(args: argparse.Namespace) -> str:
    """The cube `latest` names in the target's catalog, for the spec's series at
    `--resolution` (`polar-1km-…` at 1000 m)."""
    from polar_cube.cube.versions import latest_cube
    from polar_cube.location import StoreLocation
    from polar_cube.spec import load_spec

    series = load_spec(args.spec).at_resolution(args.resolution).series
    if args.bucket_block:
        from polar_cube.tasks.blocks import bucket_location

        return latest_cube(bucket_location(args.bucket_block), series)
    return latest_cube(StoreLocation.local(args.cube_dir or DEFAULT_CUBE_DIR), series)


def source_from_bucket_block(bucket_block: str, cube_name: str) -> tuple[CubeSource, dict]:
    """A cube in the bucket of a prefect-aws S3Bucket block: (the source without secrets, the
    full s3fs options with the keys, for reading the metadata in this process)."""
    from polar_cube.tasks.blocks import bucket_url, load_bucket, storage_options_from_blocks

    bucket = load_bucket(bucket_block)
    options = storage_options_from_blocks(bucket)
    public, _ = split_credentials(options)
    return CubeSource(bucket_url(bucket), cube_name, public), options
