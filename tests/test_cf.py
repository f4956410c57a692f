"""CF 1.10: the cubes pass the IOOS compliance checker's `cf:1.10` but for what zarr itself
causes, and the same rules hold in the stored metadata.

The checker reads zarr through netCDF-C's NCZarr (`file://…#mode=nczarr,file`), which types
JSON attributes by their values unless `_nczarr_attr` says otherwise: `flag_values` must be
float32 like the lake masks (`zarr_store.typed_attrs`). The only findings of high or medium
priority left are those of the format and of the readers' conventions (`ZARR_CAUSED`):

- §2.1 the file name must end with ".nc" (a zarr store is a folder `*.zarr`);
- §5.6 "grid mapping variable crs must exist", once per data variable: netCDF-C 4.10.1
  suppresses zarr arrays of rank 0 ("Empty shape for variable … suppressed",
  Unidata/netcdf-c#3108, fixed after it by #3109), and `crs` is the CF scalar grid mapping.
  `stored_cf_problems` checks it instead: it exists with a `grid_mapping_name`;
- §2.3 "attribute <variable>:_CRS should begin with a letter", once per data variable:
  `_CRS` is GDAL's Zarr CRS attribute (GDAL before 3.9 does not read CF grid mappings).

Fast tests check the attribute code without the checker; the slow ones build the cube from
the small stand-ins and run the checker on it and on every per-dataset cube.
"""

import json
import re
import shutil
import types
from collections import Counter
from pathlib import Path

import dask.array as da
import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from osgeo import gdal

from polar_cube.cube import merge
from polar_cube.cube.patching import load_patch, patch_metadata
from polar_cube.dataset import (
    OUTPUT_LAYOUT,
    ConvertedVariable,
    FetchedSource,
    dataset_fingerprint,
    describe_dataset,
)
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.zarr_store import (
    CF_CONVENTIONS,
    FINGERPRINT_ATTR,
    GRID_MAPPING,
    NCZARR_ATTR,
    VALUE_TYPED_ATTRS,
    add_grid_coords,
    encoding_for,
    typed_attrs,
    write_zarr_atomically,
)
from tests.conftest import REPO

gdal.UseExceptions()
# the checker's import warns about one of its other checkers
pytestmark = pytest.mark.filterwarnings("ignore:The ioos_sos checker is deprecated")
SPEC = load_spec(REPO / "cube.geojson")
SMALL = TargetGrid("EPSG:3031", (-2_602_500, -1_626_000, -2_502_500, -1_546_000), 500, 64)
TIMES = pd.DatetimeIndex(["2013-01-01", "2017-01-01"])
LAKES = "subglacial_lakes_thwaites"  # four time-stepped 0/1 masks with flag_values
CF_CHECK = "cf:1.10"
# CF §2.2: char, byte, short, int, float, double (the cubes use no int64 nor unsigned types)
CF_DTYPES = {"|S1", "|i1", "<i2", "<i4", "<f4", "<f8"}


def cf_words(conventions: str) -> list[str]:
    """`Conventions` as the cf checks read it: words split at commas or blanks."""
    return [word for word in re.split(r",|\s+", conventions) if word]


def file_name_error(cube: Path) -> tuple[str, str, str]:
    """§2.1, which every zarr store gets: the checker read it."""
    url = f"{cube.as_uri()}#mode=nczarr,file"
    return ("high", "§2.1 Filename", f'Dataset path {url} must end with ".nc"')


def zarr_caused(cube: Path, data_variables: list[str]) -> Counter:
    """The checker's findings of high and medium priority that zarr and its readers cause
    (see the module's doc), for `cube` with these grid-mapped data variables."""
    section_5_6 = "§5.6 Horizontal Coordinate Reference Systems, Grid Mappings, Projections"
    found = Counter({file_name_error(cube): 1})
    found[("high", section_5_6, "grid mapping variable crs must exist in this dataset")] = len(
        data_variables
    )
    for name in data_variables:
        message = (
            f"attribute {name}:_CRS should begin with a letter and be composed of letters, "
            "digits, and underscores"
        )
        found[("medium", "§2.3 Naming Conventions", message)] = 1
    return found


