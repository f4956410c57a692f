"""`polar-cube`: the command line. Thin: parses options and calls library functions/flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _prefect_defaults() -> None:
    """Settings the ephemeral Prefect API needs here; must run before prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default="cube.geojson", help="cube spec (default ./cube.geojson)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="VAR",
        help="build just the datasets these variables need (repeatable)",
    )
    parser.add_argument(
        "--resolution", type=float, metavar="M", help="grid resolution in metres (spec's default)"
    )
    parser.add_argument(
        "--source-mirror", metavar="URL", help="fetch each source's file from this mirror instead"
    )
    parser.add_argument("--cache", metavar="DIR", help="download cache (default: user data dir)")
    parser.add_argument(
        "--store", metavar="DIR", help="where per-dataset cubes go (default ./data/datasets)"
    )


def cmd_build(args: argparse.Namespace) -> int:
    from flows.build_datasets import build_datasets

    built = build_datasets(
        spec_path=args.spec,
        only=args.only,
        resolution=args.resolution,
        source_mirror=args.source_mirror,
        cache_dir=args.cache,
        store_dir=args.store,
    )
    _print_built(built)
    return 0


def _print_built(built) -> None:
    print("per-dataset cubes:")
    for item in built:
        state = "reused" if item.reused else "built"
        print(f"  {item.path}  [{state}]  {', '.join(item.variables)}")


def cmd_sources_make(args: argparse.Namespace) -> int:
    from polar_cube.standins import make_standins

    for path in make_standins(Path(args.out_dir), args.scale):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_sources_serve(args: argparse.Namespace) -> int:
    from polar_cube.mirror import serve_mirror_forever

    serve_mirror_forever(Path(args.out_dir), args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Offline demo: make stand-ins, serve them over HTTP, build every per-dataset cube."""
    from flows.build_datasets import build_datasets
    from polar_cube.mirror import serving_mirror
    from polar_cube.standins import make_standins

    workdir = Path(args.workdir)
    sources_dir = workdir / f"sources-{args.scale}"
    print(f"making {args.scale} stand-in sources in {sources_dir} ...", flush=True)
    make_standins(sources_dir, args.scale)
    with serving_mirror(sources_dir) as mirror:
        print(f"serving them at {mirror}", flush=True)
        built = build_datasets(
            spec_path=args.spec,
            resolution=args.resolution,
            source_mirror=mirror,
            cache_dir=str(workdir / "cache"),
            store_dir=str(workdir / "datasets"),
        )
    _print_built(built)
    return 0


def cmd_spec_check(args: argparse.Namespace) -> int:
    from polar_cube.grid import TargetGrid
    from polar_cube.spec import load_spec

    spec = load_spec(args.spec)
    grid = TargetGrid.from_spec(spec)
    print(
        f"{args.spec}: {spec.data_id}: {len(spec.variables)} variables from "
        f"{len(spec.sources)} sources on a {grid.width}x{grid.height} grid at {grid.resolution:g} m"
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar-cube", description="Build the Polar Data Cube (Prefect flows)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build every per-dataset cube through Prefect")
    _add_build_options(build)
    build.set_defaults(func=cmd_build)

    demo = commands.add_parser(
        "demo",
        help="offline demo: stand-in sources, local HTTP mirror, build at reduced resolution",
    )
    demo.add_argument("--spec", default="cube.geojson")
    demo.add_argument("--scale", choices=["small", "full"], default="full")
    demo.add_argument("--resolution", type=float, default=1000.0, metavar="M")
    demo.add_argument("--workdir", default="data/demo", help="where everything goes")
    demo.set_defaults(func=cmd_demo)

    sources = commands.add_parser("sources", help="stand-in sources").add_subparsers(
        dest="sources_command", required=True
    )
    make = sources.add_parser("make", help="write realistic stand-ins of every source file")
    make.add_argument("--scale", choices=["small", "full"], default="small")
    make.add_argument("out_dir", metavar="OUT_DIR")
    make.set_defaults(func=cmd_sources_make)
    serve = sources.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1 (Range ok)")
    serve.add_argument("out_dir", metavar="OUT_DIR")
    serve.add_argument("--port", type=int, default=8765)
    serve.set_defaults(func=cmd_sources_serve)

    spec = commands.add_parser("spec", help="cube spec").add_subparsers(
        dest="spec_command", required=True
    )
    check = spec.add_parser("check", help="validate a spec and summarise it")
    check.add_argument("spec", nargs="?", default="cube.geojson")
    check.set_defaults(func=cmd_spec_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _prefect_defaults()
    from polar_cube.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"polar-cube: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polar-cube: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
