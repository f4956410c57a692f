"""One build per target: the lock in the target folder (S3 variant in test_s3.py)."""

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest

from polar_cube.location import StoreLocation
from polar_cube.target_lock import LOCK_FOLDER, LockEntry, TargetBusyError, TargetLock


def lock_files(folder):
    return sorted((folder / LOCK_FOLDER).glob("*.json"))


def plant_entry(folder, entry: LockEntry, name="00000000000000000001-aaaa.json"):
    (folder / LOCK_FOLDER).mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FOLDER / name).write_text(json.dumps(asdict(entry)))


def test_a_second_build_is_refused_naming_the_holder_until_the_first_ends(tmp_path):
    location = StoreLocation.local(tmp_path)
    with TargetLock(location, settle_seconds=0.05) as first:
        with pytest.raises(TargetBusyError) as refused:
            TargetLock(location, settle_seconds=0.05).acquire()
        message = str(refused.value)
        assert str(tmp_path) in message
        assert f"pid {first.entry.pid} on {first.entry.host}" in message
        assert LOCK_FOLDER in message
        assert len(lock_files(tmp_path)) == 1  # the refused one left nothing behind
    assert lock_files(tmp_path) == []
    with TargetLock(location, settle_seconds=0.05):
        assert len(lock_files(tmp_path)) == 1


def test_a_waiting_build_gets_the_target_when_the_holder_ends(tmp_path):
    location = StoreLocation.local(tmp_path)
    holder = TargetLock(location, settle_seconds=0.05)
    holder.acquire()
    threading.Timer(0.5, holder.release).start()
    started = time.monotonic()
    with TargetLock(location, wait_seconds=30, settle_seconds=0.05):
        assert time.monotonic() - started >= 0.5


def test_the_lock_of_a_killed_build_on_this_machine_is_taken_over_at_once(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is dead now
    dead = replace(LockEntry.for_this_process(), pid=child.pid, process_started=1.0)
    plant_entry(tmp_path, dead)
    with TargetLock(StoreLocation.local(tmp_path), settle_seconds=0.05) as lock:
        assert [p.name for p in lock_files(tmp_path)] == [lock.path.rsplit("/", 1)[-1]]


def test_a_lock_from_another_machine_expires_without_heartbeats(tmp_path):
    now = time.time()
    remote = replace(
        LockEntry.for_this_process(), host="other-host", started=now - 300, heartbeat=now - 10
    )
    plant_entry(tmp_path, remote)
    location = StoreLocation.local(tmp_path)
    with pytest.raises(TargetBusyError, match="pid .* on other-host"):
        TargetLock(location, ttl_seconds=60, settle_seconds=0.05).acquire()
    plant_entry(tmp_path, replace(remote, heartbeat=now - 120))
    with TargetLock(location, ttl_seconds=60, settle_seconds=0.05):
        assert len(lock_files(tmp_path)) == 1


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    with TargetLock(StoreLocation.local(tmp_path), ttl_seconds=0.4, settle_seconds=0.05):
        (path,) = lock_files(tmp_path)
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads(path.read_text())["heartbeat"] > first


def test_of_builds_starting_together_exactly_one_holds_the_target(tmp_path):
    location = StoreLocation.local(tmp_path)
    barrier = threading.Barrier(4)
    outcomes, held = [], threading.Lock()

    def contend():
        lock = TargetLock(location, settle_seconds=0.3)
        barrier.wait()
        try:
            lock.acquire()
        except TargetBusyError:
            outcome = "refused"
        else:
            outcome = "held"
        with held:
            outcomes.append((outcome, lock))

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o for o, _ in outcomes) == ["held", "refused", "refused", "refused"]
    for outcome, lock in outcomes:
        if outcome == "held":
            lock.release()
    assert lock_files(tmp_path) == []
