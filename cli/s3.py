"""`polar-cube s3 …` (the local S3 server) and `polar-cube blocks …` (Prefect storage blocks).

Secrets are printed by one command only, `s3 credentials`, whose purpose that is; everything
else keeps them out of its output: `s3 start` says where the keys are, `s3 credentials
--profile` where it wrote them, `blocks create` shows the access key masked.
"""

from __future__ import annotations

import argparse
import os
import shlex
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
        "--profile NAME writes them as an AWS profile instead",
        description=(
            "Print the running local server's keys and endpoint as shell lines `export "
            "AWS_ACCESS_KEY_ID=…`, `export AWS_SECRET_ACCESS_KEY=…`, `export AWS_ENDPOINT_URL=…`, "
            'for `eval "$(polar-cube s3 credentials)"`; xarray, s3fs, boto3 and the AWS CLI '
            "then reach the bucket. Printing these secrets is the purpose of this command, and "
            "no other polar-cube command prints them: mind your terminal's scrollback and "
            "logs. With --profile NAME nothing secret is printed: the keys are written as AWS "
            "profile NAME (keys in AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials; "
            "endpoint and region in AWS_CONFIG_FILE, else ~/.aws/config; both owner-only, "
            "other profiles kept), for storage_options={'profile': NAME, ...}. A profile of "
            "that name that polar-cube did not write is left alone (error)."
        ),
    )
    _add_state_dir(credentials)
    credentials.add_argument(
        "--profile",
        metavar="NAME",
        help="write the keys as AWS profile NAME instead of printing them "
        "(`polar-cube demo` writes polar-cube-local)",
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
    from polar_cube.servers.s3server import S3ServerError, s3_server_status, write_aws_profile

    info = s3_server_status(Path(args.state_dir))
    if info is None:
        raise S3ServerError(
            f"no S3 server running for {args.state_dir}; "
            f"start it with `polar-cube s3 start --state-dir {args.state_dir}`"
        )
    if args.profile:
        files = write_aws_profile(info, args.profile)
        print(
            f"wrote AWS profile {args.profile!r} for {info.endpoint_url}: keys in "
            f"{files.credentials}, endpoint and region in {files.config} (owner-only)"
        )
        options = {"profile": args.profile, "client_kwargs": {"endpoint_url": info.endpoint_url}}
        print(f"  storage_options={options!r}")
        return 0
    if sys.stdout.isatty():
        print(
            f'# secrets: prefer eval "$(polar-cube s3 credentials --state-dir {args.state_dir})"',
            file=sys.stderr,
        )
    for name, value in (
        ("AWS_ACCESS_KEY_ID", info.access_key),
        ("AWS_SECRET_ACCESS_KEY", info.secret_key),
        ("AWS_ENDPOINT_URL", info.endpoint_url),
    ):
        print(f"export {name}={shlex.quote(value)}")
    return 0


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


def snippet_storage_options(bucket_block: str | None, local_server=None) -> tuple[dict, list[str]]:
    """The s3fs options the printed snippets carry (an endpoint and maybe a profile name, never
    a key), and lines telling the user where the keys come from.

    With `local_server` (the demo's) its keys are written as AWS profile polar-cube-local
    (if that profile is absent or ours) and the snippets name it. Otherwise they name that
    profile only if it already holds the bucket block's keys for its endpoint, else they rely on
    the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws).
    """
    from polar_cube.servers.s3server import aws_profile_for

    notes: list[str] = []
    profile = None
    if local_server is not None:
        endpoint = local_server.endpoint_url
        profile, note = _write_local_profile(local_server)
        notes.append(note)
    else:
        endpoint, access_key, problem = _block_endpoint_and_key(bucket_block)
        if problem:
            notes.append(problem)
        if endpoint and access_key:
            try:
                profile = aws_profile_for(endpoint, access_key)
            except (OSError, ValueError):  # an unreadable AWS file: do not name the profile
                profile = None
        if profile:
            notes.append(
                f"the snippets below use AWS profile {profile!r}: it holds the keys of block "
                f"{bucket_block!r} for {endpoint}"
            )
    if not profile:
        notes.append(_env_keys_note(endpoint, local_server))
    options: dict = {"profile": profile} if profile else {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options, notes


def _write_local_profile(server) -> tuple[str | None, str]:
    """Write AWS profile polar-cube-local for the demo's server: (its name or None, a note)."""
    from polar_cube.servers.s3server import LOCAL_PROFILE, AwsProfileError, write_aws_profile

    try:
        files = write_aws_profile(server, LOCAL_PROFILE)
    except (AwsProfileError, OSError) as error:
        return None, f"did not write AWS profile {LOCAL_PROFILE!r}: {error}"
    return LOCAL_PROFILE, (
        f"wrote AWS profile {LOCAL_PROFILE!r} for the local S3 server {server.endpoint_url} "
        f"(keys: {files.credentials}, endpoint: {files.config}; owner-only): the snippets "
        f"below use it, from any Python with xarray and s3fs (and xcube for the second)"
    )


def _env_keys_note(endpoint: str | None, local_server) -> str:
    note = (
        "the snippets below take the keys from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "or an AWS profile (AWS_PROFILE, ~/.aws)"
    )
    local = endpoint and endpoint.startswith(("http://127.0.0.1:", "http://localhost:"))
    if not local:
        return note
    state_dir = Path(local_server.state_dir) if local_server is not None else None
    option = ""
    if state_dir is not None and state_dir != Path(DEFAULT_STATE_DIR).resolve():
        option = f" --state-dir {shlex.quote(str(state_dir))}"
    return f'{note}; for the local S3 server: eval "$(polar-cube s3 credentials{option})"'


def _block_endpoint_and_key(
    bucket_block: str | None,
) -> tuple[str | None, str | None, str | None]:
    """The endpoint and access key of an S3Bucket block, and what went wrong reading it."""
    from polar_cube.tasks.blocks import load_bucket, storage_options_from_blocks

    if not bucket_block:
        return None, None, None
    try:
        options = storage_options_from_blocks(load_bucket(bucket_block))
    except Exception as error:  # the cube is built: do not fail over the snippets' endpoint
        problem = f"could not read block {bucket_block!r} ({type(error).__name__}): add its "
        problem += 'endpoint to the snippets, storage_options["client_kwargs"]["endpoint_url"]'
        return None, None, problem
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url")
    return endpoint, options.get("key"), None
