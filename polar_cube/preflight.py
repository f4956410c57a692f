"""Checks of a build's inputs before anything starts (no Prefect, no downloads): the spec, the
resolution, the variables asked for, the patch file and the local folders written into.

They take a second or two, so a typo never waits for a Prefect server to start or for hours
of work to fail at the end.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polar_cube.cube.patching import check_patch_targets, load_patch
from polar_cube.errors import OptionError, environment_problem
from polar_cube.grid import TargetGrid
from polar_cube.spec import CubeSpec, SpecError, load_spec, resolution_problem
from polar_cube.zarr_store import GRID_MAPPING

CUBE_FORMATS = ("zarr", "icechunk")


@dataclass(frozen=True)
class CheckedBuild:
    spec: CubeSpec
    grid: TargetGrid
    patch: dict | None


def check_build(
    spec_path: str | Path,
    *,
    resolution: float | None = None,
    only: list[str] | None = None,
    patch_path: str | Path | None = None,
    folders: dict[str, str | Path | None] | None = None,
) -> CheckedBuild:
    """Validate everything a build is given; raise SpecError, PatchError or OptionError.

    `folders`: {option name: local folder the build writes into}; None values are skipped.
    """
    spec = load_spec(spec_path)
    if resolution is not None:
        problem = resolution_problem(resolution, spec.spatial_bbox)
        if problem:
            raise OptionError(
                f"--resolution {resolution:g}: {problem}; the bbox is properties.spatial_bbox "
                f"of {spec_path}"
            )
    spec = spec.at_resolution(resolution)  # its name says the resolution
    grid = TargetGrid.from_spec(spec)
    try:
        spec.select_sources(only)
    except SpecError as error:
        raise OptionError(f"--only: {error}") from None
    patch = None
    if patch_path is not None:
        patch = load_patch(patch_path)
        check_patch_targets(patch, cube_names(spec), patch_path)
    for option, folder in (folders or {}).items():
        if folder is not None:
            check_writable_folder(option, Path(folder))
    return CheckedBuild(spec, grid, patch)


def check_cube_format(cube_format: str, zarr_format: int) -> None:
    """`cube_format` is "zarr" or "icechunk"; Icechunk holds zarr 3 only."""
    if cube_format not in CUBE_FORMATS:
        raise OptionError(f"--format {cube_format}: not one of {', '.join(CUBE_FORMATS)}")
    if cube_format == "icechunk" and zarr_format != 3:
        raise OptionError(
            f"--format icechunk holds zarr 3, not --zarr-format {zarr_format}",
            hint="leave out --zarr-format, or give --zarr-format 3",
        )


def cube_names(spec: CubeSpec) -> set[str]:
    """The variables and coordinates the merged cube will have."""
    names = {v.name for v in spec.variables} | {GRID_MAPPING, "x", "y"}
    if any(v.dims[0] == "time" for v in spec.variables):
        names.add("time")
    return names


def check_writable_folder(option: str, folder: Path) -> None:
    """The folder, or the nearest existing folder above it, takes new files."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"{option} {folder}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".polar-cube-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        problem = environment_problem(error) or error.strerror
        raise OptionError(f"{option} {folder}: cannot write into {existing}: {problem}") from None
