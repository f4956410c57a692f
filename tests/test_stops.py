"""Stopping builds: SIGTERM and Ctrl-C end one within 5 s leaving nothing running; after a
SIGKILL no temporary Prefect server outlives it, `polar-cube doctor` reaps one that does,
and a rerun of the same command completes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from polar_cube.cli import main
from polar_cube.cube.versions import latest_cube, read_catalog
from polar_cube.location import StoreLocation
from polar_cube.servers import processes
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
UNDER_WAY = "Beginning subflow run"  # the parent flow runs and the datasets subflow started
STARTUP_TIMEOUT = 600  # the first temporary server of a new PREFECT_HOME migrates its database
TAG = "POLAR_CUBE_STOPS_TEST"  # inherited by every process the build starts
SPEC = load_spec(REPO / "cube.geojson").at_resolution(3000)  # what the builds publish


@pytest.fixture(scope="module")
def mirror(small_standins):
    with serving_mirror(small_standins) as url:
        yield url


class Build:
    """`polar-cube build` of the small stand-ins at 3000 m, run in its own session."""

    def __init__(self, work: Path, mirror: str, *extra: str) -> None:
        self.work = work
        self.tag = uuid.uuid4().hex
        self.command = [
            sys.executable,
            "-m",
            "polar_cube.cli",
            "build",
            "--spec",
            str(REPO / "cube.geojson"),
            "--patch",
            str(REPO / "patch.yaml"),
            "--resolution",
            "3000",
            "--source-mirror",
            mirror,
            "--cache",
            str(work / "cache"),
            "--output",
            str(work / "cube"),
            *extra,
        ]
        self.env = os.environ | {"PREFECT_HOME": os.environ["PREFECT_HOME"], TAG: self.tag}
        self.stderr_path = work / "stderr.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.work,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        return self.process

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while text not in self.stderr():
            assert self.process.poll() is None, f"build ended early:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} yet:\n{self.stderr()[-3000:]}"
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def tagged_processes(self) -> list[psutil.Process]:
        """Every live process (other than zombies) carrying this build's tag."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG) == self.tag and _running(process):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def rerun(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=900
        )

    def kill_leftovers(self) -> None:
        for process in self.tagged_processes():
            with contextlib.suppress(psutil.Error):
                process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _temporary_server(candidates: list[psutil.Process]) -> psutil.Process:
    (server,) = [p for p in candidates if "prefect.server.api.server:create_app" in p.cmdline()]
    return server


def _doctor(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", "doctor", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "exit_code", "name", "extra"),
    [
        (signal.SIGTERM, 143, "SIGTERM", ["--dask", "local"]),
        (signal.SIGINT, 130, "Ctrl-C", []),
    ],
    ids=["SIGTERM-dask-local", "SIGINT"],
)
def test_stop_signal_ends_the_build_within_5_s_leaving_nothing_running(
    tmp_path, mirror, signum, exit_code, name, extra
):
    build = Build(tmp_path / "work", mirror, *extra)
    process = build.start()
    try:
        build.wait_for(UNDER_WAY)
        tree = build.descendants()
        _temporary_server(tree)
        if extra:
            assert len(tree) > 2, "the LocalCluster's workers run"
        process.send_signal(signum)
        assert process.wait(timeout=5) == exit_code  # the bound
        lines = build.stderr().splitlines()
        expected = f"polar-cube: stopped by {name}; rerun the same command to resume"
        assert lines[-1] == expected
        assert lines.count(expected) == 1
        assert "Traceback" not in build.stderr()
        assert [p for p in tree if _running(p)] == []
        assert build.tagged_processes() == []
    finally:
        process.kill()
        build.kill_leftovers()


@pytest.mark.slow
def test_sigkill_leaves_no_temporary_server_and_a_rerun_completes(tmp_path, mirror):
    build = Build(tmp_path / "work", mirror)
    process = build.start()
    try:
        build.wait_for(UNDER_WAY)
        server = _temporary_server(build.descendants())
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        _, alive = psutil.wait_procs([server], timeout=15)
        assert alive == [], "the kernel's parent-death signal stops the temporary server"
        rerun = build.rerun()
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        # the killed build published nothing: the rerun publishes the first version
        output = StoreLocation.local(tmp_path / "work" / "cube")
        assert f"the cube is at {output.url(SPEC.data_id)}\n" in rerun.stdout
        assert latest_cube(output, SPEC.series) == SPEC.data_id
        assert [v.version for v in read_catalog(output, SPEC.series).versions] == [SPEC.version]
        assert build.tagged_processes() == []
        check = _doctor("--check", cwd=tmp_path, env=build.env)
        assert f"pid {server.pid}" not in check.stdout, "the rerun removed the stale record"
    finally:
        process.kill()
        build.kill_leftovers()


