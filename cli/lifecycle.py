"""The life of a build process: a fast, clean stop on SIGTERM or Ctrl-C, and no temporary
Prefect server left behind, even after SIGKILL.

Without PREFECT_API_URL, Prefect runs flows against a temporary API server that it starts as
a subprocess (`SubprocessASGIServer`, uvicorn on a random port) and stops at exit; a killed
process never reaches that exit. Here each such launch is bound to this process: the server
is started with the kernel's parent-death signal (SIGTERM as soon as this process dies, however
it dies) and recorded under PREFECT_HOME, so that the next build or `polar-cube doctor` stops
it should it outlive its owner anyway.

SIGTERM and SIGINT stop a build at once: one line on stderr, every child process stopped
(the temporary server, dask workers; not `polar-cube s3`'s server, which is meant to outlive
the demo), exit code 128 + the signal number. Written work is safe by design (atomic writes,
reruns resume); the Prefect run is not finalised and stays "Running" in the database.
"""

from __future__ import annotations

import _posixsubprocess
import atexit
import contextlib
import ctypes
import functools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from polar_cube.servers import processes

BUILD_COMMANDS = frozenset({"build", "demo"})  # stopped at once by SIGTERM / Ctrl-C
PREFECT_COMMANDS = BUILD_COMMANDS | {"blocks"}  # may start a temporary Prefect server
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_SECONDS = 1.0  # between SIGTERM and SIGKILL to our children when stopping
REAP_TIMEOUT_SECONDS = 10.0  # for an orphaned server to exit after SIGTERM
RECORDS_FOLDER = Path("polar-cube") / "temporary-servers"  # under PREFECT_HOME
_PR_SET_PDEATHSIG = 1

_stopping = threading.Lock()
_own_records: list[Path] = []
_own_servers: list[subprocess.Popen] = []


@contextmanager
def command_lifecycle(command: str) -> Iterator[None]:
    """Run `polar-cube <command>` inside this: builds stop cleanly on SIGTERM and Ctrl-C, and
    any temporary Prefect server is bound to this process (orphans of earlier ones reaped)."""
    with stop_on_signals() if command in BUILD_COMMANDS else contextlib.nullcontext():
        if command in PREFECT_COMMANDS:
            for line in bind_temporary_prefect_servers():
                print(f"polar-cube: {line}", file=sys.stderr, flush=True)
        yield


# --- stopping on SIGTERM / Ctrl-C ---------------------------------------------------------


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT call `stop_now` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    watcher = _SignalWatcher()
    restore_prefect = _keep_sigterm_from_prefect()
    try:
        yield
    finally:
        restore_prefect()
        watcher.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_now(signum: int) -> NoReturn:
    """One line on stderr, our child processes stopped, exit with 128 + `signum`.

    Only the first caller does it; any other thread calling it waits for the exit.
    """
    if not _stopping.acquire(blocking=False):
        while True:
            time.sleep(60)
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    stderr = os.dup(2)
    try:
        _silence_output()  # what the threads still running say about their dying peers
        _hold_new_processes()
        _kill_own_servers()
        processes.stop_children(keep=processes.background_pids(), grace_seconds=STOP_GRACE_SECONDS)
        _forget_own_records()
    finally:
        # Last, once the children that share our stderr are gone: the line ends the output.
        # os.write, not print: the interrupted thread may hold the stream's lock.
        line = f"polar-cube: stopped by {what}; rerun the same command to resume\n"
        os.write(stderr, line.encode())
        os._exit(128 + signum)


def _on_stop_signal(signum: int, frame) -> None:
    stop_now(signum)


def _silence_output() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _kill_own_servers() -> None:
    """SIGKILL the temporary Prefect servers this process started: on SIGTERM a server busy
    with our run prints tracebacks into the stderr we share, and it has nothing to save."""
    for server in _own_servers:
        if server.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(server.pid, signal.SIGKILL)


def _hold_new_processes() -> None:
    """From now on, a thread of this process that starts a process waits for the exit instead.

    Else a supervisor still running here (a dask nanny) replaces each worker we stop.
    """

    def hold(*args, **kwargs) -> NoReturn:
        while True:
            time.sleep(60)

    os.register_at_fork(before=hold)  # os.fork
    subprocess._fork_exec = hold  # subprocess.Popen
    _posixsubprocess.fork_exec = hold  # multiprocessing's spawn
    os.posix_spawn = os.posix_spawnp = hold


