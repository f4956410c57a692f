"""One layer, three ways: the magnetic anomaly GeoTIFF onto the cube grid.

- `original`: the original pipeline's method: rioxarray open, `Dataset.interp(x=…, y=…,
  method="linear")` onto the grid's cell centres, chunks of 2048, `to_zarr`.
- `gdalwarp`: `gdalwarp -multi -wo NUM_THREADS=ALL_CPUS -r bilinear` to a tiled, compressed
  GeoTIFF on the same grid.
- `ours`: `polar_cube.dataset` convert -> resample -> describe -> write, without Prefect,
  exactly the steps of the build's per-dataset task.

The two Python methods run as `python -m bench.layer original|ours SOURCE_DIR OUT …`, each
in its own process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAGNETIC_SOURCE = "magnetic_anomaly"
METHODS = ("ours", "gdalwarp", "original")
ORIGINAL_CHUNK = 2048


def load_grid(spec_path: Path, resolution: float | None):
    from polar_cube.grid import TargetGrid
    from polar_cube.spec import load_spec

    spec = load_spec(spec_path)
    return spec, TargetGrid.from_spec(spec, resolution)


def magnetic_file(spec) -> str:
    """The file name of the magnetic anomaly layer, as the spec reads it."""
    (variable,) = spec.variables_of(MAGNETIC_SOURCE)
    return variable.source_file


def resample_original(tif: Path, out: Path, grid) -> None:
    """The original pipeline's method, on our grid (cell centres, both axes ascending)."""
    import rioxarray

    layer = rioxarray.open_rasterio(tif, masked=True).squeeze("band", drop=True)
    dataset = layer.drop_vars("spatial_ref").to_dataset(name="magnetic_anomaly")
    on_grid = dataset.interp(x=grid.x, y=grid.y, method="linear")
    # float32 as published; the cast is lazy, per chunk, so it adds no full-size copy
    chunked = on_grid.chunk({"y": ORIGINAL_CHUNK, "x": ORIGINAL_CHUNK}).astype("float32")
    chunked.to_zarr(out, mode="w", zarr_format=2, consolidated=True)


def resample_ours(source_dir: Path, out: Path, spec, grid) -> None:
    """The build's per-dataset steps for the magnetic source, on local threads."""
    from polar_cube import dataset as ds
    from polar_cube.compute import dask_compute

    fetched = ds.FetchedSource(
        source=spec.source(MAGNETIC_SOURCE),
        folder=source_dir,
        url=(source_dir / magnetic_file(spec)).as_uri(),
        sha256="not computed by the benchmark",
    )
    converted = ds.convert_source(spec, fetched)
    dataset = ds.resample_layers(converted, grid)
    dataset = ds.describe_dataset(dataset, spec, fetched, converted, grid)
    with dask_compute(None):
        ds.write_dataset(dataset, out, grid)


def gdalwarp_command(tif: Path, out: Path, grid) -> list[str]:
    """gdalwarp onto exactly the cube grid (same bbox and resolution), tiled, ZSTD."""
    xmin, ymin, xmax, ymax = grid.bbox
    return [
        "gdalwarp",
        "-multi",
        "-wo",
        "NUM_THREADS=ALL_CPUS",
        "-r",
        "bilinear",
        "-t_srs",
        grid.crs,
        "-te",
        *(f"{v:.10g}" for v in (xmin, ymin, xmax, ymax)),
        "-tr",
        f"{grid.resolution:.10g}",
        f"{grid.resolution:.10g}",
        "-co",
        "TILED=YES",
        "-co",
        "COMPRESS=ZSTD",
        "-co",
        "NUM_THREADS=ALL_CPUS",
        "-co",
        "BIGTIFF=IF_SAFER",
        "-overwrite",
        "-q",
        str(tif),
        str(out),
    ]


def layer_command(
    method: str, python: str, source_dir: Path, out: Path, spec_path: Path, resolution: float
) -> list[str]:
    """The command that runs `method` (one of METHODS) and writes `out`."""
    if method == "gdalwarp":
        spec, grid = load_grid(spec_path, resolution)
        return gdalwarp_command(source_dir / magnetic_file(spec), out, grid)
    return [
        python,
        "-m",
        "bench.layer",
        method,
        str(source_dir),
        str(out),
        "--spec",
        str(spec_path),
        "--resolution",
        f"{resolution:g}",
    ]


def output_name(method: str) -> str:
    return "magnetic_anomaly.tif" if method == "gdalwarp" else "magnetic_anomaly.zarr"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__)
    parser.add_argument("method", choices=["original", "ours"])
    parser.add_argument("source_dir", type=Path, help="folder holding the magnetic GeoTIFF")
    parser.add_argument("out", type=Path, help="the zarr to write (replaced)")
    parser.add_argument("--spec", type=Path, default=Path("cube.geojson"))
    parser.add_argument("--resolution", type=float, help="grid resolution (spec's by default)")
    args = parser.parse_args(argv)
    spec, grid = load_grid(args.spec, args.resolution)
    tif = args.source_dir / magnetic_file(spec)
    if not tif.is_file():
        print(f"bench.layer: error: {tif} not found", file=sys.stderr)
        return 2
    if args.method == "original":
        resample_original(tif, args.out, grid)
    else:
        resample_ours(args.source_dir.resolve(), args.out, spec, grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