@pytest.mark.slow
def test_doctor_reaps_a_temporary_server_that_outlived_its_build(tmp_path, mirror):
    build = Build(tmp_path / "work", mirror)
    process = build.start()
    try:
        build.wait_for(UNDER_WAY)
        server = _temporary_server(build.descendants())
        server.suspend()  # a hung server: the parent-death SIGTERM stays pending
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        time.sleep(1)
        assert _running(server), "a suspended server outlives its build"

        check = _doctor("--check", cwd=tmp_path, env=build.env)
        orphan = f"orphaned temporary Prefect server pid {server.pid} on 127.0.0.1:"
        assert check.returncode == 1, check.stdout + check.stderr
        assert orphan in check.stdout
        assert f"(its polar-cube process, pid {process.pid}, is gone)" in check.stdout
        assert _running(server), "--check only reports"

        reaped = _doctor(cwd=tmp_path, env=build.env)
        assert reaped.returncode == 0, reaped.stdout + reaped.stderr
        assert f"stopped {orphan}" in reaped.stdout
        assert not _running(server)
        again = _doctor("--check", cwd=tmp_path, env=build.env)
        assert f"pid {server.pid}" not in again.stdout
    finally:
        process.kill()
        build.kill_leftovers()


def _dead_pid() -> int:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def test_doctor_removes_state_files_whose_process_is_gone(tmp_path, capsys):
    s3_dir, prefect_dir = tmp_path / "s3", tmp_path / "prefect"
    s3_state = s3_dir / "server.json"
    keys = {"endpoint_url": "http://127.0.0.1:1", "access_key": "a", "secret_key": "s"}
    processes.write_private_state(s3_state, {"pid": _dead_pid(), **keys})
    processes.write_private_state(s3_dir / "identities.json", {"pid": 0})  # keys stay
    server_state = prefect_dir / "server.json"
    processes.write_private_state(server_state, {"pid": _dead_pid(), "port": 4200})
    stale_worker = prefect_dir / "worker-stale-pool.json"
    processes.write_private_state(stale_worker, {"pid": _dead_pid()})
    live_worker = subprocess.Popen(  # a running worker of pool `live` (by its command line)
        [sys.executable, "-c", "import time; time.sleep(120)", "prefect", "worker", "start", "live"]
    )
    processes.write_private_state(prefect_dir / "worker-live.json", {"pid": live_worker.pid})
    options = ["--s3-state-dir", str(s3_dir), "--state-dir", str(prefect_dir)]
    try:
        assert main(["doctor", "--check", *options]) == 1
        reported = capsys.readouterr().out.splitlines()
        for what, path in [
            ("S3 server", s3_state),
            ("Prefect server", server_state),
            ("worker (pool stale-pool)", stale_worker),
        ]:
            assert any(line.startswith(f"stale {what} state {path} (pid ") for line in reported)
        assert not any("worker-live.json" in line for line in reported)
        assert s3_state.exists() and server_state.exists() and stale_worker.exists()

        assert main(["doctor", *options]) == 0
        fixed = capsys.readouterr().out.splitlines()
        assert any(line.startswith(f"removed stale S3 server state {s3_state} ") for line in fixed)
        assert not s3_state.exists() and not server_state.exists() and not stale_worker.exists()
        assert (s3_dir / "identities.json").exists()
        assert (prefect_dir / "worker-live.json").exists()
        assert live_worker.poll() is None
    finally:
        live_worker.kill()
        live_worker.wait()


STOP_CHILDREN_SCRIPT = """
import json, subprocess, sys
from polar_cube.servers import processes
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
child = subprocess.Popen(sleeper)
background = processes.launch_in_background(sleeper, sys.argv[1])
stopped = processes.stop_children(keep=processes.background_pids(), grace_seconds=5)
print(json.dumps({"child": child.pid, "background": background, "stopped": stopped}))
"""


def test_stop_children_stops_children_but_spares_background_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", STOP_CHILDREN_SCRIPT, str(tmp_path / "background.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout)
    try:
        assert pids["stopped"] == [pids["child"]]
        assert not psutil.pid_exists(pids["child"]) or not _running(psutil.Process(pids["child"]))
        assert _running(psutil.Process(pids["background"]))
    finally:
        processes.kill_process_group(pids["background"])
