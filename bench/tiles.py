"""`python -m bench.tiles`: how fast `polar-cube view` draws the cube's map tiles.

Each run starts a fresh `xcube serve` for the published cube (through
`polar_cube.servers.viewer`, as `polar-cube view` does, but without its warm-up, so nothing
is opened or read before the first tile), then asks it, as the viewer does (256-px EPSG:3857
PNG tiles with the variable's colour bar and range), for:

1. **first tile**: the deepest tile holding the whole cube, as the server's first request
   (it opens the dataset then: cold);
2. **zoom**: the tile at the cube's centre at `--pan-zoom` (default: the first zoom at which
   xcube reads the full-resolution level);
3. **panned**: its neighbour to the east, right after.

Every number is the median of `--runs N` runs (min–max shown). The run ends with a markdown
table (also written to `--out`, raw numbers as JSON beside it).

The cube: `--cube-dir DIR` or `--bucket-block NAME` (a published cube), else it builds one
at `--resolution` (default 100 m) from the full-size stand-ins (made once in
`data/bench/sources-full`) into `--workdir` (default `data/bench/tiles`): a local folder
(`--build local`, the default) or a bucket of its own SeaweedFS (`--build s3`; the server
is stopped at the end, its data kept for the next run). A build whose inputs did not change
is reused. Everything it starts is stopped by process id when it ends or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "polar-cube-tiles"
BUCKET_BLOCK = "polar-cube-tiles-bucket"
CREDENTIALS_BLOCK = "polar-cube-tiles-credentials"
TARGET_FIRST_SECONDS = 2.0
TARGET_PANNED_SECONDS = 0.5


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


def say(message: str) -> None:
    print(f"bench.tiles: {message}", file=sys.stderr, flush=True)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiles", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per number (medians)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cube-dir", metavar="DIR", help="a cube published into this folder")
    where.add_argument("--bucket-block", metavar="NAME", help="a cube in this block's bucket")
    parser.add_argument("--cube-id", metavar="NAME", help="<stem>.zarr (default: the spec's)")
    parser.add_argument(
        "--build",
        choices=["local", "s3"],
        default="local",
        help="without --cube-dir/--bucket-block: build into a folder or a bucket (SeaweedFS)",
    )
    parser.add_argument("--resolution", type=float, default=100.0, metavar="M")
    parser.add_argument("--workdir", default="data/bench/tiles", metavar="DIR")
    parser.add_argument(
        "--sources", default="data/bench", metavar="DIR", help="where sources-full/ is (made)"
    )
    parser.add_argument("--cache", default="data/bench/cache", metavar="DIR", help="downloads")
    parser.add_argument("--spec", default="cube.geojson")
    parser.add_argument("--patch", default="patch.yaml")
    parser.add_argument("--variable", default="magnetic_anomaly")
    parser.add_argument("--pan-zoom", type=int, metavar="Z", help="zoom of the panned tiles")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the kernel's page cache before each run (root; affects the whole machine)",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the table here (and .json)")
    return parser


@dataclass
class Run:
    start: float  # the server answers `/`
    first: float
    zoom: float
    panned: float
    view_start: float  # start as `polar-cube view` does: described, one tile per level drawn
    drawn: dict[str, int]  # name -> pixels drawn (not transparent) of the 256 x 256


@dataclass
class Results:
    command: str
    cube_url: str
    shape: list[int]
    resolution: float
    num_levels: int
    variable: str
    tiles: dict[str, list[int]]  # name -> [z, x, y]
    levels: dict[str, int]  # name -> overview level read
    drop_caches: bool
    machine: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# --- the cube -------------------------------------------------------------------------------


def build_cube(args: argparse.Namespace, workdir: Path, bucket_block: str | None) -> None:
    """`polar-cube build` at --resolution into the workdir's folder or `bucket_block`."""
    from bench.run import ensure_standins
    from polar_cube.sources.mirror import serving_mirror

    sources = ensure_standins(Path(args.sources))
    target = ["--output", str(workdir / "cube")]
    if bucket_block:
        target = ["--bucket-block", bucket_block]
    with serving_mirror(sources) as mirror:
        command = [
            sys.executable,
            "-m",
            "polar_cube.cli",
            "build",
            "--spec",
            args.spec,
            "--patch",
            args.patch,
            "--resolution",
            f"{args.resolution:g}",
            "--source-mirror",
            mirror,
            "--cache",
            args.cache,
            "--store",
            str(workdir / "datasets"),
            *target,
        ]
        log = workdir / "build.log"
        say(f"building the cube at {args.resolution:g} m (log: {log}) ...")
        began = time.monotonic()
        with open(log, "w") as output:
            result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        if result.returncode != 0:
            raise BenchError(f"the build failed (exit {result.returncode}); see {log}")
        say(f"cube ready in {time.monotonic() - began:.0f} s")


