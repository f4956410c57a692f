import copy
import json

import pytest

from polar_cube.grid import TargetGrid
from polar_cube.spec import SpecError, ValidCondition, load_spec, resolution_label


@pytest.fixture()
def spec_document(repo_spec_path):
    return json.loads(repo_spec_path.read_text())


def write(tmp_path, document):
    path = tmp_path / "cube.geojson"
    path.write_text(json.dumps(document))
    return path


def variable(document, name):
    return next(v for v in document["properties"]["variables"] if v["name"] == name)


def test_repo_spec_fixes_the_published_defects(repo_spec_path):
    spec = load_spec(repo_spec_path)
    units = {v.name: v.units for v in spec.variables}
    assert units["curie_depth_200km"] == "km"
    assert units["geothermal_heat_flow_300km"] == "mW m-2"
    assert units["geothermal_heat_flow_uncertainty_200km"] == "mW m-2"
    assert units["magnetic_anomaly"] == "nT"
    assert units["ice_thickness"] == "m"
    assert units["thw_70"] == "1" and units["supraglacial_lakes"] == "1"
    assert spec.data_id == f"polar-100m-1x2048x2048-v{spec.version}.zarr"
    assert next(v for v in spec.variables if v.name == "ice_thickness").source_variable == "mrg"
    assert all(s.source_crs for s in spec.sources)
    assert len(spec.sources) == 10 and len(spec.variables) == 13
    grid = TargetGrid.from_spec(spec)
    assert grid.shape == (21210, 19530)
    assert grid.x[0] == -2602500 + 50 and grid.y[0] == -1626000 + 50
    assert grid.y[-1] > grid.y[0]


def test_missing_field_is_named_with_the_variable(tmp_path, spec_document):
    del variable(spec_document, "ice_thickness")["units"]
    with pytest.raises(SpecError) as raised:
        load_spec(write(tmp_path, spec_document))
    message = str(raised.value)
    assert "cube.geojson" in message
    assert "variables[" in message and "ice_thickness].units" in message
    assert "Field required" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: variable(d, "magnetic_anomaly").update(valid_if=["> zero"]),
            "invalid condition",
        ),
        (lambda d: variable(d, "magnetic_anomaly").update(source="nope"), "unknown source 'nope'"),
        (lambda d: variable(d, "magnetic_anomaly").update(resampling="cubic"), "resampling"),
        (lambda d: variable(d, "magnetic_anomaly").update(resampling=None), "'resampling' must"),
        (lambda d: variable(d, "thw_70").update(dims=["y", "x"]), "source_files_by_time"),
        (lambda d: d["properties"]["sources"][0].update(source_crs="EPSG:99999"), "unknown CRS"),
        (lambda d: d["properties"]["sources"][0].update(sha256="abc"), "sha256"),
        (lambda d: d["properties"]["sources"][0].update(id="Bad Id"), "sources[0"),
        (lambda d: d["properties"].update(spatial_bbox=[0, 0, -1, 1]), "spatial_bbox"),
        (
            lambda d: d["properties"]["variables"].append(copy.deepcopy(variable(d, "thw_70"))),
            "duplicate name thw_70",
        ),
        (lambda d: variable(d, "thw_70").update(colour="red"), "colour"),
    ],
)
def test_invalid_specs_name_the_problem(tmp_path, spec_document, change, expected):
    change(spec_document)
    with pytest.raises(SpecError, match="cube.geojson") as raised:
        load_spec(write(tmp_path, spec_document))
    assert expected in str(raised.value)


def test_not_json_and_not_found(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="bad.geojson: not valid JSON"):
        load_spec(bad)
    with pytest.raises(SpecError, match="missing.geojson: spec file not found"):
        load_spec(tmp_path / "missing.geojson")


def test_resolution_must_divide_the_bbox(repo_spec_path):
    spec = load_spec(repo_spec_path)
    assert TargetGrid.from_spec(spec, 1000).shape == (2121, 1953)
    with pytest.raises(SpecError, match="resolution 2000 m: 2000 m does not divide"):
        TargetGrid.from_spec(spec, 2000)
    for zero_or_less in (0, -100):
        with pytest.raises(SpecError, match="must be a positive number of metres"):
            TargetGrid.from_spec(spec, zero_or_less)


@pytest.mark.parametrize(
    ("spatial_res", "problem"),
    [
        ([2000, 2000], "2000 m does not divide the bbox x extent 1953000 m into whole cells"),
        ([0, 0], "must be a positive number of metres"),
        ([-100, -100], "must be a positive number of metres"),
        ([100, 200], "must be two equal numbers"),
    ],
)
def test_spec_resolution_errors_name_the_file_and_field(
    tmp_path, spec_document, spatial_res, problem
):
    spec_document["properties"]["spatial_res"] = spatial_res
    path = write(tmp_path, spec_document)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: invalid spec: properties.spatial_res: ")
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_select_sources_for_variables(repo_spec_path):
    spec = load_spec(repo_spec_path)
    assert [s.id for s in spec.select_sources(["thw_70", "thw_124"])] == [
        "subglacial_lakes_thwaites"
    ]
    with pytest.raises(SpecError, match="unknown variable.*ice_thicnkess"):
        spec.select_sources(["ice_thicnkess"])


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://x.org/a/b/file.nc", "file.nc"),
        ("file:///data/sources/file.tif", "file.tif"),
        ("/data/sources/archive.tar", "archive.tar"),
        ("relative/dir/archive.zip", "archive.zip"),
    ],
)
def test_file_urls_and_plain_paths_are_accepted(tmp_path, spec_document, url, name):
    spec_document["properties"]["sources"][0]["download_url"] = url
    spec = load_spec(write(tmp_path, spec_document))
    assert spec.sources[0].file_name == name


