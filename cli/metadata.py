"""`polar-cube export` and `polar-cube check-metadata`: a published cube as CF netCDF, and
the build's metadata checks (CF-1.10, ACDD-1.3) on any published version.

Thin: finds the version (as `versions` does), then calls `polar_cube.cube.export` and
`polar_cube.cube.compliance`.
"""

from __future__ import annotations

import argparse

from polar_cube.cli.versions import add_target_options, cube_target


def add_metadata_commands(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a published cube (or some variables within a bbox) as a CF netCDF file",
    )
    export.add_argument("out", metavar="OUT", help="the file to write (e.g. cube.nc)")
    export.add_argument("--format", choices=["netcdf"], default="netcdf", help="netcdf (CF-1.10)")
    export.add_argument(
        "--variables", metavar="A,B", help="comma-separated variable names (default: all)"
    )
    export.add_argument(
        "--bbox",
        metavar="XMIN,YMIN,XMAX,YMAX",
        type=_bbox,
        help="in the cube's CRS (metres of EPSG:3031): the cells whose centres fall inside",
    )
    _add_version_options(export)
    export.set_defaults(func=cmd_export)

    check = commands.add_parser(
        "check-metadata",
        help="run the build's CF-1.10 and ACDD-1.3 checks on a published cube",
    )
    check.add_argument(
        "--against",
        metavar="X.Y.Z",
        help="fail (as a build's gate) if the cube has findings this published version lacks",
    )
    _add_version_options(check)
    check.set_defaults(func=cmd_check_metadata)


def _add_version_options(parser: argparse.ArgumentParser) -> None:
    add_target_options(parser)
    parser.add_argument("--version", metavar="X.Y.Z", help="a published version (default latest)")


def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give XMIN,YMIN,XMAX,YMAX") from None
    return xmin, ymin, xmax, ymax


def cmd_export(args: argparse.Namespace) -> int:
    from polar_cube.cube.export import export_netcdf
    from polar_cube.cube.target import open_cube
    from polar_cube.cube.versions import published_cube

    location, series = cube_target(args)
    cube = published_cube(location, series, args.version)
    variables = [v.strip() for v in args.variables.split(",")] if args.variables else None
    path = export_netcdf(open_cube(location, cube), args.out, variables, args.bbox)
    print(f"wrote {path} from {location.url(cube)}")
    return 0


def cmd_check_metadata(args: argparse.Namespace) -> int:
    from polar_cube.cube.compliance import check_version, gate, lines
    from polar_cube.cube.versions import published_cube

    location, series = cube_target(args)
    cube = published_cube(location, series, args.version)
    baseline = published_cube(location, series, args.against) if args.against else None
    report = check_version(location, cube, baseline)
    for line in lines(report):
        print(line)
    gate(report)
    return 0
