"""Issue 22: metadata that passes the community's checkers, CF-1.10 and ACDD-1.3 (the IOOS
compliance checker), exported as CF netCDF with every attribute, and a gate in every build.

Fast tests: the attribute encoding round trip, the gate's comparison, the spec's names
against the CF standard-name table the checker ships. Then a cube built at 3000 m from the
small stand-ins (module fixture): its netCDF export passes cf:1.10 with no finding at all and
acdd:1.3 but for what README's list explains (`ACDD_LEFT`), opens in xarray and GDAL with
every attribute of the zarr recoverable; the gate's sample finds what the full export finds;
the CLI's `export` and `check-metadata`. The slow one: a spec with a broken attribute fails
its build's gate, and nothing is published.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from osgeo import gdal

from polar_cube.cube.compliance import (
    Finding,
    MetadataGateError,
    MetadataReport,
    check_cube,
    check_netcdf,
    compare,
    gate,
)
from polar_cube.cube.export import (
    JSON_ATTRS,
    decode_attrs,
    decode_dataset,
    encode_attrs,
    export_netcdf,
)
from polar_cube.cube.versions import read_catalog
from polar_cube.location import StoreLocation
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import SpecError, load_spec
from tests.conftest import REPO

gdal.UseExceptions()
pytestmark = pytest.mark.filterwarnings("ignore:The ioos_sos checker is deprecated")
SPEC = load_spec(REPO / "cube.geojson")
RESOLUTION = 3000.0
POLAR_CUBE = REPO / ".venv" / "bin" / "polar-cube"
# What acdd:1.3 still finds (README, "CF and ACDD"): no CF standard name exists for these
# quantities (highly recommended); no known creator address, no vertical extent, and the
# checker's extent test reading the projected x/y as longitude/latitude (recommended)
ACDD_LEFT = {
    "highly recommended": [
        f'variable "{name}" missing the following attributes: standard_name'
        for name in (
            "curie_depth_200km",
            "curie_depth_300km",
            "geothermal_heat_flow_uncertainty_200km",
            "geothermal_heat_flow_uncertainty_300km",
            "magnetic_anomaly",
        )
    ],
    "recommended": [
        *(
            f"Global Attributes: {name} not present"
            for name in (
                "creator_email",
                "geospatial_bounds_vertical_crs",
                "geospatial_vertical_max",
                "geospatial_vertical_min",
                "geospatial_vertical_positive",
            )
        ),
        *["geospatial_lat_extents_match: Data for possible latitude variables"] * 2,
        *["geospatial_lon_extents_match: Data for possible longitude variables"] * 2,
    ],
}


def standard_names() -> set[str]:
    """The canonical names of the CF standard-name table the checker ships (not aliases)."""
    import compliance_checker

    table = Path(compliance_checker.__file__).parent / "data" / "cf-standard-name-table.xml"
    return {entry.get("id") for entry in ET.parse(table).getroot().iter("entry")}


def left(report: MetadataReport, suite: str) -> dict[str, list[str]]:
    """The findings of `suite` by level, each as `section: message` up to a data value."""
    found: dict[str, list[str]] = {}
    for finding in report.findings:
        if finding.suite == suite:
            text = f"{finding.section}: {finding.message}"
            text = re.sub(r" \(\{.*", "", text)  # drop the data values the extent test quotes
            found.setdefault(finding.level, []).append(text)
    return {level: sorted(texts) for level, texts in found.items()}


# --- fast: the attributes, the comparison, the spec ---------------------------------------


def test_attributes_netcdf_cannot_hold_come_back_exactly():
    attrs = {
        "_CRS": {"wkt": "PROJCRS[...]"},
        "polar_cube_stats": {"version": 1, "records": [{"min": 0.5, "count": 3}]},
        "references": ["https://doi.org/a", "https://doi.org/b"],
        "source_file": ["one.tif"],
        "empty": [],
        "mixed": [1, 2.5],
        "flag": True,
        "nothing": None,
        "flag_values": [0.0, 1.0, 2.0],
        "valid_range": [0.0, 1.0],
        "window": [200, 300],
        "scale": 0.25,
        "units": "mW m-2",
    }
    encoded = encode_attrs(attrs, np.dtype("float32"))
    assert "_CRS" not in encoded and json.loads(encoded["zarr_CRS"]) == attrs["_CRS"]
    assert encoded["flag_values"].dtype == np.float32  # CF: the variable's type
    assert isinstance(encoded["window"], list) and encoded["units"] == "mW m-2"  # as they are
    marked = encoded[JSON_ATTRS].split()
    assert sorted(marked) == sorted(
        ["zarr_CRS:_CRS", "polar_cube_stats", "references", "source_file", "empty", "mixed"]
        + ["flag", "nothing"]
    )
    assert all(isinstance(v, str | float | int | list | np.ndarray) for v in encoded.values())
    # what netCDF gives back: arrays, numpy numbers; decoding restores the zarr's values
    read_back = {k: np.asarray(v) if isinstance(v, list) else v for k, v in encoded.items()} | {
        "scale": np.float64(0.25)
    }
    assert decode_attrs(read_back) == attrs


def test_the_gate_fails_on_a_new_finding_and_passes_the_same_ones():
    def finding(level: str, message: str, suite: str = "acdd:1.3") -> Finding:
        return Finding(suite, level, "Global Attributes", message)

    before = MetadataReport(
        "v1", (finding("recommended", "creator_email not present"), finding("suggested", "x"))
    )
    same = MetadataReport("v2", before.findings)
    gate(compare(same, before))
    # a suggested finding more, or a value that moved, does not count; a recommended one does
    moved = Finding("acdd:1.3", "recommended", "extent", "y (-1624500.0) did not match -84.0")
    was = Finding("acdd:1.3", "recommended", "extent", "y (-1579500.0) did not match -62.1")
    gate(compare(MetadataReport("v2", (*before.findings, finding("suggested", "y"))), before))
    gate(compare(MetadataReport("v2", (moved,)), MetadataReport("v1", (was,))))
    worse = MetadataReport("v2", (*before.findings, finding("highly recommended", "title")))
    compared = compare(worse, before)
    assert compared.new == (finding("highly recommended", "title"),)
    with pytest.raises(MetadataGateError, match="worse than v1: 1 finding.*title"):
        gate(compared)

    # a variable the published version lacks may miss ACDD attributes, not break CF rules
    def missing(name: str, suite: str = "acdd:1.3") -> Finding:
        return Finding(suite, "highly recommended", f'variable "{name}" missing …', "x")

    old = MetadataReport("v1", (missing("a"),), variables=("a", "b"))
    gate(compare(MetadataReport("v2", (missing("a"), missing("c")), variables=("a", "c")), old))
    with pytest.raises(MetadataGateError, match='variable "b"'):
        gate(compare(MetadataReport("v2", (missing("a"), missing("b")), variables=("a", "b")), old))
    # no version published before: only CF errors fail
    cf_error = finding("error", "latitude_of_projection_origin is required", "cf:1.10")
    gate(compare(worse, None))
    with pytest.raises(MetadataGateError, match="no version published before"):
        gate(compare(MetadataReport("v1", (cf_error,)), None))


def test_spec_names_are_in_the_cf_table_and_every_variable_has_a_content_type():
    names = standard_names()
    assert len(names) > 4000
    for variable in SPEC.variables:
        assert variable.coverage_content_type, variable.name
        if variable.standard_name:
            assert variable.standard_name in names, variable.name
    # where the README says there is no name, the table has none: not invented, not missed
    for word in ("curie", "magnetic_anomaly", "total_magnetic"):
        assert not [n for n in names if word in n], word


def test_an_unknown_content_type_is_refused_at_load(tmp_path):
    spec = json.loads((REPO / "cube.geojson").read_text())
    spec["properties"]["variables"][0]["coverage_content_type"] = "measurement"
    path = tmp_path / "cube.geojson"
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="coverage_content_type"):
        load_spec(path)


def test_the_summary_lists_the_findings_and_marks_new_ones():
    ok = Finding("acdd:1.3", "recommended", "Global Attributes", "creator_email not present")
    new = Finding("cf:1.10", "error", "§3.3", "standard_name land_ice_thicknes is not defined")
    report = MetadataReport("v2", (new, ok), "6.1.0", "v1", (new,))
    text = "\n".join(report.markdown())
    assert "| cf:1.10 | error | 1 |" in text and "| acdd:1.3 | recommended | 1 |" in text
    assert f"- **new** {new.line()}" in text and f"- {ok.line()}" in text


# --- a built cube -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(small_standins, tmp_path_factory):
    """The whole cube at 3000 m from the small stand-ins, published into a local folder by
    the build flow (its gate ran: nothing published before it), and its netCDF export."""
    from polar_cube.flows.build_cube import build_cube

    work = tmp_path_factory.mktemp("metadata-build")
    with serving_mirror(small_standins) as mirror:
        result = build_cube(
            spec_path=str(REPO / "cube.geojson"),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            output_dir=str(work / "cube"),
            patch_path=str(REPO / "patch.yaml"),
        )
    cube = Path(result.url)
    exported = export_netcdf(xr.open_zarr(cube, consolidated=True), work / "cube.nc")
    return cube, exported, work


@pytest.fixture(scope="module")
def exported_report(built) -> MetadataReport:
    return check_netcdf(built[1])


def test_the_export_passes_cf_1_10_with_no_finding_at_all(exported_report):
    assert left(exported_report, "cf:1.10") == {}


def test_the_export_passes_acdd_but_for_what_the_readme_explains(exported_report):
    found = left(exported_report, "acdd:1.3")
    assert found["highly recommended"] == sorted(ACDD_LEFT["highly recommended"])
    assert found["recommended"] == sorted(ACDD_LEFT["recommended"])


def test_the_export_opens_in_xarray_and_gdal_with_every_attribute(built):
    cube, exported, _ = built
    zarr = xr.open_zarr(cube, consolidated=True)
    with xr.open_dataset(exported) as netcdf:
        decoded = decode_dataset(netcdf)
        assert set(decoded.variables) == set(zarr.variables)
        assert decoded.attrs == zarr.attrs
        for name, variable in zarr.variables.items():
            assert decoded[name].attrs == variable.attrs, name
        raw = netcdf.ice_thickness.attrs  # netCDF's own: JSON text, marked
        assert "zarr_CRS" in raw[JSON_ATTRS] and isinstance(raw["polar_cube_stats"], str)
        np.testing.assert_array_equal(netcdf.ice_thickness.values, zarr.ice_thickness.values)
        assert netcdf.thw_70.attrs["flag_values"].dtype == np.float32
    info = gdal.Info(str(exported), format="json")
    assert any(name.endswith(":thw_70") for name, _ in _subdatasets(info))
    raster = gdal.Open(f'NETCDF:"{exported}":ice_thickness')
    assert raster.GetSpatialRef().GetAuthorityCode(None) == "3031"
    assert (raster.RasterXSize, raster.RasterYSize) == (zarr.sizes["x"], zarr.sizes["y"])
    west, size, _, north, _, negative = raster.GetGeoTransform()
    assert (west, size, north, negative) == (-2602500.0, RESOLUTION, 495000.0, -RESOLUTION)


def _subdatasets(info: dict) -> list[tuple[str, str]]:
    items = info["metadata"]["SUBDATASETS"]
    return [(v, k) for k, v in items.items() if k.endswith("_NAME")]


def test_the_gate_sample_finds_what_the_full_export_finds(built, exported_report):
    cube, _, _ = built
    sampled = check_cube(xr.open_zarr(cube, consolidated=True), str(cube))
    assert Counter(f.key for f in sampled.findings) == Counter(
        f.key for f in exported_report.findings
    )


def test_the_runs_summary_artifact_holds_the_findings(built):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from polar_cube.flows.artifacts import SUMMARY_KEY

    async def summaries():
        async with get_client() as client:
            key = ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]))
            return await client.read_artifacts(artifact_filter=key)

    cube, _, _ = built
    (ours,) = [a for a in asyncio.run(summaries()) if f"`{cube}`" in a.data]
    section = ours.data.split("## Metadata checks", 1)[1].split("\n## ", 1)[0]
    assert "| cf:1.10 | error | 0 |" in section and "| cf:1.10 | warning | 0 |" in section
    assert "| acdd:1.3 | highly recommended | 5 |" in section
    assert 'acdd:1.3 highly recommended: variable "magnetic_anomaly"' in section
    assert "**new**" not in section  # nothing was published before: no comparison


def test_export_and_check_metadata_commands(built, tmp_path):
    cube, _, work = built
    where = ["--output", str(work / "cube"), "--resolution", f"{RESOLUTION:g}"]
    out = tmp_path / "lakes.nc"
    export = subprocess.run(
        [str(POLAR_CUBE), "export", str(out), "--variables", "thw_70,ice_thickness"]
        + ["--bbox=-2000000,-1000000,-1500000,-500000", *where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert export.returncode == 0, export.stderr
    with xr.open_dataset(out) as subset:
        assert set(subset.data_vars) == {"thw_70", "ice_thickness", "crs"}
        assert -2000000 <= float(subset.x.min()) and float(subset.x.max()) <= -1500000
        assert subset.attrs["geospatial_bounds"] == (
            "POLYGON ((-1999500 -999000, -1498500 -999000, -1498500 -501000, "
            "-1999500 -501000, -1999500 -999000))"
        )
    assert left(check_netcdf(out), "cf:1.10") == {}
    check = subprocess.run(
        [str(POLAR_CUBE), "check-metadata", *where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stderr
    assert re.search(r"cf:1.10\s+error\s+0\n\s+cf:1.10\s+warning\s+0", check.stdout)
    assert re.search(r"acdd:1.3\s+highly recommended\s+5\n", check.stdout)


@pytest.mark.slow
def test_a_broken_spec_attribute_fails_the_gate_and_nothing_is_published(
    built, small_standins, tmp_path
):
    """A typo in a standard name (not in the CF table) is a CF error the last published
    version does not have: the build stops at its gate, `latest` stays where it was."""
    from polar_cube.flows.build_cube import build_cube

    cube, _, work = built
    spec = json.loads((REPO / "cube.geojson").read_text())
    (ice,) = [v for v in spec["properties"]["variables"] if v["name"] == "ice_thickness"]
    ice["standard_name"] = "land_ice_thicknes"
    broken = tmp_path / "cube.geojson"
    broken.write_text(json.dumps(spec))
    location = StoreLocation.local(work / "cube")
    series = SPEC.at_resolution(RESOLUTION).series
    before = read_catalog(location, series)
    with serving_mirror(small_standins) as mirror, pytest.raises(MetadataGateError) as failed:
        build_cube(
            spec_path=str(broken),
            resolution=RESOLUTION,
            source_mirror=mirror,
            cache_dir=str(work / "cache"),
            output_dir=str(work / "cube"),
            patch_path=str(REPO / "patch.yaml"),
        )
    message = str(failed.value)
    assert f"worse than {cube}" in message
    assert "land_ice_thicknes" in message and "cf:1.10 error" in message
    assert read_catalog(location, series) == before  # nothing published
    drafts = [p for p in (work / "cube").glob("*.zarr") if p != cube]
    assert drafts and not [d for d in drafts if (d / ".zmetadata").exists()]  # unmarked
    shutil.rmtree(tmp_path, ignore_errors=True)
    # the failed run's last logs go to the API now: queued until the session's server stops,
    # they would hold this process at exit for over a minute of retries
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