def run_cf_checker(path: Path) -> Counter:
    """(priority, section, message) of every high or medium priority finding of the IOOS
    compliance checker's `cf:1.10` on the zarr at `path`; fails if a check itself crashed."""
    from compliance_checker.runner import CheckSuite

    CheckSuite.load_all_available_checkers()
    suite = CheckSuite()
    dataset = suite.load_dataset(str(path))
    try:
        ((groups, crashed),) = suite.run_all(dataset, [CF_CHECK], skip_checks=[]).values()
    finally:
        dataset.close()
    assert not crashed, {name: repr(error) for name, (error, _) in crashed.items()}
    found: Counter = Counter()
    for result in groups:
        if result.weight >= 2 and result.value[0] < result.value[1]:
            priority = "high" if result.weight == 3 else "medium"
            for message in result.msgs or ["(no message)"]:
                found[(priority, result.name, message)] += 1
    return found


def stored_cf_problems(cube: Path) -> list[str]:
    """The CF rules of the issue, checked on the consolidated metadata (JSON) of `cube`:
    value-typed attributes typed like their variable (NCZarr hints), x/y/time described
    with their axis, CF data types, Conventions, and the scalar grid mapping."""
    metadata = json.loads((cube / ".zmetadata").read_text())["metadata"]
    problems = []
    conventions = cf_words(metadata[".zattrs"].get("Conventions", ""))
    if CF_CONVENTIONS not in conventions:
        problems.append(f"Conventions {conventions} lacks {CF_CONVENTIONS}")
    arrays = sorted(key.removesuffix("/.zarray") for key in metadata if key.endswith("/.zarray"))
    for name in arrays:
        dtype = metadata[f"{name}/.zarray"]["dtype"]
        attrs = metadata.get(f"{name}/.zattrs", {})
        if dtype not in CF_DTYPES:
            problems.append(f"{name}: dtype {dtype} is not a CF type the cubes use")
        hints = attrs.get(NCZARR_ATTR, {}).get("types", {})
        for attr in VALUE_TYPED_ATTRS:
            if attr in attrs and hints.get(attr) != dtype:
                problems.append(f"{name}: {attr} typed {hints.get(attr)}, the variable {dtype}")
            if attr in attrs and dtype[1] == "f" and not _all_floats(attrs[attr]):
                problems.append(f"{name}: {attr} {attrs[attr]} are not floats")
        if attrs.get("grid_mapping") not in (None, GRID_MAPPING):
            problems.append(f"{name}: grid_mapping {attrs['grid_mapping']}")
    expected = {
        "x": {"axis": "X", "standard_name": "projection_x_coordinate", "units": "m"},
        "y": {"axis": "Y", "standard_name": "projection_y_coordinate", "units": "m"},
        "time": {"axis": "T", "standard_name": "time", "long_name": "time"},
        "crs": {"latitude_of_projection_origin": -90.0, "grid_mapping_name": "polar_stereographic"},
    }
    for name, wanted in expected.items():
        attrs = metadata.get(f"{name}/.zattrs")
        if attrs is None:
            if name != "time":
                problems.append(f"{name}: missing")
            continue
        for attr, value in wanted.items():
            if attrs.get(attr) != value:
                problems.append(f"{name}: {attr} is {attrs.get(attr)!r}, not {value!r}")
    crs = metadata.get(f"{GRID_MAPPING}/.zattrs", {})
    if metadata.get(f"{GRID_MAPPING}/.zarray", {}).get("shape") != [] or not crs.get(
        "grid_mapping_name"
    ):
        problems.append(f"{GRID_MAPPING}: not a scalar grid mapping variable")
    return problems


def _all_floats(value) -> bool:
    return all(isinstance(v, float) for v in np.atleast_1d(np.asarray(value, dtype=object)))


