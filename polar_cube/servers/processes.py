"""Background processes that outlive the command starting them, known by their process ids.

A process is launched in its own session (stdin from /dev/null, output into a log file),
recorded in a private JSON state file, recognised later by its command line (so a reused pid
is never mistaken for it) and stopped by signalling its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

LOCALHOST = "127.0.0.1"
_POLL_SECONDS = 0.25
_children: dict[int, subprocess.Popen] = {}  # processes this one started (to reap them)


def launch_in_background(
    command: list[str], log_path: Path, *, env: dict | None = None, append: bool = False
) -> int:
    """Start `command` in its own session, in the log's folder, output into `log_path`; its pid."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
        )
    _children[process.pid] = process
    return process.pid


def background_pids() -> set[int]:
    """The processes this one launched to outlive it (still running)."""
    return {pid for pid in list(_children) if pid_alive(pid)}


def pid_alive(pid: int) -> bool:
    """True if the process runs; our own children are reaped, others' zombies count as gone.

    A zombie leader whose other threads are still exiting (and holding its sockets) runs.
    """
    import psutil

    process = _children.get(pid)
    if process is not None:
        if process.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        found = psutil.Process(pid)
        return found.status() != psutil.STATUS_ZOMBIE or found.num_threads() > 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to inspect (AccessDenied): it exists
        return True


def is_our_process(pid: int, markers: Iterable[str]) -> bool:
    """True if `pid` runs a command with every marker as an argument or an argument's file name.

    This tells the process we started from an unrelated one that reuses its pid.
    """
    import psutil

    if not pid_alive(pid):
        return False
    try:
        arguments = set(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot read its command line: trust the live pid
    names = {Path(argument).name for argument in arguments}
    return bool(arguments) and all(m in arguments or m in names for m in markers)


def wait_until(ready: Callable[[], bool], pid: int, timeout_seconds: float) -> bool:
    """Poll `ready()` until it is true (True), the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout_seconds
    while pid_alive(pid):
        try:
            if ready():
                return True
        except Exception:  # not answering yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return False


def wait_for_exit(pid: int, timeout_seconds: float) -> bool:
    """True once the process has ended, False if it still runs after `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_process_group(pid: int, timeout_seconds: float = 30) -> bool:
    """SIGTERM to the process's group, then SIGKILL if it lingers; False if it survives both."""
    _signal_group(pid, signal.SIGTERM)
    _signal_group(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    return wait_for_exit(pid, timeout_seconds) or kill_process_group(pid)


def kill_process_group(pid: int, timeout_seconds: float = 10) -> bool:
    """SIGKILL to the process's group; True once it has ended."""
    _signal_group(pid, signal.SIGKILL)
    return wait_for_exit(pid, timeout_seconds)


def _signal_group(pid: int, signum: int) -> None:
    """Signal the process group it leads (its own session), else just the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def started_at(pid: int) -> float | None:
    """When the process started (seconds since the epoch), or None if it is gone.

    With the pid it names one process: a later process reusing the pid starts later.
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_same_process(pid: int, started: float | None) -> bool:
    """True if `pid` is alive and is the process that started at `started`."""
    now_started = started_at(pid)
    if now_started is None or not pid_alive(pid):
        return False
    return started is None or abs(now_started - started) < 1.0


def stop_children(keep: Iterable[int] = (), grace_seconds: float = 1.0) -> list[int]:
    """Stop every descendant of this process except `keep` and their descendants; their pids.

    SIGTERM, then SIGKILL to whatever still runs after `grace_seconds`. Up to three rounds,
    because a supervisor running in this process (a dask nanny) may replace a stopped child.
    """
    import psutil

    stopped: list[int] = []
    for _ in range(3):
        targets = _descendants_except(set(keep))
        if not targets:
            break
        stopped.extend(process.pid for process in targets)
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for process in targets:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signum)
            _, targets = psutil.wait_procs(targets, timeout=grace_seconds)
            if not targets:
                break
    return stopped


def _descendants_except(keep: set[int]) -> list:
    """This process's descendants (psutil), leaving out `keep` and their descendants."""
    import psutil

    kept = set(keep)
    for pid in keep:
        with contextlib.suppress(psutil.Error):
            kept.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    try:
        descendants = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [process for process in descendants if process.pid not in kept]


def executable(name: str) -> Path | None:
    """The executable `name` next to this Python (the venv's), else on PATH, else None."""
    import shutil

    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def answers_ok(url: str, timeout: float = 2) -> bool:
    """True if an HTTP GET of `url` answers 200 within `timeout` seconds."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True if nothing listens on `host:port` (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 1, host: str = LOCALHOST) -> int:
    """A port P such that P .. P+size-1 are all free on `host` (SeaweedFS needs a block)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + size <= 65536 and all(port_is_free(p, host) for p in range(base, base + size)):
            return base
    raise OSError(f"no block of {size} free ports on {host}")


def read_state(path: Path, keys: Iterable[str] = ()) -> dict | None:
    """The JSON object in `path` if it has an integer `pid` and all `keys`, else None."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    return state if all(key in state for key in keys) else None


def write_private_state(path: Path, content: dict) -> None:
    """Write JSON readable by the owner only (0600), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(partial, path)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, or "(no log)"."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
