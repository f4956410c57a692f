"""Write the stand-ins of a spec's sources: the ten real ones by their hand-made writers
(`REALISTIC_WRITERS`, by download file name), any other from its spec `standin` entry by the
generic writer of its format (`DESCRIBED_WRITERS`), packed into its tar or zip."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from polar_cube.sources.mirror import served_file_name
from polar_cube.sources.standins.common import DescribedWriter
from polar_cube.sources.standins.geotiff import (
    MAGNETIC_FILE,
    THWAITES_FILE,
    write_described_geotiff,
    write_magnetic_tif,
    write_thwaites_tar,
)
from polar_cube.sources.standins.gmt_netcdf import GHF_FILES, write_described_gmt, write_ghf_grids
from polar_cube.sources.standins.latlon_netcdf import (
    SMOS_FILE,
    write_described_latlon,
    write_smos_nc,
)
from polar_cube.sources.standins.packing import write_tar, zip_bytes
from polar_cube.sources.standins.polygons import (
    WAIS_FILE,
    write_described_polygons,
    write_wais_zip,
)
from polar_cube.spec import SCALES, CubeSpec, Scale, SourceSpec, SpecError, VariableSpec

RealisticWriter = Callable[[Path, Scale], list[Path]]
# The ten real sources' hand-made writers, by download file name (one writer makes all six
# GMT grids): sources with these file names and no `standin` description get them.
REALISTIC_WRITERS: dict[str, RealisticWriter] = {
    **{name: write_ghf_grids for name in GHF_FILES},
    MAGNETIC_FILE: lambda out, scale: [write_magnetic_tif(out / MAGNETIC_FILE, scale)],
    THWAITES_FILE: lambda out, scale: [write_thwaites_tar(out / THWAITES_FILE)],
    WAIS_FILE: lambda out, scale: [write_wais_zip(out / WAIS_FILE, scale)],
    SMOS_FILE: lambda out, scale: [write_smos_nc(out / SMOS_FILE)],
}
# The generic writer of each spec `source_format`, for sources with a `standin` description.
DESCRIBED_WRITERS: dict[str, DescribedWriter] = {
    "geotiff": write_described_geotiff,
    "gmt_netcdf": write_described_gmt,
    "latlon_netcdf": write_described_latlon,
    "polygons": write_described_polygons,
}


def files_read(spec: CubeSpec, source: SourceSpec) -> dict[str, list[VariableSpec]]:
    """{file inside the download: the variables reading it}, in file-name order."""
    readers: dict[str, list[VariableSpec]] = {}
    for variable in spec.variables_of(source.id):
        for name in variable.files_by_time.values():
            readers.setdefault(name, []).append(variable)
    return dict(sorted(readers.items()))


def write_described_standin(
    spec: CubeSpec, source: SourceSpec, out_dir: Path, scale: Scale
) -> Path:
    """The download of `source` from its spec `standin` description: the files its variables
    read (each time step its own field), packed into its tar or zip when it has one, written
    as ``out_dir / <the download URL's file name>``."""
    if source.standin is None:
        raise SpecError(f"source {source.id!r}: has no 'standin' description")
    target = out_dir / served_file_name(source.download_url)
    readers = files_read(spec, source)
    if not readers:
        raise SpecError(f"source {source.id!r}: no variable reads it, so no stand-in is made")
    write = DESCRIBED_WRITERS[source.source_format]
    if source.compression_format is None:
        write(target, source, next(iter(readers.values())), scale, source.standin.seed)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        members: dict[str, bytes] = {}
        for number, (name, variables) in enumerate(readers.items()):
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = source.standin.seed + 1000 * number
            for written in write(path, source, variables, scale, seed):
                members[written.relative_to(tmp).as_posix()] = written.read_bytes()
    if source.compression_format == "zip":
        target.write_bytes(zip_bytes(dict(sorted(members.items()))))
    else:
        write_tar(target, members)
    return target


def make_standins(
    out_dir: Path, scale: Scale = "small", spec: CubeSpec | None = None
) -> list[Path]:
    """Write a stand-in of every source download into out_dir (flat, each under its download
    URL's file name, as the mirror serves them); return their paths. Without `spec`: the ten
    real sources. A source with a `standin` description gets a described stand-in, one
    without it the realistic writer of its file name. Idempotent: overwrites."""
    if scale not in SCALES:
        raise ValueError(f"scale must be 'small' or 'full', not {scale!r}")
    sources = [] if spec is None else spec.sources
    described = [s for s in sources if s.standin is not None]
    realistic = [s for s in sources if s.standin is None]
    missing = [s.id for s in realistic if served_file_name(s.download_url) not in REALISTIC_WRITERS]
    if missing:
        raise SpecError(
            f"no stand-in for source(s) {', '.join(missing)}: describe one in the source's "
            "'standin' entry (see docs/adding-a-source.md)"
        )
    if spec is None:
        writers = dict.fromkeys(REALISTIC_WRITERS.values())
    else:
        names = [served_file_name(s.download_url) for s in realistic]
        writers = dict.fromkeys(REALISTIC_WRITERS[name] for name in names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [path for writer in writers for path in writer(out_dir, scale)]
    paths += [write_described_standin(spec, s, out_dir, scale) for s in described]
    return list(dict.fromkeys(paths))