def lake_dataset(grid: TargetGrid) -> tuple[xr.Dataset, FetchedSource, list]:
    """The Thwaites lake masks (0/1 with NaN) on `grid`, as `resample_layers` gives them,
    with what `describe_dataset` needs to know of their source."""
    source = SPEC.source(LAKES)
    variables = SPEC.variables_of(LAKES)
    rows, columns = np.mgrid[0 : grid.height, 0 : grid.width]
    arrays = {}
    for index, variable in enumerate(variables):
        steps = [((rows // 7 + columns // 5 + index + t) % 2).astype("float32") for t in (0, 1)]
        steps[0][:3] = np.nan
        data = da.from_array(np.stack(steps), chunks=(1, grid.chunk_size, grid.chunk_size))
        arrays[variable.name] = (("time", "y", "x"), data)
    dataset = xr.Dataset(arrays, coords={"time": TIMES})
    fetched = FetchedSource(source, Path("/nowhere"), source.download_url, "0" * 64)
    layer = types.SimpleNamespace(description="Read a stand-in", crs=grid.crs)
    converted = [ConvertedVariable(v, dict.fromkeys(v.files_by_time, layer)) for v in variables]
    return dataset, fetched, converted


@pytest.fixture(scope="module")
def lake_cube(tmp_path_factory) -> Path:
    """A per-dataset cube written as the build writes it: described, then the writing pass."""
    dataset, fetched, converted = lake_dataset(SMALL)
    described = describe_dataset(dataset, SPEC, fetched, converted, SMALL)
    target = tmp_path_factory.mktemp("cf") / f"{LAKES}.zarr"
    return write_zarr_atomically(described, target, SMALL.chunk_size)


# --- fast: the attribute code, without the checker ---------------------------------------


def test_grid_coords_give_axes_time_attributes_and_typed_flags():
    dataset = xr.Dataset(
        {
            "mask": (("time", "y", "x"), np.zeros((2, SMALL.height, SMALL.width), "float32")),
            "plain": (("y", "x"), np.zeros((SMALL.height, SMALL.width), "float32")),
        },
        coords={"time": TIMES},
    )
    dataset["mask"].attrs = {"flag_values": [0, 1], "valid_range": [0, 1], "units": "1"}
    described = add_grid_coords(dataset, SMALL)
    assert described.x.attrs["axis"] == "X" and described.y.attrs["axis"] == "Y"
    assert described.time.attrs == {
        "standard_name": "time",
        "long_name": "time",
        "axis": "T",
        "coverage_content_type": "coordinate",
    }
    assert described.crs.attrs["latitude_of_projection_origin"] == -90.0  # CF: which pole
    mask = described["mask"].attrs
    assert mask["flag_values"] == [0.0, 1.0] and all(
        isinstance(v, float) for v in mask["flag_values"]
    )
    assert mask[NCZARR_ATTR] == {"types": {"flag_values": "<f4", "valid_range": "<f4"}}
    assert mask["units"] == "1" and mask["grid_mapping"] == GRID_MAPPING
    assert NCZARR_ATTR not in described["plain"].attrs  # nothing to type, no hint
    encoding = encoding_for(described, SMALL.chunk_size)
    assert encoding["time"]["dtype"] == "int32"  # int32: readers of CF before 1.9 know no int64
    assert encoding["mask"]["dtype"] == "float32"


def test_typed_attrs_round_to_float32_and_keep_other_hints():
    attrs = {"valid_min": 0.1, "long_name": "x", NCZARR_ATTR: {"types": {"long_name": ">S1"}}}
    typed = typed_attrs(attrs)
    assert typed["valid_min"] == float(np.float32(0.1))
    assert typed[NCZARR_ATTR] == {"types": {"long_name": ">S1", "valid_min": "<f4"}}
    assert typed_attrs({"units": "m"}) == {"units": "m"}
    assert typed_attrs({"flag_values": [0, 1]}, "int32")[NCZARR_ATTR]["types"] == {
        "flag_values": "<i4"
    }


def test_conventions_name_the_checked_cf_version():
    """The merged cube follows CF 1.10 and uses ACDD 1.3's global attributes; the checkers
    read `Conventions` differently (cf: commas or blanks; acdd: commas only)."""
    grid = TargetGrid.from_spec(SPEC, 3000.0)
    for where, conventions in (
        ("cube.geojson", SPEC.metadata["Conventions"]),
        ("patch.yaml", load_patch(REPO / "patch.yaml")[".zattrs"]["Conventions"]),
        ("merged cube", merge.cube_attributes(SPEC, grid, {})["Conventions"]),
    ):
        assert cf_words(conventions) == [CF_CONVENTIONS, "ACDD-1.3"], where
        assert "ACDD-1.3" in conventions.replace(" ", "").split(","), where
    without = SPEC.model_copy(update={"metadata": {}})
    assert merge.cube_attributes(without, grid, {})["Conventions"] == CF_CONVENTIONS


def test_a_per_dataset_cube_keeps_the_cf_rules(lake_cube):
    assert stored_cf_problems(lake_cube) == []
    attrs = json.loads((lake_cube / ".zmetadata").read_text())["metadata"][".zattrs"]
    assert attrs["Conventions"] == CF_CONVENTIONS


def test_netcdf_c_reads_flags_in_the_variables_type(lake_cube):
    """What the checker sees, through the same library (netCDF-C's NCZarr)."""
    with netCDF4.Dataset(f"file://{lake_cube}#mode=nczarr,file") as nc:
        for variable in SPEC.variables_of(LAKES):
            data = nc[variable.name]
            assert data.dtype == np.float32
            assert data.flag_values.dtype == data.dtype, variable.name
            assert data.flag_values.tolist() == [0.0, 1.0]
            assert NCZARR_ATTR not in data.ncattrs()  # netCDF-C reads the hint, shows none
        assert nc["time"].dtype == np.int32 and nc["time"].axis == "T"
        assert (nc["x"].axis, nc["y"].axis) == ("X", "Y")
        assert nc.Conventions == CF_CONVENTIONS


def test_xarray_and_gdal_still_read_it(lake_cube):
    cube = xr.open_zarr(lake_cube, consolidated=True)
    for variable in SPEC.variables_of(LAKES):
        attrs = cube[variable.name].attrs
        assert not [k for k in attrs if k.startswith("_nc")]  # xarray hides `_nc*`
        assert attrs["flag_values"] == [0.0, 1.0] and attrs["flag_meanings"] == "no_lake lake"
    assert cube.time.values.tolist() == TIMES.values.tolist()
    assert cube.time.encoding["dtype"] == np.int32
    raster = gdal.Open(f'ZARR:"{lake_cube}":/thw_70:1')  # the second time step
    assert raster.GetSpatialRef().GetAuthorityCode(None) == "3031"
    assert np.nanmax(raster.ReadAsArray()) == 1.0


def test_the_merge_types_flags_of_inputs_written_before(lake_cube, tmp_path, monkeypatch):
    """`--only` merges inputs of earlier builds: their int flag_values without hints come
    out typed in the merged cube's metadata, and the merged fingerprint names the layout."""
    location = StoreLocation.local(tmp_path)
    spec = SPEC.model_copy(
        update={"variables": SPEC.variables_of(LAKES), "sources": [SPEC.source(LAKES)]}
    )
    keys = VersionKeys(spec.data_id)
    old = Path(location.path(keys.input_key(LAKES)))  # its metadata in the version
    shutil.copytree(lake_cube, old)
    zmetadata = json.loads((old / ".zmetadata").read_text())
    untyped = 0
    for key, attrs in zmetadata["metadata"].items():
        if key.endswith("/.zattrs") and NCZARR_ATTR in attrs:
            attrs.pop(NCZARR_ATTR)
            attrs["flag_values"] = [0, 1]
            untyped += 1
    assert untyped == len(spec.variables)
    (old / ".zmetadata").write_text(json.dumps(zmetadata))
    inputs = {keys.input_key(LAKES): xr.open_zarr(old, consolidated=True)}
    stored = merge.stored_variables(location, keys, inputs, spec, SMALL)
    assert [v.name for v in stored] == [v.name for v in spec.variables]
    for variable in stored:
        assert variable.input_key == keys.input_key(LAKES)
        assert variable.zattrs["flag_values"] == [0.0, 1.0]
        assert variable.zattrs[NCZARR_ATTR] == {"types": {"flag_values": "<f4"}}
    fingerprints = merge.input_fingerprints(inputs)
    assert fingerprints == {LAKES: inputs[keys.input_key(LAKES)].attrs[FINGERPRINT_ATTR]}
    before = merge.cube_fingerprint(spec, SMALL, fingerprints)
    monkeypatch.setattr(merge, "MERGED_LAYOUT", "the merge before CF-1.10")
    assert merge.cube_fingerprint(spec, SMALL, fingerprints) != before


def test_per_dataset_cubes_are_rebuilt_for_the_cf_attributes(monkeypatch):
    """Their fingerprint covers OUTPUT_LAYOUT, which names the CF version: cubes written with
    the old attributes are not reused."""
    from polar_cube import dataset as dataset_module

    _, fetched, _ = lake_dataset(SMALL)
    assert CF_CONVENTIONS in OUTPUT_LAYOUT
    current = dataset_fingerprint(SPEC, fetched, SMALL)
    monkeypatch.setattr(dataset_module, "OUTPUT_LAYOUT", "the layout before CF-1.10")
    assert dataset_fingerprint(SPEC, fetched, SMALL) != current


def test_a_patch_setting_flags_types_them_too():
    cube = xr.Dataset(
        {"thw_70": (("y", "x"), np.zeros((2, 2), "float32"), {"flag_values": [0.0, 1.0]})}
    )
    patched = patch_metadata({"thw_70/.zattrs": {"valid_range": [0, 1]}}, cube, "patch.yaml")
    entry = patched["thw_70/.zattrs"]
    assert entry["valid_range"] == [0.0, 1.0]
    assert entry[NCZARR_ATTR] == {"types": {"flag_values": "<f4", "valid_range": "<f4"}}
    deleted = patch_metadata({"thw_70/.zattrs": {"flag_values": "__delete__"}}, cube, "p.yaml")
    assert deleted["thw_70/.zattrs"] == {"flag_values": "__delete__", NCZARR_ATTR: "__delete__"}
    untouched = patch_metadata({"thw_70/.zattrs": {"color_bar_name": "GnBu"}}, cube, "p.yaml")
    assert untouched["thw_70/.zattrs"] == {"color_bar_name": "GnBu"}


# --- the IOOS compliance checker ---------------------------------------------------------


def test_the_checker_finds_only_what_zarr_causes_in_a_per_dataset_cube(lake_cube):
    """Fast enough to run always: a small per-dataset cube with time and flags."""
    found = run_cf_checker(lake_cube)
    assert found[file_name_error(lake_cube)] == 1  # the checker did read the cube
    allowed = zarr_caused(lake_cube, [v.name for v in SPEC.variables_of(LAKES)])
    assert found - allowed == Counter(), sorted(found - allowed)


@pytest.fixture(scope="module")
def built(small_standins, tmp_path_factory):
    """The whole cube at 3000 m from the small stand-ins, published into a local folder by
    the build flow, and the folder of its per-dataset cubes (their metadata: the chunks are
    in the cube)."""
    from polar_cube.flows.build_cube import build_cube

    work = tmp_path_factory.mktemp("cf-build")
    with serving_mirror(small_standins) as mirror:
        result = build_cube(
            spec_path=str(REPO / "cube.geojson"),
            resolution=3000.0,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            output_dir=str(work / "cube"),
            patch_path=str(REPO / "patch.yaml"),
        )
    cube = Path(result.url)
    assert not result.reused and cube.name == SPEC.at_resolution(3000.0).data_id
    return cube, cube.with_suffix(".inputs")


def checked_cubes(built) -> list[tuple[Path, list[str]]]:
    """Every cube of the build with its data variables: the published cube, its level 1,
    and the per-dataset cubes (their metadata in the version's `.inputs/`)."""
    published, datasets = built
    spec_names = [v.name for v in SPEC.variables]
    cubes = [(published, spec_names), (published.with_suffix(".levels") / "1.zarr", spec_names)]
    for source in SPEC.sources:
        cubes.append(
            (datasets / f"{source.id}.zarr", [v.name for v in SPEC.variables_of(source.id)])
        )
    return cubes


@pytest.mark.slow
def test_every_built_cube_passes_cf_1_10_but_for_what_zarr_causes(built):
    unexpected = {}
    for cube, names in checked_cubes(built):
        found = run_cf_checker(cube)
        assert found[file_name_error(cube)] == 1, f"{cube}: the checker did not read it"
        allowed = zarr_caused(cube, names)
        if found - allowed:
            unexpected[cube.name] = sorted(found - allowed)
    assert unexpected == {}


@pytest.mark.slow
def test_every_built_cube_keeps_the_cf_rules_in_its_metadata(built):
    problems = {str(cube): stored_cf_problems(cube) for cube, _ in checked_cubes(built)}
    assert {cube: found for cube, found in problems.items() if found} == {}


@pytest.mark.slow
def test_the_published_cube_opens_with_xarray_and_gdal(built):
    published, _ = built
    cube = xr.open_zarr(published, consolidated=True)
    assert cf_words(cube.attrs["Conventions"]) == [CF_CONVENTIONS, "ACDD-1.3"]
    assert not [k for v in cube.variables.values() for k in v.attrs if k.startswith("_nc")]
    assert cube.supraglacial_lakes.attrs["flag_values"] == [0.0, 1.0, 2.0]
    assert cube.time.attrs["axis"] == "T" and cube.x.attrs["axis"] == "X"
    for name in ("thw_70:0", "supraglacial_lakes", "magnetic_anomaly"):
        raster = gdal.Open(f'ZARR:"{published}":/{name}')
        assert raster.GetSpatialRef().GetAuthorityCode(None) == "3031", name
        assert np.isfinite(raster.ReadAsArray()).any(), name
