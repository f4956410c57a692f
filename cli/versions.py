"""`polar-cube versions | rollback VERSION | prune --keep N`: the published versions of a cube.

Thin: finds the target (a bucket block or a local folder) and the cube's series (the spec's
name at --resolution), then calls `polar_cube.cube.versions`.
"""

from __future__ import annotations

import argparse

DEFAULT_OUTPUT = "data/cube"


def add_versions_commands(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser(
        "versions", help="list the published versions of the cube (and which one is latest)"
    )
    add_target_options(listing)
    listing.set_defaults(func=cmd_versions)

    back = commands.add_parser(
        "rollback", help="point `latest` at an earlier published version (nothing is deleted)"
    )
    back.add_argument("version", metavar="VERSION", help="X.Y.Z (as `versions` lists it)")
    add_target_options(back)
    back.set_defaults(func=cmd_rollback)

    prune = commands.add_parser(
        "prune",
        help="delete all but the newest N versions (never the one `latest` names) and "
        "unfinished drafts",
    )
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="versions to keep")
    add_target_options(prune)
    prune.set_defaults(func=cmd_prune)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--bucket-block", metavar="NAME", help="the S3Bucket block's bucket")
    where.add_argument(
        "--output", metavar="DIR", help=f"the local folder (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--spec", default="cube.geojson", help="cube spec (for the cube's name)")
    parser.add_argument(
        "--resolution", type=float, metavar="M", help="the cube's resolution (spec's default)"
    )


def target_of(args: argparse.Namespace):
    """(location, series) the command works on."""
    from polar_cube.location import StoreLocation
    from polar_cube.spec import load_spec

    series = load_spec(args.spec).at_resolution(args.resolution).series
    if args.bucket_block:
        from polar_cube.tasks.blocks import bucket_location

        return bucket_location(args.bucket_block), series
    return StoreLocation.local(args.output or DEFAULT_OUTPUT), series


def cmd_versions(args: argparse.Namespace) -> int:
    from polar_cube.cube.versions import catalog_key, read_catalog

    location, series = target_of(args)
    catalog = read_catalog(location, series)
    print(f"{series} in {location.root} ({catalog_key(series)})")
    if not catalog.versions:
        print("  nothing published yet")
        return 0
    for entry in sorted(catalog.versions, key=lambda v: v.published, reverse=True):
        mark = "latest" if entry.version == catalog.latest else ""
        print(
            f"  {entry.version:<10} {entry.published}  {entry.cube}  "
            f"inputs {entry.fingerprint[:12]}  {mark}".rstrip()
        )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from polar_cube.cube.versions import rollback
    from polar_cube.target_lock import TargetLock

    location, series = target_of(args)
    with TargetLock(location):
        entry = rollback(location, series, args.version)
    print(f"latest of {series} is now {entry.version}: {location.url(entry.cube)}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from polar_cube.cube.versions import prune
    from polar_cube.target_lock import TargetLock

    location, series = target_of(args)
    with TargetLock(location):
        removed = prune(location, series, args.keep)
    if removed:
        print(f"removed from {location.root}: {', '.join(removed)}")
    else:
        print(f"nothing to remove: {series} has at most {args.keep} version(s)")
    return 0