@contextmanager
def own_bucket(workdir: Path) -> Iterator[str]:
    """A SeaweedFS of the workdir's own with a bucket and its blocks; stopped at the end."""
    from polar_cube.servers.processes import free_port_block
    from polar_cube.servers.s3server import running_s3_server
    from polar_cube.tasks.blocks import save_blocks

    with running_s3_server(workdir / "s3", port=free_port_block(8), bucket=BUCKET) as server:
        save_blocks(
            bucket_block=BUCKET_BLOCK,
            credentials_block=CREDENTIALS_BLOCK,
            bucket_name=BUCKET,
            endpoint_url=server.endpoint_url,
            access_key=server.access_key,
            secret_key=server.secret_key,
        )
        yield BUCKET_BLOCK


def cube_source(args: argparse.Namespace, bucket_block: str | None):
    """(CubeSource, full storage options or None) of the cube to serve."""
    from polar_cube.cli.view import source_from_bucket_block
    from polar_cube.servers.viewer_config import source_from_folder
    from polar_cube.spec import load_spec

    name = args.cube_id or load_spec(args.spec).data_id
    if bucket_block:
        return source_from_bucket_block(bucket_block, name)
    folder = args.cube_dir or str(Path(args.workdir) / "cube")
    return source_from_folder(folder, name), None


# --- one run --------------------------------------------------------------------------------


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise BenchError(f"--drop-caches: cannot write /proc/sys/vm/drop_caches: {error}") from None


def timed_get(client, url: str) -> tuple[float, int]:
    """(seconds for one tile, how many of its pixels are drawn); it must be a PNG."""
    import io

    import numpy as np
    from PIL import Image

    began = time.perf_counter()
    response = client.get(url)
    seconds = time.perf_counter() - began
    if response.status_code != 200 or response.content[:4] != b"\x89PNG":
        raise BenchError(f"{url} answered {response.status_code}: {response.text[:300]}")
    alpha = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))[..., 3]
    return seconds, int((alpha > 0).sum())


def measure_run(
    args, state_dir: Path, source, options, tiles: dict[str, tuple[int, int, int]], query: dict
) -> Run:
    import httpx

    from polar_cube.servers.viewer import start_viewer, stop_viewer
    from polar_cube.servers.viewer_config import tile_url

    if args.drop_caches:
        drop_page_cache()
    began = time.perf_counter()
    info = start_viewer(state_dir, source, storage_options=options, port=0, check_dataset=False)
    start = time.perf_counter() - began
    try:
        with httpx.Client(timeout=300) as client:
            got = {  # in this order: first, zoom, panned
                name: timed_get(
                    client, tile_url(info.server_url, info.dataset_id, args.variable, tile, **query)
                )
                for name, tile in tiles.items()
            }
    finally:
        stop_viewer(state_dir)
    began = time.perf_counter()
    start_viewer(state_dir, source, storage_options=options, port=0)
    view_start = time.perf_counter() - began
    stop_viewer(state_dir)
    return Run(
        start=start,
        view_start=view_start,
        drawn={name: pixels for name, (_, pixels) in got.items()},
        **{name: seconds for name, (seconds, _) in got.items()},
    )


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> Results:
    from bench.machine import describe_machine
    from polar_cube.servers.viewer_config import (
        color_mapping,
        cube_outline,
        level_for_zoom,
        open_cube_metadata,
        time_steps,
        web_mercator_tile,
        whole_cube_tile,
    )

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    building = not (args.cube_dir or args.bucket_block)
    bucket = own_bucket(workdir) if building and args.build == "s3" else nullcontext(None)
    with bucket as own_block:
        if building:
            build_cube(args, workdir, own_block)
        source, options = cube_source(args, args.bucket_block or own_block)
        cube, num_levels = open_cube_metadata(source, options)
        if args.variable not in cube.data_vars:
            raise BenchError(f"--variable {args.variable}: not in {source.cube_url}")
        resolution = abs(float(cube.x[1] - cube.x[0]))
        pan_zoom = args.pan_zoom
        if pan_zoom is None:
            pan_zoom = next(z for z in range(25) if level_for_zoom(z, resolution, num_levels) == 0)
        x, y = web_mercator_tile(*cube_outline(cube, 2)[0], pan_zoom)
        tiles = {
            "first": whole_cube_tile(cube),
            "zoom": (pan_zoom, x, y),
            "panned": (pan_zoom, x + 1, y),
        }
        mapping = color_mapping(cube[args.variable].attrs)
        low, high = mapping["ValueRange"]
        query = {"vmin": low, "vmax": high, "cmap": mapping["ColorBar"]}
        if "time" in cube[args.variable].dims:
            query["time"] = time_steps(cube)[-1]
        results = Results(
            command=shown_command(argv),
            cube_url=source.cube_url,
            shape=[int(n) for n in cube[args.variable].shape[-2:]],
            resolution=resolution,
            num_levels=num_levels,
            variable=args.variable,
            tiles={name: list(tile) for name, tile in tiles.items()},
            levels={n: level_for_zoom(t[0], resolution, num_levels) for n, t in tiles.items()},
            drop_caches=args.drop_caches,
            machine=describe_machine(),
        )
        for number in range(1, args.runs + 1):
            run = measure_run(args, workdir / "view", source, options, tiles, query)
            results.runs.append(run)
            say(
                f"run {number}/{args.runs}: first {run.first:.3f} s, zoom {run.zoom:.3f} s, "
                f"panned {run.panned:.3f} s (server start {run.start:.1f} s)"
            )
    return results


