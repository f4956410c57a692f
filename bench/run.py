"""`python -m bench`: the benchmark, one command, medians of N runs, a markdown table.

It makes the full-size stand-ins once (kept in the workdir), serves them over local HTTP,
runs its own Prefect API server and, for each build, a fresh SeaweedFS, and measures one
command at a time: the one-layer comparison, the whole build (with its per-phase
breakdown and a rerun with nothing changed) and the build at twice the resolution.
Everything it starts is stopped by process id when it ends or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.layer import METHODS, layer_command, load_grid, magnetic_file, output_name
from bench.measure import CommandFailed, Measurement, measure_command
from bench.report import BuildRun, Results, render
from polar_cube.servers.processes import free_port_block

REPO = Path(__file__).resolve().parents[1]
PARTS = ("layer", "build", "scaling", "sizes", "rerun", "zarr3")
SIZES = (1000.0, 200.0)  # the part "sizes": publish time against the cube's size
# the part "zarr3": the other format, with its Icechunk commit (by reference) as a phase
ZARR3 = ("--zarr-format", "3", "--shards", "4", "--format", "icechunk")
ZARR3_LABEL = "zarr 3, shards of 4 × 4 chunks, + Icechunk commit"
BUCKET = "polar-cube-bench"
BUCKET_BLOCK = "polar-cube-bench-bucket"
CREDENTIALS_BLOCK = "polar-cube-bench-credentials"
STANDINS_DONE = "sources-full.complete"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(map(repr, unknown)) or repr(text)} "
            f"(choose from {', '.join(PARTS)}, comma-separated)"
        )
    return parts


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, not {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark polar-cube against the full-size stand-ins: one layer three "
        "ways, the whole build with its phases, a rerun, and scaling; medians of N runs.",
    )
    parser.add_argument("--runs", type=positive_int, default=3, metavar="N", help="default 3")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here")
    parser.add_argument(
        "--only",
        type=parse_parts,
        default=list(PARTS),
        metavar="PARTS",
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("data/bench"),
        metavar="DIR",
        help="stand-ins, download cache, servers' state, logs (default data/bench)",
    )
    parser.add_argument(
        "--resolution",
        type=float,
        metavar="M",
        help="the builds' resolution (default the spec's, 100); scaling also builds at 2×M",
    )
    parser.add_argument(
        "--layer-resolution",
        type=float,
        metavar="M",
        help="the one-layer comparison's grid resolution (default the spec's, 100)",
    )
    parser.add_argument("--spec", type=Path, default=REPO / "cube.geojson", metavar="FILE")
    parser.add_argument("--patch", type=Path, default=REPO / "patch.yaml", metavar="FILE")
    return parser


@dataclass(frozen=True)
class Plan:
    """What to measure, checked before anything runs."""

    runs: int
    parts: list[str]
    workdir: Path
    spec_path: Path
    patch_path: Path
    layer_resolution: float
    build_resolutions: list[float]  # the first is the build's; a second one is for scaling
    rerun: bool
    out: Path | None
    prefect_port: int  # our own Prefect API server's


def make_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    from polar_cube.spec import SpecError, load_spec, resolution_problem

    try:
        spec = load_spec(args.spec)
    except SpecError as error:
        parser.error(str(error))
    default = spec.spatial_res[0]
    layer = args.layer_resolution or default
    fine = args.resolution or default
    wanted = {("--layer-resolution", layer)} if "layer" in args.only else set()
    builds = [fine] if {"build", "scaling", "sizes", "rerun", "zarr3"} & set(args.only) else []
    if "scaling" in args.only:
        builds.append(2 * fine)
    if "sizes" in args.only:
        builds += [r for r in SIZES if r not in builds]
    wanted |= {("--resolution", r) for r in builds}
    for option, resolution in sorted(wanted):
        problem = resolution_problem(resolution, spec.spatial_bbox)
        if problem:
            given = layer if option == "--layer-resolution" else fine
            twice = f" (scaling also builds at {resolution:g} m)" if resolution != given else ""
            parser.error(f"{option} {given:g}{twice}: {problem}")
    if not args.patch.is_file() and builds:
        parser.error(f"--patch {args.patch}: no such file")
    return Plan(
        runs=args.runs,
        parts=args.only,
        workdir=args.workdir.resolve(),
        spec_path=args.spec.resolve(),
        patch_path=args.patch.resolve(),
        layer_resolution=layer,
        build_resolutions=builds,
        rerun="rerun" in args.only,
        out=args.out,
        prefect_port=free_port_block(1),
    )


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def shown(command: list[str]) -> str:
    """A command as a reader would type it from the repository root."""
    words = []
    for word in command:
        if word == sys.executable:
            word = os.path.relpath(word, REPO) if word.startswith(str(REPO)) else word
        elif word.startswith(str(REPO) + os.sep):
            word = os.path.relpath(word, REPO)
        words.append(word)
    return shlex.join(words)


def invocation(argv: list[str]) -> str:
    return shown([sys.executable, "-m", "bench", *argv])


def ensure_standins(workdir: Path) -> Path:
    """The full-size stand-ins, made once (a marker records that they are complete)."""
    from polar_cube.sources.standins import make_standins

    folder, done = workdir / "sources-full", workdir / STANDINS_DONE
    if not done.is_file():
        say(f"making the full-size stand-ins in {folder} ...")
        paths = make_standins(folder, "full")
        done.write_text("\n".join(p.name for p in paths) + "\n")
    return folder


def read_through(path: Path) -> None:
    """Read a file once so every method starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 * 2**20):
            pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def measure_layer(plan: Plan, sources: Path, results: Results) -> None:
    """Each method in turn, N times; outputs removed after each run (not timed)."""
    if shutil.which("gdalwarp") is None:
        raise BenchError("gdalwarp not found on PATH: install GDAL's command-line tools")
    spec, grid = load_grid(plan.spec_path, plan.layer_resolution)
    read_through(sources / magnetic_file(spec))
    results.layer_resolution, results.layer_cells = grid.resolution, grid.width * grid.height
    folder = plan.workdir / "layer"
    folder.mkdir(parents=True, exist_ok=True)
    for run in range(1, plan.runs + 1):
        for method in METHODS:
            out = folder / output_name(method)
            remove(out)
            command = layer_command(
                method, sys.executable, sources, out, plan.spec_path, plan.layer_resolution
            )
            results.layer_commands.setdefault(method, shown(command))
            what = f"one layer, {method}, at {grid.resolution:g} m (run {run}/{plan.runs})"
            say(f"{what} ...")
            measured = measure_command(
                command, _log(plan, f"layer-{method}-run{run}"), what=what, cwd=REPO
            )
            _report(measured)
            results.layer.setdefault(method, []).append(measured)
            remove(out)


