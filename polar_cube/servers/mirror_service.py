"""The stand-in sources served over HTTP in the background (`polar-cube sources start`).

Like the local S3 server: one state folder (default `data/mirror/`) holds the stand-ins
(`sources-<scale>/`, made once), `mirror.log` (one line per request) and `server.json` (pid,
port, URL); the server binds 127.0.0.1 and is stopped by its process id. A deployment names
its URL as the build's `source_mirror`, so a scheduled build runs with no internet.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.servers import processes

DEFAULT_STATE_DIR = "data/mirror"
DEFAULT_PORT = 8400
STATE_FILE = "server.json"
LOG_FILE = "mirror.log"
HOST = processes.LOCALHOST


class MirrorServiceError(PolarCubeError, RuntimeError):
    """The stand-in mirror cannot be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class MirrorInfo:
    pid: int
    url: str  # http://127.0.0.1:PORT: what `--source-mirror` takes
    folder: str  # the files it serves
    log: str


def sources_folder(state_dir: str | Path, scale: str) -> Path:
    """Where the stand-ins of `scale` are made and served from."""
    return Path(state_dir).resolve() / f"sources-{scale}"


def start_mirror(
    state_dir: str | Path, folder: str | Path, *, port: int = DEFAULT_PORT, timeout: float = 30
) -> MirrorInfo:
    """Serve `folder` on 127.0.0.1:`port` in the background (or return the running mirror of
    `state_dir`, if it serves `folder`)."""
    state_dir, folder = Path(state_dir).resolve(), Path(folder).resolve()
    running = mirror_status(state_dir)
    if running is not None:
        if Path(running.folder) != folder:
            raise MirrorServiceError(
                f"the mirror of {state_dir} serves {running.folder}, not {folder}; stop it "
                "first (`polar-cube sources stop`)"
            )
        return running
    if not folder.is_dir():
        raise MirrorServiceError(f"{folder}: no such folder to serve")
    if not processes.port_is_free(port, HOST):
        raise MirrorServiceError(
            f"port {port} on {HOST} is in use by something else: choose another (--port)"
        )
    command = [sys.executable, "-m", "polar_cube.servers.mirror_service", str(folder), str(port)]
    log = state_dir / LOG_FILE
    pid = processes.launch_in_background(command, log, append=True)
    info = MirrorInfo(pid=pid, url=f"http://{HOST}:{port}", folder=str(folder), log=str(log))
    processes.write_private_state(state_dir / STATE_FILE, info.__dict__)
    if not processes.wait_until(lambda: _answers(info), pid, timeout):
        processes.kill_process_group(pid)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise MirrorServiceError(
            f"the mirror (pid {pid}) did not answer at {info.url} within {timeout:g} s; last "
            f"lines of {log}:\n{processes.log_tail(log)}"
        )
    return info


def stop_mirror(state_dir: str | Path, timeout: float = 10) -> bool:
    """Stop the mirror by its pid; True if it was running."""
    state_file = Path(state_dir).resolve() / STATE_FILE
    state = processes.read_state(state_file)
    if state is None:
        return False
    running = processes.is_our_process(state["pid"], _markers(state))
    if running and not processes.stop_process_group(state["pid"], timeout):
        raise MirrorServiceError(f"the mirror (pid {state['pid']}) did not exit after SIGKILL")
    state_file.unlink(missing_ok=True)
    return running


def mirror_status(state_dir: str | Path) -> MirrorInfo | None:
    """The running mirror of `state_dir`, or None unless its process runs and it answers."""
    state = processes.read_state(Path(state_dir).resolve() / STATE_FILE)
    if state is None or not processes.is_our_process(state["pid"], _markers(state)):
        return None
    info = MirrorInfo(**{k: state[k] for k in MirrorInfo.__dataclass_fields__})
    return info if _answers(info) else None


def _markers(state: dict) -> tuple[str, ...]:
    return ("polar_cube.servers.mirror_service", state.get("folder", ""))


def _answers(info: MirrorInfo) -> bool:
    """Any HTTP answer will do (the mirror lists no folder: `/` is a 404)."""
    import httpx

    try:
        httpx.head(f"{info.url}/", timeout=2)
    except httpx.HTTPError:
        return False
    return True


if __name__ == "__main__":  # the background process: python -m … FOLDER PORT
    from polar_cube.sources.mirror import serve_mirror_forever

    serve_mirror_forever(Path(sys.argv[1]), int(sys.argv[2]), HOST, verbose=True)
