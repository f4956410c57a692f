"""`polar-cube`: the command line. Thin: parses options and calls library functions/flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from polar_cube.errors import PolarCubeError


class OptionError(PolarCubeError, ValueError):
    """Options that cannot go together; the message names them."""


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
    parser.add_argument("--cache", metavar="DIR", help="download cache (default data/cache)")
    parser.add_argument(
        "--store",
        metavar="DIR",
        help="with --datasets-only: where per-dataset cubes go (default ./data/datasets)",
    )
    parser.add_argument(
        "--bucket-block",
        metavar="NAME",
        help="prefect-aws S3Bucket block to publish into (see `polar-cube blocks create`)",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="without --bucket-block: the local folder to publish into (default ./data/cube)",
    )
    parser.add_argument("--patch", default="patch.yaml", metavar="FILE", help="metadata patch")
    parser.add_argument(
        "--dask-address",
        metavar="ADDRESS",
        help="run the array work on this dask.distributed scheduler (tcp://host:port), "
        "or on a LocalCluster sized for this machine with 'local'",
    )
    parser.add_argument(
        "--dask",
        dest="dask_address",
        choices=["local"],
        help="'local': run the array work on a LocalCluster sized for this machine",
    )
    parser.add_argument(
        "--datasets-only",
        action="store_true",
        help="only the per-dataset cubes, into --store (no version, merge or patch)",
    )
    parser.add_argument(
        "--zarr-format",
        type=int,
        choices=[2, 3],
        help="2 (default: GDAL 3.6 and xcube read it) or 3: sharded, its own series "
        "(<name>-zarr3-shards<N>-v<version>.zarr)",
    )
    parser.add_argument(
        "--format",
        dest="cube_format",
        choices=["zarr", "icechunk"],
        default="zarr",
        help="icechunk: zarr 3, and each new version also committed to the Icechunk "
        "repository <series>.icechunk (chunks by reference), tagged v<version>",
    )
    parser.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="with --zarr-format 3: a shard holds N x N chunks (default 4)",
    )
    parser.add_argument(
        "--deep-verify",
        action="store_true",
        help="before publishing, read every chunk object again and check it against the "
        "version's manifest (what the scheduled deployment does)",
    )


def cmd_build(args: argparse.Namespace) -> int:
    from polar_cube.preflight import check_build, check_cube_format

    if args.store and not args.datasets_only:
        raise OptionError(
            f"--store {args.store}: only with --datasets-only (a build writes its chunks "
            "straight into the new version of the cube)"
        )
    from polar_cube.sources.fetch import DEFAULT_CACHE_DIR

    folders = {"--cache": args.cache or DEFAULT_CACHE_DIR}
    if args.datasets_only:
        folders["--store"] = args.store or "data/datasets"
    elif not args.bucket_block:
        folders["--output"] = args.output or "data/cube"
    checked = check_build(
        args.spec,
        resolution=args.resolution,
        only=args.only,
        patch_path=None if args.datasets_only else args.patch,
        folders=folders,
        cube_folder="--output",
    )
    cube_format = getattr(args, "cube_format", "zarr")
    zarr_format = getattr(args, "zarr_format", None) or (3 if cube_format == "icechunk" else 2)
    shards = getattr(args, "shards", None)
    check_cube_format(cube_format, zarr_format)
    series = checked.spec.at_format(zarr_format, shards).series  # refuses --shards with 2
    if args.datasets_only and zarr_format != 2:
        from polar_cube.spec import SpecError

        raise SpecError(
            f"--format {cube_format} --zarr-format {zarr_format} is for a cube "
            "version, not --datasets-only"
        )
    if args.datasets_only:
        from polar_cube.flows.build_datasets import build_datasets

        _print_datasets(
            build_datasets(
                spec=checked.spec,
                grid=checked.grid,
                only=args.only,
                source_mirror=args.source_mirror,
                cache_dir=args.cache,
                store_dir=args.store,
                dask_address=args.dask_address,
            )
        )
        return 0
    from polar_cube.flows.build_cube import build_cube

    built = build_cube(
        spec_path=args.spec,
        only=args.only,
        resolution=args.resolution,
        source_mirror=args.source_mirror,
        cache_dir=args.cache,
        bucket_block=args.bucket_block,
        output_dir=args.output,
        patch_path=args.patch,
        dask_address=args.dask_address,
        **({"zarr_format": zarr_format, "shards": shards} if zarr_format != 2 else {}),
        **({"cube_format": cube_format} if cube_format != "zarr" else {}),
        **({"deep_verify": True} if getattr(args, "deep_verify", False) else {}),
    )
    _print_cube(built.url, args.bucket_block, series=series)
    if getattr(built, "icechunk", None):
        print(f"Icechunk repository: {built.icechunk} (tag v{built.version})")
    return 0


def _print_datasets(built) -> None:
    print("per-dataset cubes:")
    for item in built:
        state = "reused" if item.reused else "built"
        print(f"  {item.path}  [{state}]  {', '.join(item.variables)}")


def open_snippet(
    url: str, storage_options: dict | None = None, *, xcube: bool = False, series: str = ""
) -> str:
    """Python that opens the published cube (with xcube: also its overview levels) in any Python
    with xarray and s3fs (and xcube): no polar_cube, no Prefect. With `series` it opens the
    version `latest` names, read from the catalog `<series>.versions.json` next to `url`.
    `storage_options` (for an s3:// url) hold an endpoint and maybe a profile name, never
    keys: those come from the AWS profile or the environment."""
    from json import dumps as literal  # a str, or a dict of str: valid Python too

    remote = url.startswith("s3://")
    folder, name = url.removeprefix("s3://").rstrip("/").rsplit("/", 1)
    catalog = f"{series}.versions.json"
    lines = ["import json", ""] if series else []
    if series and not xcube:
        lines += ["import fsspec"]
    lines += ["from xcube.core.store import new_data_store" if xcube else "import xarray as xr", ""]
    with_options = []
    if remote:
        options = storage_options or {}
        keys = (
            f"AWS profile {options['profile']} (~/.aws/credentials)"
            if options.get("profile")
            else "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
        items = "".join(f"    {literal(k)}: {literal(v)},\n" for k, v in options.items())
        lines += [
            f"# the keys come from {keys}",
            "storage_options = {" + f"\n{items}" * bool(items) + "}",
        ]
        with_options = ["storage_options=storage_options"]
    if xcube:
        protocol = "s3" if remote else "file"
        store = ", ".join([literal(protocol), f"root={literal(folder)}", *with_options])
        lines.append(f"store = new_data_store({store})")
        if series:
            lines += [
                "# the version `latest` names (or pin one: its <series>-vX.Y.Z.zarr)",
                f'catalog = f"{{store.root}}/{catalog}"',
                'name = json.loads(store.fs.cat_file(catalog))["latest_cube"]',
            ]
        else:
            lines.append(f"name = {literal(name)}")
        lines += [
            "cube = store.open_data(name)",
            'stem = name.removesuffix(".zarr")',
            'levels = store.open_data(f"{stem}.levels", data_type="mldataset")',
            "print(name)",
            "print(cube)",
            'print(levels.num_levels, "levels")',
        ]
        return "\n".join(lines)
    prefix = f"s3://{folder}" if remote else folder
    if series:
        opened = ", ".join([literal(f"{prefix}/{catalog}"), *(["**storage_options"] * remote)])
        lines += [
            "# the version `latest` names (or pin one: its <series>-vX.Y.Z.zarr)",
            f"with fsspec.open({opened}) as f:",
            '    name = json.load(f)["latest_cube"]',
        ]
        target = f'f"{prefix}/{{name}}"'
    else:
        lines.append(f"name = {literal(name)}")
        target = literal(url)
    arguments = [target, "consolidated=True", *with_options]
    call = f"cube = xr.open_zarr({', '.join(arguments)})"
    if len(call) > 100:
        call = "cube = xr.open_zarr(\n" + "".join(f"    {a},\n" for a in arguments) + ")"
    lines += [call, "print(name)", "print(cube)"]
    return "\n".join(lines)


def _print_cube(
    url: str,
    bucket_block: str | None,
    local_server=None,
    aws_profile: str | None = None,
    series: str = "",
) -> None:
    """Where the cube is, and snippets that open it without polar_cube or Prefect: xarray +
    s3fs, then xcube (with the levels), then GDAL for a local S3 server. With `series` the
    Python snippets open the version `latest` names (GDAL's opens the version at `url`). In a
    bucket they carry its endpoint, never a key: the keys come from the environment (the
    notes say how), or from `aws_profile` when the demo was asked to write one (see
    `snippet_storage_options`)."""
    print(f"the cube is at {url}")
    if series:
        folder = url.rstrip("/").rsplit("/", 1)[0]
        print(f"latest of {series}: {folder}/{series}.versions.json (`polar-cube versions`)")
    options, notes, credentials = None, [], None
    if url.startswith("s3://"):
        from polar_cube.cli.s3 import credentials_command, snippet_storage_options

        options, notes = snippet_storage_options(bucket_block, local_server, aws_profile)
        endpoint = (options.get("client_kwargs") or {}).get("endpoint_url")
        credentials = credentials_command(endpoint, local_server)
    for note in notes:
        print(note)
    print("--- open the cube ---")
    print(open_snippet(url, options, series=series))
    print("---")
    print("--- open it with xcube: the cube and its overview levels ---")
    print(open_snippet(url, options, xcube=True, series=series))
    print("---")
    from polar_cube.spec import zarr_layout

    gdal_reads_it = zarr_layout(url.rstrip("/").rsplit("/", 1)[-1])[0] == 2  # GDAL 3.6: zarr 2
    if gdal_reads_it and (credentials or not url.startswith("s3://")):
        from polar_cube.cli.s3 import gdal_path

        print("--- open it with GDAL ---")
        if credentials:
            print(f'eval "$({credentials} --gdal)"')
        print(f"gdalinfo {gdal_path(url)}")
        print("---")
    if bucket_block:
        print(
            "operators, in the project's python, through the Prefect block: from "
            "polar_cube.tasks.blocks import load_bucket, storage_options_from_blocks; "
            f"storage_options = storage_options_from_blocks(load_bucket({bucket_block!r}))"
        )


def cmd_sources_make(args: argparse.Namespace) -> int:
    from polar_cube.cli.sources import make_spec_standins

    for path in make_spec_standins(args.spec, Path(args.out_dir), args.scale):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_sources_serve(args: argparse.Namespace) -> int:
    from polar_cube.sources.mirror import serve_mirror_forever

    serve_mirror_forever(Path(args.out_dir), args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Offline demo: stand-in sources on a local HTTP mirror, a local S3 server with blocks,
    the whole cube built at a reduced resolution into the bucket. Nothing is written outside
    the current folder's state folders unless asked (--aws-profile)."""
    from polar_cube.cli.s3 import write_profile
    from polar_cube.cli.sources import make_spec_standins
    from polar_cube.flows.build_cube import build_cube
    from polar_cube.preflight import check_build
    from polar_cube.servers.s3server import start_s3_server
    from polar_cube.sources.mirror import serving_mirror
    from polar_cube.tasks.blocks import save_blocks

    workdir = Path(args.workdir)
    checked = check_build(args.spec, resolution=args.resolution, folders={"--workdir": workdir})
    server = start_s3_server(Path(args.s3_state_dir), port=args.s3_port, bucket=args.bucket)
    print(f"local S3 server at {server.endpoint_url} (stop it: polar-cube s3 stop)", flush=True)
    if args.aws_profile:  # before the build: a profile that is not ours stops it at once
        print(write_profile(server, args.aws_profile), flush=True)
    sources_dir = workdir / f"sources-{args.scale}"
    print(f"making {args.scale} stand-in sources in {sources_dir} ...", flush=True)
    make_spec_standins(args.spec, sources_dir, args.scale)
    save_blocks(
        bucket_block=args.bucket_block,
        credentials_block=args.credentials_block,
        bucket_name=args.bucket,
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    with serving_mirror(sources_dir) as mirror:
        print(f"serving the stand-ins at {mirror}", flush=True)
        built = build_cube(
            spec_path=args.spec,
            resolution=args.resolution,
            source_mirror=mirror,
            cache_dir=str(workdir / "cache"),
            bucket_block=args.bucket_block,
        )
    _print_cube(
        built.url,
        args.bucket_block,
        local_server=server,
        aws_profile=args.aws_profile,
        series=checked.spec.series,
    )
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
    from polar_cube.cli.integrity import add_integrity_commands
    from polar_cube.cli.metadata import add_metadata_commands
    from polar_cube.cli.ops import add_ops_commands
    from polar_cube.cli.s3 import add_blocks_commands, add_s3_commands
    from polar_cube.cli.sources import add_mirror_commands
    from polar_cube.cli.versions import add_versions_commands
    from polar_cube.cli.view import add_view_command

    parser = argparse.ArgumentParser(
        prog="polar-cube", description="Build the Polar Data Cube (Prefect flows)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build",
        help="build a new version of the cube through Prefect: datasets, merge, patch, publish",
    )
    _add_build_options(build)
    build.set_defaults(func=cmd_build)

    demo = commands.add_parser(
        "demo",
        help="offline demo: stand-ins on a local mirror, local S3 server, whole cube at 1 km",
    )
    demo.add_argument("--spec", default="cube.geojson")
    demo.add_argument("--scale", choices=["small", "full"], default="full")
    demo.add_argument("--resolution", type=float, default=1000.0, metavar="M")
    demo.add_argument("--workdir", default="data/demo", help="stand-in sources and the cache")
    demo.add_argument("--s3-state-dir", default="data/s3", help="the local S3 server's folder")
    demo.add_argument("--s3-port", type=int, default=8333)
    demo.add_argument("--bucket", default="polar-cube")
    demo.add_argument("--bucket-block", default="polar-cube-bucket")
    demo.add_argument("--credentials-block", default="polar-cube-credentials")
    demo.add_argument(
        "--aws-profile",
        metavar="NAME",
        help="also write the local server's keys as AWS profile NAME (~/.aws, or "
        "AWS_SHARED_CREDENTIALS_FILE/AWS_CONFIG_FILE) and name it in the printed snippets; "
        "by default nothing is written under ~/.aws and the snippets take the keys from "
        'the environment: eval "$(polar-cube s3 credentials)"',
    )
    demo.set_defaults(func=cmd_demo)

    sources = commands.add_parser("sources", help="stand-in sources").add_subparsers(
        dest="sources_command", required=True
    )
    make = sources.add_parser(
        "make", help="write realistic stand-ins of every source file of the spec"
    )
    make.add_argument("--spec", default="cube.geojson", help="cube spec (default ./cube.geojson)")
    make.add_argument("--scale", choices=["small", "full"], default="small")
    make.add_argument("out_dir", metavar="OUT_DIR")
    make.set_defaults(func=cmd_sources_make)
    serve = sources.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1 (Range ok)")
    serve.add_argument("out_dir", metavar="OUT_DIR")
    serve.add_argument("--port", type=int, default=8765)
    serve.set_defaults(func=cmd_sources_serve)
    add_mirror_commands(sources)

    add_s3_commands(commands)
    add_blocks_commands(commands)
    add_versions_commands(commands)
    add_metadata_commands(commands)
    add_integrity_commands(commands)
    add_ops_commands(commands)
    add_view_command(commands)

    spec = commands.add_parser("spec", help="cube spec").add_subparsers(
        dest="spec_command", required=True
    )
    check = spec.add_parser("check", help="validate a spec and summarise it")
    check.add_argument("spec", nargs="?", default="cube.geojson")
    check.set_defaults(func=cmd_spec_check)
    return parser


# Where the command's tools keep their state unless told otherwise: folders of the current
# folder (made absolute, so that the Prefect server, worker and flow runs started from here share
# them), never ~/.prefect or ~/.cache.
STATE_FOLDERS = {
    "PREFECT_HOME": "data/prefect/home",  # Prefect's database, profiles, result storage
    "MPLCONFIGDIR": "data/matplotlib",  # matplotlib's font cache (quicklooks)
}


def default_state_folders(environ=os.environ) -> None:
    """Set each variable of STATE_FOLDERS that is not set yet (before Prefect is imported)."""
    for name, folder in STATE_FOLDERS.items():
        if not environ.get(name):
            environ[name] = str(Path(folder).resolve())


def main(argv: list[str] | None = None) -> int:
    default_state_folders()
    import polar_cube.flows  # noqa: F401  (Prefect's defaults for this project, before Prefect is used)

    args = make_parser().parse_args(argv)
    from polar_cube.cli.lifecycle import command_lifecycle
    from polar_cube.errors import PolarCubeError, describe_os_error

    try:
        with command_lifecycle(args.command):
            return args.func(args)
    except PolarCubeError as error:
        print(f"polar-cube: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # met outside the steps that name their target
        print(f"polar-cube: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polar-cube: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