# --- the report -----------------------------------------------------------------------------


def spread(values: list[float], digits: int) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}–{max(values):.{digits}f})"
    )


def render(results: Results) -> str:
    runs = results.runs
    height, width = results.shape
    level_res = {n: results.resolution * 2**lv for n, lv in results.levels.items()}

    def tile(name: str) -> str:
        z, x, y = results.tiles[name]
        return f"{z}/{x}/{y}"

    def drawn(name: str) -> str:
        return f"{runs[-1].drawn[name] / 256**2:.0%}"

    def level(name: str) -> str:
        return f"{results.levels[name]} ({level_res[name]:g} m)"

    first = statistics.median(r.first for r in runs)
    panned = statistics.median(r.panned for r in runs)
    cache = "emptied before each run" if results.drop_caches else "as left by the previous run"
    lines = [
        f"## Map tiles in the viewer (`polar-cube view`), {results.resolution:g} m cube",
        "",
        f"Command: `{results.command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        *(f"- **{name}**: {value}" for name, value in results.machine.items()),
        "",
        f"Cube `{results.cube_url}`: {width} × {height} cells, {results.num_levels} levels "
        f"(level 0 the cube itself); variable `{results.variable}`; 256-px EPSG:3857 PNG tiles "
        f"as the viewer requests them (z/x/y). Each run starts a fresh `xcube serve`; the "
        f"kernel's page cache was {cache}. Median of {len(runs)} runs (min–max).",
        "",
        "| request | tile | level read | pixels drawn | time (s) |",
        "|---|---|---|---:|---:|",
        f"| first tile showing the whole cube (the server's first request: opens the dataset) "
        f"| {tile('first')} | {level('first')} | {drawn('first')} "
        f"| {spread([r.first for r in runs], 3)} |",
        f"| zoom in: the tile at the cube's centre | {tile('zoom')} | {level('zoom')} "
        f"| {drawn('zoom')} | {spread([r.zoom for r in runs], 3)} |",
        f"| panned: its neighbour to the east | {tile('panned')} | {level('panned')} "
        f"| {drawn('panned')} | {spread([r.panned for r in runs], 3)} |",
        f"| server start (until it answers) | – | – | – | {spread([r.start for r in runs], 1)} |",
        "| `polar-cube view` start (dataset described, one tile per level drawn) | – | – | – "
        f"| {spread([r.view_start for r in runs], 1)} |",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| first whole-cube tile ≤ {TARGET_FIRST_SECONDS:g} s | {first:.3f} s "
        f"| {'yes' if first <= TARGET_FIRST_SECONDS else '**no**'} |",
        f"| panned tile ≤ {TARGET_PANNED_SECONDS:g} s | {panned:.3f} s "
        f"| {'yes' if panned <= TARGET_PANNED_SECONDS else '**no**'} |",
        "",
    ]
    return "\n".join(lines)


def shown_command(argv: list[str]) -> str:
    import shlex

    python = sys.executable
    if python.startswith(str(REPO) + os.sep):
        python = os.path.relpath(python, REPO)
    return shlex.join([python, "-m", "bench.tiles", *argv])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a SIGTERM stops what we started too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _interrupt)
    args = make_parser().parse_args(argv)
    if args.runs < 1:
        make_parser().error("--runs must be at least 1")
    if not (args.cube_dir or args.bucket_block):  # a build of its own: its own Prefect home
        os.environ["PREFECT_HOME"] = str(Path(args.workdir).resolve() / "prefect")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from polar_cube.errors import PolarCubeError, describe_os_error

    try:
        results = run_benchmark(args, argv)
    except (BenchError, PolarCubeError) as error:
        print(f"bench.tiles: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"bench.tiles: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.tiles: interrupted", file=sys.stderr)
        return 130
    table = render(results)
    print(table, end="", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        raw = out.with_suffix(".json") if out.suffix == ".md" else Path(f"{out}.json")
        raw.write_text(results.to_json())
        say(f"wrote {out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
