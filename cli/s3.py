"""`polar-cube s3 …` (the local S3 server) and `polar-cube blocks …` (Prefect storage blocks).

Secrets are printed by one command only, `s3 credentials`, whose purpose that is; everything
else keeps them out of its output: `s3 start` says where the keys are, `s3 credentials
--profile` where it wrote them, `blocks create` shows the access key masked. Nothing is written
outside the state folder unless asked: an AWS profile only with `--profile`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

DEFAULT_STATE_DIR = "data/s3"
DEFAULT_BUCKET = "polar-cube"
DEFAULT_BUCKET_BLOCK = "polar-cube-bucket"
DEFAULT_CREDENTIALS_BLOCK = "polar-cube-credentials"
DEFAULT_REGION = "us-east-1"


def add_s3_commands(commands: argparse._SubParsersAction) -> None:
    """`s3 start|stop|status`: a local S3-compatible server (SeaweedFS) for the cubes."""
    s3 = commands.add_parser("s3", help="a local S3-compatible server (SeaweedFS)")
    actions = s3.add_subparsers(dest="s3_command", required=True)

    start = actions.add_parser("start", help="start it in the background (idempotent)")
    _add_state_dir(start)
    start.add_argument("--port", type=int, default=8333, help="S3 port (the next 7 are used too)")
    start.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (if missing)")
    start.set_defaults(func=cmd_s3_start)

    stop = actions.add_parser("stop", help="stop it (by its process id)")
    _add_state_dir(stop)
    stop.set_defaults(func=cmd_s3_stop)

    status = actions.add_parser("status", help="is it running? (exit code 1 if not)")
    _add_state_dir(status)
    status.set_defaults(func=cmd_s3_status)

    credentials = actions.add_parser(
        "credentials",
        help="print its keys as shell exports: this command prints SECRETS (its purpose); "
        "--gdal adds GDAL's settings; --profile NAME writes them as an AWS profile instead",
        description=(
            "Print the running local server's keys and endpoint as shell lines `export "
            "AWS_ACCESS_KEY_ID=…`, `export AWS_SECRET_ACCESS_KEY=…`, `export AWS_ENDPOINT_URL=…`, "
            'for `eval "$(polar-cube s3 credentials)"`; xarray, s3fs, boto3 and the AWS CLI '
            "then reach the bucket. With --gdal also AWS_S3_ENDPOINT=host:port, AWS_HTTPS=NO "
            "and AWS_VIRTUAL_HOSTING=FALSE, which GDAL reads instead (3.6 ignores "
            "AWS_ENDPOINT_URL), and a gdalinfo line per cube at the top of a bucket: "
            "gdalinfo 'ZARR:\"/vsis3/BUCKET/CUBE.zarr\"'. Printing these secrets is the "
            "purpose of this command, and no other polar-cube command prints them: mind your "
            "terminal's scrollback and logs. With --profile NAME nothing secret is printed: the "
            "keys are written as AWS profile NAME (keys in AWS_SHARED_CREDENTIALS_FILE, else "
            "~/.aws/credentials; endpoint and region in AWS_CONFIG_FILE, else ~/.aws/config; "
            "both owner-only, other profiles kept), for storage_options={'profile': NAME, ...}. "
            "A profile of that name that polar-cube did not write is left alone (error). No "
            "other command writes under ~/.aws (`polar-cube demo` only with --aws-profile)."
        ),
    )
    _add_state_dir(credentials)
    credentials.add_argument(
        "--gdal",
        action="store_true",
        help="also GDAL's settings (AWS_S3_ENDPOINT, AWS_HTTPS, AWS_VIRTUAL_HOSTING) and "
        "gdalinfo lines for the published cubes",
    )
    credentials.add_argument(
        "--profile",
        metavar="NAME",
        help="write the keys as AWS profile NAME (~/.aws) instead of printing them",
    )
    credentials.set_defaults(func=cmd_s3_credentials)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"its data, log, keys and pid (default {DEFAULT_STATE_DIR})",
    )


def cmd_s3_start(args: argparse.Namespace) -> int:
    from polar_cube.servers.s3server import start_s3_server

    state_dir = Path(args.state_dir)
    info = start_s3_server(state_dir, port=args.port, bucket=args.bucket)
    print(f"S3 server running at {info.endpoint_url} (pid {info.pid}), bucket {args.bucket}")
    print(f"  keys: {info.state_dir / 'server.json'} (owner-only)")
    print(f"  log:  {info.state_dir / 'weed.log'}")
    print(f"  next: polar-cube blocks create --from-s3-server {args.state_dir}")
    return 0


def cmd_s3_stop(args: argparse.Namespace) -> int:
    from polar_cube.servers.s3server import stop_s3_server

    if stop_s3_server(Path(args.state_dir)):
        print(f"stopped the S3 server of {args.state_dir}")
    else:
        print(f"no S3 server was running for {args.state_dir}")
    return 0


def cmd_s3_status(args: argparse.Namespace) -> int:
    from polar_cube.servers.s3server import s3_server_status

    info = s3_server_status(Path(args.state_dir))
    if info is None:
        print(f"no S3 server running for {args.state_dir}")
        return 1
    print(f"S3 server running at {info.endpoint_url} (pid {info.pid})")
    return 0


def cmd_s3_credentials(args: argparse.Namespace) -> int:
    from polar_cube.servers.s3server import (
        S3ServerError,
        client_environment,
        published_zarrs,
        s3_server_status,
    )

    info = s3_server_status(Path(args.state_dir))
    if info is None:
        raise S3ServerError(
            f"no S3 server running for {args.state_dir}; "
            f"start it with `polar-cube s3 start --state-dir {args.state_dir}`"
        )
    if args.profile:
        print(write_profile(info, args.profile))
        options = {"profile": args.profile, "client_kwargs": {"endpoint_url": info.endpoint_url}}
        print(f"  storage_options={options!r}")
        return 0
    if sys.stdout.isatty():
        print(
            f'# secrets: prefer eval "$(polar-cube s3 credentials --state-dir {args.state_dir})"',
            file=sys.stderr,
        )
    for name, value in client_environment(info, gdal=args.gdal).items():
        print(f"export {name}={shlex.quote(value)}")
    if args.gdal:
        zarrs = published_zarrs(info) or ["BUCKET/CUBE.zarr"]
        for zarr in zarrs:
            print(f"# gdalinfo {gdal_path(f's3://{zarr}')}")
    return 0


def write_profile(info, name: str) -> str:
    """Write AWS profile `name` for the local server (asked for: `--profile`, `demo
    --aws-profile`); the line saying where, no secret in it."""
    from polar_cube.servers.s3server import write_aws_profile

    files = write_aws_profile(info, name)
    return (
        f"wrote AWS profile {name!r} for {info.endpoint_url}: keys in {files.credentials}, "
        f"endpoint and region in {files.config} (owner-only)"
    )


def gdal_path(url: str) -> str:
    """The shell-quoted name under which GDAL opens the zarr at s3:// `url` (or a local path):
    `'ZARR:"/vsis3/bucket/name.zarr"'`."""
    path = "/vsis3/" + url.removeprefix("s3://") if url.startswith("s3://") else url
    return shlex.quote(f'ZARR:"{path.rstrip("/")}"')


def add_blocks_commands(commands: argparse._SubParsersAction) -> None:
    """`blocks create`: the AwsCredentials + S3Bucket blocks the flows write cubes with."""
    blocks = commands.add_parser("blocks", help="Prefect blocks for S3 storage")
    actions = blocks.add_subparsers(dest="blocks_command", required=True)

    create = actions.add_parser(
        "create",
        help="save (overwrite) an AwsCredentials block and an S3Bucket block using it",
        description=(
            "Each value comes from its option, else the environment (POLAR_CUBE_S3_BUCKET, "
            "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); "
            "with --from-s3-server the local server's endpoint and keys come before the "
            "environment's."
        ),
    )
    create.add_argument("--bucket-block", default=DEFAULT_BUCKET_BLOCK, metavar="NAME")
    create.add_argument("--credentials-block", default=DEFAULT_CREDENTIALS_BLOCK, metavar="NAME")
    create.add_argument("--bucket", metavar="NAME", help="bucket name")
    create.add_argument("--folder", default="", metavar="PREFIX", help="folder in the bucket")
    create.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS)")
    create.add_argument("--access-key", metavar="KEY")
    create.add_argument("--secret-key", metavar="SECRET", help="prefer AWS_SECRET_ACCESS_KEY")
    create.add_argument("--region", metavar="REGION", help=f"default {DEFAULT_REGION}")
    create.add_argument(
        "--from-s3-server",
        metavar="STATE_DIR",
        help=f"endpoint and keys of the local server (`polar-cube s3 start`), "
        f"bucket {DEFAULT_BUCKET} unless given",
    )
    create.add_argument(
        "--no-check",
        action="store_true",
        help="save without first checking that the keys can write to the bucket",
    )
    create.set_defaults(func=cmd_blocks_create)


def cmd_blocks_create(args: argparse.Namespace) -> int:
    from polar_cube.tasks.blocks import bucket_url, load_bucket, save_blocks

    values = block_values(args)
    if not args.no_check:
        check_block_values(values, args.folder or "")
    save_blocks(
        bucket_block=args.bucket_block,
        credentials_block=args.credentials_block,
        bucket_name=values["bucket"],
        endpoint_url=values["endpoint_url"],
        access_key=values["access_key"],
        secret_key=values["secret_key"],
        region_name=values["region"],
        bucket_folder=args.folder or "",
    )
    endpoint = values["endpoint_url"] or "AWS S3"
    print(
        f"saved AwsCredentials block {args.credentials_block!r} "
        f"(access key {_mask(values['access_key'])}, {endpoint}, {values['region']})"
    )
    url = bucket_url(load_bucket(args.bucket_block))
    print(f"saved S3Bucket block {args.bucket_block!r} -> {url}")
    return 0


def check_block_values(values: dict[str, str | None], folder: str) -> None:
    """Write and delete a probe object with these keys before anything is saved."""
    from polar_cube.storage import StorageAccessError, check_bucket_access

    client_kwargs = {"endpoint_url": values["endpoint_url"], "region_name": values["region"]}
    options = {
        "key": values["access_key"],
        "secret": values["secret_key"],
        "client_kwargs": {k: v for k, v in client_kwargs.items() if v},
    }
    url = "s3://" + "/".join(p.strip("/") for p in (values["bucket"], folder) if p.strip("/"))
    try:
        check_bucket_access(url, options)
    except StorageAccessError as error:
        raise StorageAccessError(
            f"{error}; no block was saved (--no-check saves them unchecked)"
        ) from None


def block_values(args: argparse.Namespace) -> dict[str, str | None]:
    """The blocks' values: each option, else the local server (if asked), else the environment.

    The local server's endpoint and keys go together, so with --from-s3-server they win over
    AWS_* variables meant for some other S3; the bucket still comes from the environment
    before falling back to the server's default bucket.
    """
    from polar_cube.storage import StorageAccessError

    server = _server_values(args.from_s3_server) if args.from_s3_server else {}
    env = os.environ
    values = {
        "bucket": args.bucket or env.get("POLAR_CUBE_S3_BUCKET") or server.get("bucket"),
        "endpoint_url": args.endpoint_url
        or server.get("endpoint_url")
        or env.get("AWS_ENDPOINT_URL"),
        "access_key": args.access_key or server.get("access_key") or env.get("AWS_ACCESS_KEY_ID"),
        "secret_key": args.secret_key
        or server.get("secret_key")
        or env.get("AWS_SECRET_ACCESS_KEY"),
        "region": args.region or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
    }
    wanted = {
        "bucket": "bucket (--bucket or POLAR_CUBE_S3_BUCKET)",
        "access_key": "access key (--access-key or AWS_ACCESS_KEY_ID)",
        "secret_key": "secret key (--secret-key or AWS_SECRET_ACCESS_KEY)",
    }
    missing = [what for name, what in wanted.items() if not values[name]]
    if missing:
        raise StorageAccessError(
            f"blocks create: missing {', '.join(missing)}; "
            "or use --from-s3-server DIR for the local server"
        )
    return values


def _server_values(state_dir: str) -> dict[str, str]:
    """Endpoint and keys of the local S3 server running for `state_dir`."""
    from polar_cube.servers.s3server import s3_server_status
    from polar_cube.storage import StorageAccessError

    info = s3_server_status(Path(state_dir))
    if info is None:
        raise StorageAccessError(
            f"no S3 server running for {state_dir}; "
            f"start it with `polar-cube s3 start --state-dir {state_dir}`"
        )
    return {
        "bucket": DEFAULT_BUCKET,
        "endpoint_url": info.endpoint_url,
        "access_key": info.access_key,
        "secret_key": info.secret_key,
    }


def _mask(key: str) -> str:
    """An access key shown like the AWS CLI does: only its last four characters."""
    return "*" * max(len(key) - 4, 4) + key[-4:]


def snippet_storage_options(
    bucket_block: str | None, local_server=None, profile: str | None = None
) -> tuple[dict, list[str]]:
    """The s3fs options the printed snippets carry (an endpoint and, if `profile` is given, that
    AWS profile's name; never a key), and lines telling the user where the keys come from.

    The endpoint is that of `local_server` (the demo's), else of the bucket block. Without a
    profile the keys come from the environment: for the local server the line names the one
    command to run first, `eval "$(polar-cube s3 credentials)"`.
    """
    notes: list[str] = []
    if local_server is not None:
        endpoint = local_server.endpoint_url
    else:
        endpoint, problem = _block_endpoint(bucket_block)
        if problem:
            notes.append(problem)
    command = credentials_command(endpoint, local_server)
    if profile:
        notes.append(f"the snippets below use AWS profile {profile!r}, written for it")
    elif command:
        notes.append(
            "the snippets below take the keys from the environment: in the shell that runs "
            f'Python, first eval "$({command})"'
        )
    else:
        notes.append(
            "the snippets below take the keys from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or an AWS profile (AWS_PROFILE, ~/.aws)"
        )
    options: dict = {"profile": profile} if profile else {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options, notes


def credentials_command(endpoint: str | None, local_server=None) -> str | None:
    """`polar-cube s3 credentials [--state-dir DIR]` for a local endpoint (the demo's server,
    else the default state folder's), as the user can run it from here; None for another S3."""
    if not (endpoint or "").startswith(("http://127.0.0.1:", "http://localhost:")):
        return None
    command = f"{polar_cube_command()} s3 credentials"
    if local_server is not None:
        state_dir = Path(local_server.state_dir)
        if state_dir != Path(DEFAULT_STATE_DIR).resolve():
            command += f" --state-dir {shlex.quote(str(state_dir))}"
    return command


def polar_cube_command() -> str:
    """How to call this `polar-cube` from the current folder: `polar-cube` if it is the one on
    PATH, else its path (`.venv/bin/polar-cube` from the repository root)."""
    script = Path(sys.executable).parent / "polar-cube"
    on_path = shutil.which("polar-cube")
    if not script.exists() or (on_path and Path(on_path).resolve() == script.resolve()):
        return "polar-cube"
    relative = os.path.relpath(script)
    return shlex.quote(str(script) if relative.startswith("..") else relative)


def _block_endpoint(bucket_block: str | None) -> tuple[str | None, str | None]:
    """The endpoint of an S3Bucket block, and what went wrong reading it."""
    from polar_cube.tasks.blocks import load_bucket, storage_options_from_blocks

    if not bucket_block:
        return None, None
    try:
        options = storage_options_from_blocks(load_bucket(bucket_block))
    except Exception as error:  # the cube is built: do not fail over the snippets' endpoint
        problem = f"could not read block {bucket_block!r} ({type(error).__name__}): add its "
        problem += 'endpoint to the snippets, storage_options["client_kwargs"]["endpoint_url"]'
        return None, problem
    return (options.get("client_kwargs") or {}).get("endpoint_url"), None
