"""`python -m bench.cluster`: is the no-shared-disk path slower on one machine?

Side by side in one run, medians of N, on the full-size stand-ins into a fresh SeaweedFS:
- `local`: the default build (threads in the flow's process, sources from the local
  cache, per-dataset cubes on local disk, then uploaded);
- `cluster`: the same build with `--dask-address` of a dask scheduler and worker started
  here, as separate processes: sources staged into the bucket, workers read them from
  there and write the per-dataset cubes straight into the bucket (nothing uploaded).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.measure import measure_command
from bench.run import (
    REPO,
    Plan,
    _interrupt,
    _prepare_prefect_environment,
    build_command,
    ensure_standins,
    fresh_bucket,
    positive_int,
    prefect_server,
    remove,
    say,
    shown,
    warm_download_cache,
)
from polar_cube.servers.processes import free_port_block

METHODS = ("local", "cluster")


@contextmanager
def dask_processes(workdir: Path, threads: int) -> Iterator[str]:
    """A scheduler and one worker (`threads` threads) as processes; stopped at the end."""
    from distributed import Client

    bin_dir = Path(sys.executable).parent
    address = f"tcp://127.0.0.1:{free_port_block(2)}"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = address.rsplit(":", 1)[1]
    commands = [
        [f"{bin_dir}/dask", "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
        [f"{bin_dir}/dask", "worker", address, "--nthreads", str(threads), "--no-dashboard",
         "--host", "127.0.0.1", "--memory-limit", "12GiB"],
    ]  # fmt: skip
    processes = []
    try:
        for name, command in zip(("scheduler", "worker"), commands, strict=True):
            log = open(logs / f"cluster-{name}.log", "w")  # noqa: SIM115 (closed with the process)
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--runs", type=positive_int, default=3, metavar="N")
    parser.add_argument("--resolution", type=float, default=200.0, metavar="M")
    parser.add_argument("--workdir", type=Path, default=Path("data/bench"), metavar="DIR")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here")
    args = parser.parse_args(argv)
    plan = Plan(
        runs=args.runs,
        parts=["build"],
        workdir=args.workdir.resolve(),
        spec_path=REPO / "cube.geojson",
        patch_path=REPO / "patch.yaml",
        layer_resolution=args.resolution,
        build_resolutions=[args.resolution],
        rerun=False,
        out=args.out,
        prefect_port=free_port_block(1),
    )
    _prepare_prefect_environment(plan)
    from polar_cube.sources.mirror import serving_mirror

    began = time.monotonic()
    walls: dict[str, list[float]] = {m: [] for m in METHODS}
    peaks: dict[str, list[int]] = {m: [] for m in METHODS}
    sources = ensure_standins(plan.workdir)
    with (
        prefect_server(plan.workdir, plan.prefect_port),
        serving_mirror(sources) as mirror,
        dask_processes(plan.workdir, threads=2) as address,
    ):
        warm_download_cache(plan, plan.workdir / "cache", mirror)
        commands = {
            "local": build_command(plan, args.resolution, mirror),
            "cluster": [*build_command(plan, args.resolution, mirror), "--dask-address", address],
        }
        for run in range(1, plan.runs + 1):
            for method in METHODS:
                remove(plan.workdir / "datasets")
                with fresh_bucket(plan.workdir):
                    what = f"{method} build at {args.resolution:g} m (run {run}/{plan.runs})"
                    say(f"{what} ...")
                    log = plan.workdir / "logs" / f"cluster-bench-{method}-run{run}.log"
                    measured = measure_command(commands[method], log, what=what, cwd=REPO)
                    say(f"  {measured.wall_seconds:.1f} s")
                    walls[method].append(measured.wall_seconds)
                    peaks[method].append(measured.peak_rss_bytes)
        remove(plan.workdir / "datasets")
    table = render(args, walls, peaks, {m: shown(c) for m, c in commands.items()})
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    say(f"done in {(time.monotonic() - began) / 60:.1f} min")
    return 0


def render(args, walls: dict, peaks: dict, commands: dict) -> str:
    local = statistics.median(walls["local"])
    lines = [
        f"#### Local threads vs a no-shared-disk cluster on this machine ({args.resolution:g} m)",
        "",
        f"Command: `.venv/bin/python -m bench.cluster --runs {args.runs} "
        f"--resolution {args.resolution:g}`; whole build from a warm download cache into a "
        "fresh SeaweedFS, medians of "
        f"{args.runs} (min–max); the cluster is one scheduler and one 2-thread worker, "
        "as processes on the same 2 cores.",
        "",
        "| build | wall (s) | flow process tree peak RSS (GB) | wall ÷ local |",
        "|---|---:|---:|---:|",
    ]
    for method in METHODS:
        wall = statistics.median(walls[method])
        lines.append(
            f"| {method} | {wall:.1f} ({min(walls[method]):.1f}–{max(walls[method]):.1f}) "
            f"| {statistics.median(peaks[method]) / 1e9:.2f} | {wall / local:.2f} |"
        )
    lines += ["", "```text", *(f"{m}: {c}" for m, c in commands.items()), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
