"""Run one command and measure its wall time and the peak RSS of its whole process tree."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.1


class CommandFailed(RuntimeError):
    """A measured command exited with an error; the message names it and its log."""


@dataclass(frozen=True)
class Measurement:
    """One run of one command."""

    wall_seconds: float
    tree_peak_bytes: int  # largest summed RSS of the process tree, sampled every 0.1 s
    largest_process_peak_bytes: int  # largest VmHWM (a process's own exact peak) seen in it
    started: dt.datetime  # UTC, just before the launch
    # (seconds since the epoch, summed tree RSS) every `interval`: which phase used what
    samples: tuple[tuple[float, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def peak_rss_bytes(self) -> int:
        """The sampled tree peak, never below the exact peak of the largest process."""
        return max(self.tree_peak_bytes, self.largest_process_peak_bytes)


def high_water_bytes(pid: int) -> int:
    """The process's own peak RSS since its last exec (VmHWM), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, largest VmHWM) of `root` and all its descendants; (0, 0) once it is gone.

    VmHWM rather than wait4's ru_maxrss: the latter also counts the moment between fork
    and exec, when the child is still a copy of the (large) measuring process.
    """
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = largest = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # ended between listing and reading
            continue
        largest = max(largest, high_water_bytes(process.pid))
    return total, largest


class _TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree until stopped; keeps the maximum."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(name=f"rss-sampler-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.largest_process_peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stopped.is_set():
            rss, high_water = tree_memory(root)
            self.samples.append((time.time(), rss))
            self.peak = max(self.peak, rss)
            self.largest_process_peak = max(self.largest_process_peak, high_water)
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def measure_command(
    command: list[str],
    log_path: Path,
    *,
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    interval: float = SAMPLE_SECONDS,
) -> Measurement:
    """Run `command` (output into `log_path`) and measure it; CommandFailed if it fails.

    It runs in its own process group, which is stopped if this process is interrupted.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    with open(log_path, "wb") as log:
        begin = time.perf_counter()
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as error:
            raise CommandFailed(f"{what}: cannot start {command[0]}: {error}") from None
        sampler = _TreeSampler(process.pid, interval)
        sampler.start()
        try:
            process.wait()
        except BaseException:
            _stop_group(process)
            raise
        finally:
            sampler.stop()
        wall = time.perf_counter() - begin
    if process.returncode != 0:
        raise CommandFailed(
            f"{what} failed with exit code {process.returncode}; last lines of {log_path}:\n"
            + _tail(log_path)
        )
    return Measurement(
        wall_seconds=wall,
        tree_peak_bytes=sampler.peak,
        largest_process_peak_bytes=sampler.largest_process_peak,
        started=started,
        samples=tuple(sampler.samples),
    )


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL if it lingers; reap it."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
