"""`polar-cube verify [VERSION] [--deep]` and `polar-cube repair [VERSION]`: is a published
version whole, chunk by chunk, and make it so again.

Thin: finds the target and the version (as `versions` does), then calls
`polar_cube.cube.target.check_cube_and_levels` and `polar_cube.cube.integrity`.
"""

from __future__ import annotations

import argparse
import sys

from polar_cube.cli.versions import add_target_options, cube_target


def add_integrity_commands(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser(
        "verify",
        help="check a published version against the spec; --deep: read every chunk again "
        "and compare it with the version's manifest (exit 2 naming each bad chunk)",
    )
    _add_version_options(verify)
    verify.add_argument(
        "--deep", action="store_true", help="read every chunk object and check its sha256"
    )
    verify.set_defaults(func=cmd_verify)

    repair = commands.add_parser(
        "repair",
        help="recompute the damaged or missing chunks of a published version from its "
        "sources (the download cache, or downloaded again), then deep-verify it",
    )
    _add_version_options(repair)
    repair.add_argument("--cache", metavar="DIR", help="download cache (default data/cache)")
    repair.add_argument("--source-mirror", metavar="URL", help="fetch the sources from this mirror")
    repair.set_defaults(func=cmd_repair)


def _add_version_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "version", nargs="?", metavar="VERSION", help="X.Y.Z (default: the one `latest` names)"
    )
    add_target_options(parser)
    parser.add_argument(
        "--zarr-format", type=int, choices=[2, 3], default=2, help="the series' zarr format"
    )
    parser.add_argument("--shards", type=int, metavar="N", help="with --zarr-format 3")


def _version(args: argparse.Namespace):
    """(location, the version's spec, grid) the command works on."""
    from polar_cube.cube.versions import find_version
    from polar_cube.preflight import check_build

    location, _ = cube_target(args)
    checked = check_build(args.spec, resolution=args.resolution)
    spec = checked.spec.at_format(args.zarr_format, args.shards)
    entry = find_version(location, spec.series, args.version)
    return location, spec.at_version(entry.version), checked.grid


def cmd_verify(args: argparse.Namespace) -> int:
    from polar_cube.cube.integrity import deep_verify
    from polar_cube.cube.target import check_cube_and_levels
    from polar_cube.keys import VersionKeys

    location, spec, grid = _version(args)
    keys = VersionKeys(spec.data_id)
    check_cube_and_levels(location, keys.cube, keys.levels, spec, grid)
    if not args.deep:
        print(f"{location.url(keys.cube)} and its levels match the spec")
        return 0
    report = deep_verify(location, keys)
    for problem in report.problems:
        print(problem.line(location, keys), file=sys.stderr)
    if report.problems:
        print(
            f"polar-cube: {len(report.problems)} of {report.chunks} chunks not as written "
            f"(`polar-cube repair {spec.version}` recomputes them)",
            file=sys.stderr,
        )
        return 2
    print(
        f"{report.chunks} chunks of {report.variables} variables verified: "
        f"{location.url(keys.cube)}"
    )
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polar_cube.cube.integrity import repair_version
    from polar_cube.keys import VersionKeys
    from polar_cube.sources.fetch import default_cache_dir, fetch_source, needed_files
    from polar_cube.target_lock import TargetLock

    location, spec, grid = _version(args)
    cache = Path(args.cache).resolve() if args.cache else default_cache_dir()

    def fetch(source):
        auth = None
        if source.credentials_block:
            from polar_cube.tasks.download import load_credentials

            auth = load_credentials(source.credentials_block)
        files = needed_files(spec, source.id)
        return fetch_source(source, cache, mirror=args.source_mirror, auth=auth, files=files)

    keys = VersionKeys(spec.data_id)
    with TargetLock(location):
        report, repaired = repair_version(location, spec, grid, fetch)
    for problem in repaired:
        done = "removed" if problem.kind == "unexpected" else "recomputed"
        print(f"{done} {problem.line(location, keys)}")
    if not repaired:
        print(f"nothing to repair: {report.chunks} chunks of {report.variables} variables verified")
        return 0
    print(f"{report.chunks} chunks of {report.variables} variables verified after the repair")
    return 0
