"""Patch the cube's metadata with xcube's patch (`xcube patch` semantics, `__delete__` too):
our patch.yaml plus attributes generated from the run."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xarray as xr
import yaml

from polar_cube.errors import PolarCubeError, read_input_file
from polar_cube.location import StoreLocation
from polar_cube.spec import zarr_layout
from polar_cube.version import software_version
from polar_cube.zarr_store import (
    NCZARR_ATTR,
    VALUE_TYPED_ATTRS,
    typed_attrs,
    zarr3_consolidation,
)

PATCH_ATTR = "polar_cube_patch_sha256"
DELETE = "__delete__"  # xcube's value for removing an attribute


class PatchError(PolarCubeError, ValueError):
    """The patch file is invalid or names what the cube does not have."""


def load_patch(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a patch file in xcube's consolidated-metadata format: {'.zattrs': …, 'v/.zattrs': …}."""
    import click
    from xcube.cli.patch import parse_metadata

    path = Path(path)
    try:
        document = yaml.safe_load(read_input_file(path, "patch file", PatchError))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PatchError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # xcube only warns about entries it ignores
            return parse_metadata(document)
    except (click.ClickException, UserWarning) as error:
        message = error.format_message() if isinstance(error, click.ClickException) else error
        raise PatchError(f"{path}: {message}") from None


def check_patch_targets(
    patch: dict[str, dict[str, Any]], names: Iterable[str], patch_path: str | Path
) -> None:
    """Refuse entries for variables not among `names` (the cube's variables and coordinates)."""
    names = set(names)
    unknown = sorted(
        k.split("/")[0] for k in patch if k != ".zattrs" and k.split("/")[0] not in names
    )
    if unknown:
        raise PatchError(
            f"{patch_path}: entries for variables the cube does not have: {', '.join(unknown)} "
            f"(it has: {', '.join(sorted(names))})"
        )


def patch_metadata(
    patch: dict[str, dict[str, Any]], cube: xr.Dataset, patch_path: str | Path
) -> dict[str, dict[str, Any]]:
    """The patch plus generated attributes; refuses entries for variables not in the cube.
    Value-typed attributes it sets (`flag_values`, `valid_range` …) get their variable's
    type, as the build gives them (`zarr_store.typed_attrs`)."""
    check_patch_targets(patch, map(str, cube.variables), patch_path)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    generated = {"date_modified": now, "processing_software": software_version()}
    metadata = {key: _typed_entry(key, dict(value), cube) for key, value in patch.items()}
    metadata[".zattrs"] = {**metadata.get(".zattrs", {}), **generated}
    metadata[".zattrs"][PATCH_ATTR] = patch_digest(patch)
    return metadata


def _typed_entry(key: str, entry: dict[str, Any], cube: xr.Dataset) -> dict[str, Any]:
    """A variable's patch entry with its value-typed attributes in the variable's type and
    the NCZarr type hints for all such attributes it has after the patch (xcube replaces the
    hints attribute whole)."""
    name = key.split("/")[0]
    if key == ".zattrs" or not any(attr in entry for attr in VALUE_TYPED_ATTRS):
        return entry
    if cube[name].dtype.kind not in "iuf":  # e.g. time, decoded to datetime64
        return entry
    patched = {k: v for k, v in {**cube[name].attrs, **entry}.items() if not _deletes(v)}
    typed = typed_attrs(patched, str(cube[name].dtype))
    values = {k: typed[k] for k in VALUE_TYPED_ATTRS if k in entry and not _deletes(entry[k])}
    return {**entry, **values, NCZARR_ATTR: typed.get(NCZARR_ATTR, DELETE)}


def _deletes(value: Any) -> bool:
    return isinstance(value, str) and value == DELETE


def patch_digest(patch: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(patch, sort_keys=True, default=str).encode()).hexdigest()


def apply_patch(location: StoreLocation, key: str, metadata: dict[str, dict[str, Any]]) -> None:
    """xcube's patch_dataset on the cube at `key`; it re-consolidates the metadata."""
    from xcube.cli.patch import patch_dataset

    if zarr_layout(key)[0] == 3:  # xcube's patch opens and consolidates either format
        with zarr3_consolidation():
            patch_dataset(location.url(key), location.storage_options, metadata, dry_run=False)
        return
    patch_dataset(location.url(key), location.storage_options, metadata, dry_run=False)