class _SignalWatcher:
    """A thread woken through the signal wakeup fd, so a stop does not wait for the main thread
    to leave C code (GDAL, numpy), where Python signal handlers cannot run."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="polar-cube-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                received = self._reader.recv(64)
            except OSError:
                return
            if not received:
                return
            for signum in received:  # one byte per signal number
                if signum in STOP_SIGNALS:
                    stop_now(signum)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        with contextlib.suppress(OSError):
            self._reader.shutdown(socket.SHUT_RDWR)
        self._reader.close()
        self._writer.close()


def _keep_sigterm_from_prefect() -> Callable[[], None]:
    """Keep Prefect's flow engine from replacing our SIGTERM handler; returns the undo.

    While a flow runs, the engine installs a handler that raises in the main thread, unwinds
    the flow (waiting for running tasks, reporting Crashed to the API) and then ends the process
    by the signal's default action, which skips the exit that stops the temporary server. It is
    a worker's cancellation bridge, not needed when the command line runs the flow.
    """
    try:
        import prefect.flow_engine as engine
    except ImportError:
        return lambda: None
    original = getattr(engine, "capture_sigterm", None)
    if original is None:
        return lambda: None
    engine.capture_sigterm = contextlib.nullcontext

    def restore() -> None:
        engine.capture_sigterm = original

    return restore


# --- the temporary Prefect server ---------------------------------------------------------


@dataclass(frozen=True)
class TemporaryServer:
    """A recorded temporary Prefect API server and the polar-cube process that started it."""

    record: Path
    pid: int
    port: int | None
    owner_pid: int
    running: bool  # the recorded server process itself still runs
    owner_running: bool

    def describe(self) -> str:
        """One line: "orphaned temporary Prefect server pid …" or "stale … record …"."""
        if not self.running:
            return f"stale temporary Prefect server record {self.record} (pid {self.pid} ended)"
        where = f" on {processes.LOCALHOST}:{self.port}" if self.port else ""
        return (
            f"orphaned temporary Prefect server pid {self.pid}{where} "
            f"(its polar-cube process, pid {self.owner_pid}, is gone)"
        )

    def clean_up(self) -> None:
        """Stop the orphaned server (SIGTERM, then SIGKILL) and remove its record."""
        if self.running and not processes.stop_process_group(self.pid, REAP_TIMEOUT_SECONDS):
            raise OSError(f"temporary Prefect server pid {self.pid} survived SIGKILL")
        self.record.unlink(missing_ok=True)


def bind_temporary_prefect_servers() -> list[str]:
    """Reap orphaned temporary servers, then bind every temporary server Prefect starts in this
    process to it (none starts when PREFECT_API_URL is set); one line per server reaped."""
    from prefect.settings import get_current_settings

    reaped = []
    for server in temporary_servers():
        if server.owner_running:
            continue
        try:
            server.clean_up()
        except OSError as error:
            reaped.append(f"warning: {error}")
            continue
        if server.running:
            reaped.append(f"stopped {server.describe()}")
    if get_current_settings().api.url:
        return reaped
    from prefect.server.api import server as prefect_server

    if not isinstance(prefect_server.subprocess, _SubprocessBindingServers):
        prefect_server.subprocess = _SubprocessBindingServers()
        atexit.register(_forget_own_records)  # runs after Prefect's own stop (registered later)
    return reaped


def temporary_servers() -> list[TemporaryServer]:
    """Every recorded temporary server of this PREFECT_HOME (running or not)."""
    found = []
    for record in sorted(records_folder().glob("*.json")):
        state = processes.read_state(record, ("started", "owner_pid", "owner_started", "command"))
        if state is None:
            continue
        running = processes.is_same_process(state["pid"], state["started"])
        found.append(
            TemporaryServer(
                record=record,
                pid=state["pid"],
                port=state.get("port"),
                owner_pid=state["owner_pid"],
                running=running and processes.is_our_process(state["pid"], state["command"]),
                owner_running=processes.is_same_process(state["owner_pid"], state["owner_started"]),
            )
        )
    return found


def records_folder() -> Path:
    """Where temporary servers are recorded: a private folder in PREFECT_HOME."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / RECORDS_FOLDER


class _TemporaryServerPopen(subprocess.Popen):
    """Prefect's temporary server process, bound to this process and recorded.

    The parent-death signal is tied to the thread that forks, so the fork happens on a thread
    that lasts as long as this process, not on whichever Prefect thread asked first.
    """

    def __init__(self, args, **kwargs) -> None:
        kwargs["preexec_fn"] = _parent_death_signal(os.getpid())
        _launcher_thread().call(lambda: subprocess.Popen.__init__(self, args, **kwargs))
        _own_servers.append(self)
        _record(self.pid, [str(arg) for arg in args])


class _SubprocessBindingServers:
    """Stands in for `subprocess` in Prefect's server module (which uses it only to launch and
    stop the temporary server): the same module, but its `Popen` binds the server to us."""

    Popen = _TemporaryServerPopen

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def _record(pid: int, command: list[str]) -> None:
    port = command[command.index("--port") + 1] if "--port" in command[:-1] else None
    record = records_folder() / f"{pid}.json"
    state = {
        "pid": pid,
        "started": processes.started_at(pid),
        "port": int(port) if port and port.isdigit() else None,
        "owner_pid": os.getpid(),
        "owner_started": processes.started_at(os.getpid()),
        "command": command,
    }
    try:
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        processes.write_private_state(record, state)
    except OSError as error:  # the parent-death signal still stops it with us
        print(f"polar-cube: warning: cannot record the temporary server: {error}", file=sys.stderr)
        return
    _own_records.append(record)


def _forget_own_records() -> None:
    """Remove the records of the servers this process started once they have ended."""
    for record in list(_own_records):
        state = processes.read_state(record)
        if state is None or not processes.pid_alive(state["pid"]):
            record.unlink(missing_ok=True)
            _own_records.remove(record)


@functools.cache
def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


def _parent_death_signal(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _LauncherThread:
    """A daemon thread running the calls given to it, alive until this process exits."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="polar-cube-launcher", daemon=True).start()

    def call(self, function: Callable):
        result: Future = Future()
        self._calls.put((function, result))
        return result.result()

    def _serve(self) -> None:
        while True:
            function, result = self._calls.get()
            try:
                result.set_result(function())
            except BaseException as error:  # handed to the caller
                result.set_exception(error)


_launcher: _LauncherThread | None = None
_launcher_lock = threading.Lock()


def _launcher_thread() -> _LauncherThread:
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = _LauncherThread()
        return _launcher