def test_conditions():
    condition = ValidCondition.parse(">= -1.5")
    assert str(condition) == ">= -1.5"
    assert condition.holds(__import__("numpy").array([-2.0, -1.5, 0])).tolist() == [
        False,
        True,
        True,
    ]


GRID_STANDIN = {
    "bounds": [-2000000, -1000000, -1000000, 0],
    "pixel_size": {"small": 5000, "full": 500},
    "values": [-100, 100],
    "wavelengths": [10000, 200000],
}
POLYGON_STANDIN = {"bounds": [-2000000, -1000000, -1000000, 0], "count": {"small": 5, "full": 50}}


def source(document, source_id):
    return next(s for s in document["properties"]["sources"] if s["id"] == source_id)


def test_a_standin_description_is_no_part_of_the_recipe(tmp_path, spec_document, repo_spec_path):
    source(spec_document, "magnetic_anomaly")["standin"] = GRID_STANDIN
    spec = load_spec(write(tmp_path, spec_document))
    magnetic = spec.source("magnetic_anomaly")
    assert magnetic.standin.pixel_size == {"small": 5000, "full": 500}
    assert magnetic.standin.valid_fraction == 1 and magnetic.standin.registration == "pixel"
    assert spec.model_dump() == load_spec(repo_spec_path).model_dump()  # what fingerprints hash


@pytest.mark.parametrize(
    ("source_id", "standin", "expected"),
    [
        ("magnetic_anomaly", {**GRID_STANDIN, "values": [1, 1]}, "standin.grid.values: must be"),
        ("magnetic_anomaly", {**GRID_STANDIN, "wavelengths": [0, 9]}, "0 < shortest"),
        ("magnetic_anomaly", {**GRID_STANDIN, "pixel_size": {"small": 5000}}, "missing full"),
        (
            "magnetic_anomaly",
            {**GRID_STANDIN, "pixel_size": {"small": 3000, "full": 500}},
            "pixel_size.small 3000 does not divide the bounds' extent 1000000",
        ),
        ("magnetic_anomaly", {**GRID_STANDIN, "registration": "gridline"}, "only gmt_netcdf"),
        ("magnetic_anomaly", {**GRID_STANDIN, "colour": "red"}, "standin.grid.colour"),
        (
            "magnetic_anomaly",
            {**POLYGON_STANDIN, "diameters": [10, 100]},
            "a geotiff stand-in needs pixel_size, values, wavelengths",
        ),
        (
            "supraglacial_lakes_wais",
            GRID_STANDIN,
            "a polygons stand-in needs count, diameters",
        ),
        (
            "supraglacial_lakes_wais",
            {**POLYGON_STANDIN, "diameters": [100, 10]},
            "standin.polygons.diameters: must be [smallest, largest]",
        ),
    ],
)
def test_invalid_standins_name_the_problem(tmp_path, spec_document, source_id, standin, expected):
    source(spec_document, source_id)["standin"] = standin
    with pytest.raises(SpecError) as raised:
        load_spec(write(tmp_path, spec_document))
    message = str(raised.value)
    assert f":{source_id}].standin" in message and expected in message


def test_a_standin_must_fit_the_files_its_variables_read(tmp_path, spec_document):
    source(spec_document, "magnetic_anomaly")["standin"] = GRID_STANDIN
    variable(spec_document, "magnetic_anomaly")["source_file"] = "other.tif"
    with pytest.raises(SpecError) as raised:
        load_spec(write(tmp_path, spec_document))
    assert (
        "source 'magnetic_anomaly' (standin): without an archive the variables read the "
        "download itself, 'ASE_MagneticCompilation_Dziadeketal_250m.tif', not 'other.tif'"
    ) in str(raised.value)


def test_a_cube_name_says_its_resolution(repo_spec_path):
    """Issue 18: builds at other resolutions never share the published name."""
    spec = load_spec(repo_spec_path)
    assert spec.at_resolution(None) is spec and spec.at_resolution(100) is spec
    names = {r: spec.at_resolution(r).data_id for r in (250, 1000, 1500, 3000)}
    assert names == {
        250: "polar-250m-1x2048x2048-v1.1.0.zarr",
        1000: "polar-1km-1x2048x2048-v1.1.0.zarr",
        1500: "polar-1500m-1x2048x2048-v1.1.0.zarr",
        3000: "polar-3km-1x2048x2048-v1.1.0.zarr",
    }
    assert spec.at_resolution(1000).spatial_res == (1000.0, 1000.0)
    plain = spec.model_copy(update={"data_id": "my-cube.zarr"})
    assert plain.at_resolution(3000).data_id == "my-cube-3km.zarr"
    assert resolution_label(100) == "100m" and resolution_label(2000) == "2km"
