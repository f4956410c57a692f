"""Adding a source in one place: docs/adding-a-source.md's 11th source (a GeoTIFF) goes from
spec entry to published cube with no code change. The JSON and YAML are read from the page
(its blocks marked `<!-- snippet: source-entry -->`, `variable-entry` and `patch-lines`)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import yaml

from polar_cube.cube import target as steps
from polar_cube.dataset import (
    InVersion,
    convert_source,
    dataset_is_current,
    describe_dataset,
    resample_layers,
    write_dataset,
)
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.sources.fetch import fetch_source
from polar_cube.sources.mirror import serving_mirror
from polar_cube.sources.standins import make_standins, write_described_standin
from polar_cube.spec import CubeSpec, SpecError, load_spec
from tests.conftest import REPO
from tests.snippets import snippet

RESOLUTION = 3000.0  # divides the bbox: 651 x 707 cells


def write_extended_spec(folder: Path) -> tuple[Path, Path]:
    """my-cube.geojson and my-patch.yaml: the repo's, plus what the page appends."""
    source = json.loads(snippet("docs/adding-a-source.md", "source-entry"))
    variable = json.loads(snippet("docs/adding-a-source.md", "variable-entry"))
    document = json.loads((REPO / "cube.geojson").read_text())
    document["properties"]["sources"].append(source)
    document["properties"]["variables"].append(variable)
    spec_path = folder / "my-cube.geojson"
    spec_path.write_text(json.dumps(document, indent=2))
    patch_lines = snippet("docs/adding-a-source.md", "patch-lines")  # entries under `metadata:`
    patch = yaml.safe_load((REPO / "patch.yaml").read_text())
    patch["metadata"].update(yaml.safe_load(patch_lines))
    patch_path = folder / "my-patch.yaml"
    patch_path.write_text(yaml.safe_dump(patch, sort_keys=False))
    return spec_path, patch_path


def new_source_and_variable(spec: CubeSpec):
    source = spec.sources[-1]
    (variable,) = spec.variables_of(source.id)
    return source, variable


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )


def standin_values(path: Path) -> np.ndarray:
    with rasterio.open(path) as tif:
        return tif.read(1, masked=True).filled(np.nan)


def test_the_page_adds_one_source_and_one_variable(tmp_path):
    spec_path, _ = write_extended_spec(tmp_path)
    repo, spec = load_spec(REPO / "cube.geojson"), load_spec(spec_path)
    assert len(spec.sources) == len(repo.sources) + 1
    assert len(spec.variables) == len(repo.variables) + 1
    source, variable = new_source_and_variable(spec)
    assert (source.source_format, source.compression_format) == ("geotiff", None)
    assert source.standin is not None and variable.source_file == source.file_name
    assert "standin" not in source.model_dump()  # not part of any fingerprint
    result = run_cli("spec", "check", spec_path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{len(spec.variables)} variables from {len(spec.sources)} sources" in result.stdout


def test_a_source_without_a_standin_is_named(tmp_path):
    spec_path, _ = write_extended_spec(tmp_path)
    document = json.loads(spec_path.read_text())
    del document["properties"]["sources"][-1]["standin"]
    spec_path.write_text(json.dumps(document))
    result = run_cli("sources", "make", "--spec", spec_path.name, "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"polar-cube: error: {spec_path.name}: no stand-in for source(s) bed_elevation_demo: "
        "describe one in the source's 'standin' entry (see docs/adding-a-source.md)"
    ]
    with pytest.raises(SpecError, match="bed_elevation_demo"):
        make_standins(tmp_path / "lib", "small", load_spec(spec_path))


def test_the_new_source_becomes_a_dataset_without_prefect(tmp_path):
    """Stand-in -> HTTP mirror -> download -> reader -> resample -> per-dataset cube written
    into a cube version (chunks in its cube, metadata in its `.inputs/`)."""
    spec = load_spec(write_extended_spec(tmp_path)[0])
    source, variable = new_source_and_variable(spec)
    standins = tmp_path / "sources"
    standins.mkdir()
    standin = write_described_standin(spec, source, standins, "small")
    assert standin.name == source.file_name
    values = standin_values(standin)
    low, high = source.standin.values
    assert low <= np.nanmin(values) < np.nanmax(values) <= high
    assert 0.6 < np.isfinite(values).mean() < 0.95  # valid_fraction 0.8, roughly

    grid = TargetGrid.from_spec(spec, RESOLUTION)
    with serving_mirror(standins) as mirror:
        fetched = fetch_source(source, tmp_path / "cache", mirror=mirror)
    converted = convert_source(spec, fetched)
    dataset = describe_dataset(resample_layers(converted, grid), spec, fetched, converted, grid)
    location = StoreLocation.local(tmp_path / "cube")
    keys = VersionKeys(spec.at_resolution(RESOLUTION).data_id)
    into = InVersion(location, keys, source.id)
    write_dataset(dataset, into, grid)  # as `build-cube` writes it: into the new version
    assert dataset_is_current(into, spec, fetched, grid)
    metadata = xr.open_zarr(into.metadata.root, consolidated=True)
    assert set(metadata.data_vars) - {"crs"} == {variable.name}
    assert metadata.attrs["polar_cube_source_id"] == source.id
    # its chunks are in the version's cube: merged alone, the cube shows the layer
    alone = spec.model_copy(update={"sources": [source], "variables": [variable]})
    staged = steps.stage_merged_cube(location, alone.at_resolution(RESOLUTION), grid)
    cube = steps.open_cube(location, staged.key)
    assert set(cube.data_vars) - {"crs"} == {variable.name}
    check_layer(cube[variable.name], source, variable, values, grid)


def check_layer(data: xr.DataArray, source, variable, standin: np.ndarray, grid) -> None:
    """The resampled layer: the variable's attributes, values inside the stand-in's range, and
    about as many valid cells as the stand-in's valid area covers on the grid."""
    assert data.dims == variable.dims and data.dtype == np.float32
    assert data.attrs["units"] == variable.units
    assert data.attrs["long_name"] == variable.long_name
    values = data.values
    assert np.nanmin(standin) <= np.nanmin(values) < np.nanmax(values) <= np.nanmax(standin)
    xmin, ymin, xmax, ymax = source.standin.bounds  # inside the cube's bbox
    expected = (xmax - xmin) * (ymax - ymin) / grid.resolution**2 * np.isfinite(standin).mean()
    assert abs(np.isfinite(values).sum() - expected) < 0.05 * expected


# The page's commands, build included, run as written: tests/test_snippets.py
# (test_adding_a_source_builds_the_cube_as_the_page_says).