def _log(plan: Plan, name: str) -> Path:
    return plan.workdir / "logs" / f"{name}.log"


def _report(measured: Measurement) -> None:
    say(f"  {measured.wall_seconds:.1f} s, peak RSS {measured.peak_rss_bytes / 1e9:.2f} GB")


@contextmanager
def prefect_server(workdir: Path, port: int) -> Iterator[None]:
    """Our own Prefect API server (own PREFECT_HOME, set up by `main`); stopped at the end."""
    from polar_cube.deployments.operate import start_server, stop_server

    state_dir = workdir / "prefect"
    stop_server(state_dir)  # one left by an interrupted benchmark
    say(f"starting a Prefect API server on port {port} ...")
    start_server(state_dir, port=port)
    try:
        yield
    finally:
        stop_server(state_dir)


@contextmanager
def fresh_bucket(workdir: Path) -> Iterator:
    """A new SeaweedFS with an empty bucket and the blocks for it; removed afterwards."""
    from polar_cube.servers.s3server import running_s3_server, stop_s3_server
    from polar_cube.tasks.blocks import save_blocks

    state_dir = workdir / "s3"
    stop_s3_server(state_dir)  # one left by an interrupted benchmark
    remove(state_dir)
    try:
        with running_s3_server(state_dir, port=free_port_block(8), bucket=BUCKET) as info:
            save_blocks(
                bucket_block=BUCKET_BLOCK,
                credentials_block=CREDENTIALS_BLOCK,
                bucket_name=BUCKET,
                endpoint_url=info.endpoint_url,
                access_key=info.access_key,
                secret_key=info.secret_key,
            )
            yield info
    finally:
        remove(state_dir)


def warm_download_cache(plan: Plan, cache: Path, mirror: str) -> None:
    """Download every source through the mirror once, so the builds start after it."""
    from polar_cube.sources.fetch import fetch_source, needed_files
    from polar_cube.spec import load_spec

    spec = load_spec(plan.spec_path)
    say(f"filling the download cache {cache} from {mirror} ...")
    for source in spec.sources:
        fetch_source(source, cache, mirror=mirror, files=needed_files(spec, source.id))


def build_command(
    plan: Plan, resolution: float, mirror: str, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        str(Path(sys.executable).parent / "polar-cube"),
        "build",
        "--spec",
        str(plan.spec_path),
        "--patch",
        str(plan.patch_path),
        "--resolution",
        f"{resolution:g}",
        "--source-mirror",
        mirror,
        "--cache",
        str(plan.workdir / "cache"),
        "--bucket-block",
        BUCKET_BLOCK,
        *extra,
    ]


