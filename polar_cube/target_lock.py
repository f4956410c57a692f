"""One build per target: a lock kept in the target itself (a local folder or an s3:// prefix).

Object stores have no atomic create-if-absent that every S3-compatible server offers, so the
lock is a small election instead: each build writes its own entry under
`<target>/.polar-cube-lock/`, lists the folder, drops entries whose holder is dead, and holds
the lock only if its entry is still the oldest live one when it lists again a moment later
(`settle_seconds`, longer than a write takes to become visible, and than the clocks of two
machines differ); otherwise it removes its entry and waits or refuses, naming the holder.
Listings are strongly consistent on AWS S3, SeaweedFS and local folders, so of two builds
starting together exactly one holds the lock.

A holder refreshes its entry every `ttl / 4` seconds. An entry is dead when its heartbeat is
older than `ttl` (a holder on another machine that died or lost the network), or at once when
the holder ran on this machine and its process is gone (killed with SIGKILL, say).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from polar_cube.errors import PolarCubeError
from polar_cube.location import StoreLocation

LOCK_FOLDER = ".polar-cube-lock"
DEFAULT_TTL_SECONDS = 120.0
SETTLE_SECONDS = 1.0
_POLL_SECONDS = 2.0


class TargetBusyError(PolarCubeError, RuntimeError):
    """Another build holds the target; the message names it."""


@dataclass(frozen=True)
class LockEntry:
    """Who holds (or asks for) the lock, written as JSON into the lock folder."""

    host: str
    pid: int
    process_started: float  # psutil create_time: tells a reused pid from the holder
    command: str
    started: float  # unix time the entry was first written
    heartbeat: float  # unix time of the last refresh

    @classmethod
    def for_this_process(cls) -> LockEntry:
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            process_started=psutil.Process().create_time(),
            command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
            started=now,
            heartbeat=now,
        )

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {since})"

    def is_dead(self, ttl: float, now: float) -> bool:
        if now - self.heartbeat > ttl:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            return psutil.Process(self.pid).create_time() != self.process_started
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


class TargetLock:
    """`with TargetLock(location): …` builds into `location` alone.

    `wait_seconds`: how long to wait for a busy target before refusing (0: refuse at once).
    """

    def __init__(
        self,
        location: StoreLocation,
        *,
        wait_seconds: float = 0.0,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self.location = location
        self.wait_seconds = wait_seconds
        self.ttl = ttl_seconds
        self.settle_seconds = settle_seconds
        self.entry = LockEntry.for_this_process()
        self.path = ""
        self._root_existed = True
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.location.url(LOCK_FOLDER)

    def __enter__(self) -> TargetLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self._root_existed = self.location.exists()
        deadline = time.monotonic() + self.wait_seconds
        while True:
            self.entry = LockEntry.for_this_process()
            name = f"{int(self.entry.started * 1e6):020d}-{secrets.token_hex(6)}.json"
            self.path = self.location.path(LOCK_FOLDER, name)
            self._write(self.entry)
            holder = self._oldest_live_entry()
            if holder[0] == self.path:
                time.sleep(self.settle_seconds)  # let a rival's earlier entry become visible
                holder = self._oldest_live_entry()
                if holder[0] == self.path:
                    self._write(self.entry)  # present even if a rival swept it meanwhile
                    break
            self._remove(self.path)
            if time.monotonic() >= deadline:
                raise TargetBusyError(
                    f"{self.location.root} is being built by {holder[1].describe()}; "
                    f"wait for it to finish (its lock {self.url} is released at its end, or "
                    f"expires {self.ttl:g} s after that build stops)"
                )
            time.sleep(_POLL_SECONDS)
        self._heartbeat = threading.Thread(
            target=self._refresh, name="polar-cube-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        if self.path:
            try:
                self._remove(self.path)
            except Exception:  # e.g. the bucket went away: the entry expires by itself
                pass
        if self.location.is_local:  # leave no empty folders behind (object stores have none)
            self._remove_empty_folders()

    def _remove_empty_folders(self) -> None:
        folders = [Path(self.location.path(LOCK_FOLDER))]
        if not self._root_existed:
            folders.append(Path(self.location.path()))
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's entry, or the build's own output
                return

    def _refresh(self) -> None:
        entry = self.entry
        while not self._stop.wait(self.ttl / 4):
            entry = LockEntry(**(asdict(entry) | {"heartbeat": time.time()}))
            try:
                self._write(entry)
            except Exception:  # a passing network error; the next beat tries again
                pass

    def _write(self, entry: LockEntry) -> None:
        self.location.fs.pipe_file(self.path, json.dumps(asdict(entry)).encode())

    def _remove(self, path: str) -> None:
        try:
            self.location.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _oldest_live_entry(self) -> tuple[str, LockEntry]:
        """(path, entry) of the oldest entry whose holder lives (ours at the latest); dead
        ones are removed."""
        fs, folder = self.location.fs, self.location.path(LOCK_FOLDER)
        fs.invalidate_cache(folder)
        now = time.time()
        for path in sorted(fs.ls(folder, detail=False)):
            try:
                entry = LockEntry(**json.loads(fs.cat_file(path)))
            except FileNotFoundError:
                continue  # released while we listed
            except (ValueError, TypeError):
                entry = None  # half-written by a holder that died writing it
            if entry is None or (path != self.path and entry.is_dead(self.ttl, now)):
                self._remove(path)
                continue
            return path, entry
        return self.path, self.entry  # ours vanished (removed by hand): take it as ours