def count_objects(info) -> tuple[int, int]:
    """(objects, bytes) in the bench bucket (the cube's versions, catalog and lock)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=info.access_key,
        secret=info.secret_key,
        client_kwargs={"endpoint_url": info.endpoint_url},
    )
    found = fs.find(BUCKET, detail=True)
    return len(found), sum(int(item.get("size") or 0) for item in found.values())


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children, and
    theirs: a measured command's whole tree, once it has exited."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the S3 server (and any children of it) used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def measure_build(
    plan: Plan, resolution: float, run: int, mirror: str, rerun: bool, extra: tuple = ()
) -> tuple[BuildRun, Measurement | None]:
    """One whole build from a warm cache into an empty store and bucket (and its rerun)."""
    from bench.phases import phase_peaks, phase_seconds, read_task_spans
    from polar_cube.spec import load_spec

    source_ids = [s.id for s in load_spec(plan.spec_path).sources]
    command = build_command(plan, resolution, mirror, extra)
    what = f"the build at {resolution:g} m {' '.join(extra)} (run {run}/{plan.runs})"
    with fresh_bucket(plan.workdir) as info:
        say(f"{what} ...")
        cpu, server_cpu = children_cpu_seconds(), server_cpu_seconds(info.pid)
        measured = measure_command(
            command, _log(plan, f"build-{resolution:g}m-run{run}"), what=what, cwd=REPO
        )
        cpu, server_cpu = children_cpu_seconds() - cpu, server_cpu_seconds(info.pid) - server_cpu
        _report(measured)
        spans = read_task_spans(measured.started)
        if not spans:
            raise BenchError(f"{what}: the Prefect API recorded no task runs for it")
        objects, stored_bytes = count_objects(info)
        build = BuildRun(
            measured,
            phase_seconds(spans, source_ids, measured.wall_seconds),
            phase_peaks(spans, source_ids, measured.samples),
            objects=objects,
            stored_bytes=stored_bytes,
            cpu_seconds=cpu,
            server_cpu_seconds=server_cpu,
        )
        again = None
        if rerun:
            what = f"the rerun at {resolution:g} m with nothing changed (run {run})"
            say(f"{what} ...")
            again = measure_command(
                command, _log(plan, f"rerun-{resolution:g}m-run{run}"), what=what, cwd=REPO
            )
            _report(again)
    return build, again


def measure_builds(plan: Plan, sources: Path, results: Results) -> None:
    from polar_cube.grid import TargetGrid
    from polar_cube.sources.mirror import serving_mirror
    from polar_cube.spec import load_spec

    spec = load_spec(plan.spec_path)
    fine = plan.build_resolutions[0]
    results.build_resolution = fine
    for resolution in plan.build_resolutions:
        grid = TargetGrid.from_spec(spec, resolution)
        results.cells[resolution] = grid.width * grid.height
        results.builds[resolution] = []
    with prefect_server(plan.workdir, plan.prefect_port), serving_mirror(sources) as mirror:
        warm_download_cache(plan, plan.workdir / "cache", mirror)
        results.build_command = shown(build_command(plan, fine, mirror))
        for run in range(1, plan.runs + 1):
            for resolution in plan.build_resolutions:
                build, again = measure_build(
                    plan, resolution, run, mirror, rerun=plan.rerun and resolution == fine
                )
                results.builds[resolution].append(build)
                if again is not None:
                    results.reruns.append(again)
            if "zarr3" in plan.parts:
                build, _ = measure_build(plan, fine, run, mirror, rerun=False, extra=ZARR3)
                results.formats.setdefault(ZARR3_LABEL, []).append(build)
                results.format_commands[ZARR3_LABEL] = shown(
                    build_command(plan, fine, mirror, ZARR3)
                )


def run_benchmark(plan: Plan, argv: list[str]) -> Results:
    from bench.machine import describe_machine
    from polar_cube.spec import load_spec

    spec = load_spec(plan.spec_path)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    results = Results(
        command=invocation(argv),
        date=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        machine=describe_machine(),
        runs=plan.runs,
        target_resolution=spec.spatial_res[0],
        source_ids=[s.id for s in spec.sources],
    )
    sources = ensure_standins(plan.workdir)
    if "layer" in plan.parts:
        measure_layer(plan, sources, results)
    if plan.build_resolutions:
        measure_builds(plan, sources, results)
    return results


def _prepare_prefect_environment(plan: Plan) -> None:
    """Before anything imports prefect: our own PREFECT_HOME and API server address."""
    os.environ["PREFECT_HOME"] = str(plan.workdir / "prefect" / "home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{plan.prefect_port}/api"


def write_outputs(out: Path, results: Results, table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    raw = out.with_suffix(".json") if out.suffix == ".md" else Path(f"{out}.json")
    raw.write_text(results.to_json())
    say(f"wrote {out} and {raw}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a SIGTERM stops what we started too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _interrupt)
    parser = make_parser()
    plan = make_plan(parser.parse_args(argv), parser)
    _prepare_prefect_environment(plan)
    from polar_cube.errors import PolarCubeError, describe_os_error

    began = time.monotonic()
    try:
        results = run_benchmark(plan, argv)
        table = render(results)
        print(table, end="", flush=True)
        if plan.out:
            write_outputs(plan.out, results, table)
    except (BenchError, CommandFailed, PolarCubeError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"bench: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    say(f"done in {(time.monotonic() - began) / 60:.1f} min")
    return 0
