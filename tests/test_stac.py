"""The STAC item describing the published cube: content, offline validation, writing."""

import copy
import json
import socket
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pystac
import pytest
import xarray as xr
from pyproj import Transformer

from polar_cube.cube.merge import _geographic_bounds
from polar_cube.cube.stac import StacError, cube_stac_item, validate_stac_item, write_stac_item
from polar_cube.cube.stac_schemas import SchemasMissing, default_dir
from polar_cube.grid import TargetGrid
from polar_cube.spec import load_spec
from polar_cube.zarr_store import add_grid_coords, write_zarr_atomically

SPEC = load_spec(Path(__file__).resolve().parents[1] / "cube.geojson")
GRID = TargetGrid(SPEC.spatial_ref, SPEC.spatial_bbox, 3000, 256)  # 651 x 707 cells
TIMES = pd.DatetimeIndex(["2013-01-01", "2017-01-01"])
CUBE_URL = "s3://polar-cube/polar-100m-1x2048x2048-v1.1.0.zarr"
QUICKLOOKS = [
    "s3://polar-cube/polar-100m-1x2048x2048-v1.1.0.quicklooks/ice_thickness.png",
    "s3://polar-cube/polar-100m-1x2048x2048-v1.1.0.quicklooks/thw_70_2013-01-01.png",
]


def make_dataset() -> xr.Dataset:
    """Every spec variable on GRID (a plane per variable), attributes as the pipeline sets."""
    rows, columns = np.mgrid[0 : GRID.height, 0 : GRID.width]
    variables = {}
    for number, variable in enumerate(SPEC.variables):
        layer = (rows * 0.5 + columns * 0.25 + number).astype("float32")
        data = np.stack([layer] * len(TIMES)) if variable.dims[0] == "time" else layer
        attrs = {"units": variable.units, "long_name": variable.long_name, **variable.attrs}
        variables[variable.name] = (variable.dims, data, attrs)
    return add_grid_coords(xr.Dataset(variables, coords={"time": TIMES}), GRID)


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    target = tmp_path_factory.mktemp("stac") / "cube.zarr"
    path = write_zarr_atomically(make_dataset(), target, GRID.chunk_size)
    return xr.open_zarr(path, consolidated=True)


@pytest.fixture(scope="module")
def item(cube):
    return cube_stac_item(cube, SPEC, GRID, CUBE_URL, quicklook_urls=QUICKLOOKS)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_item_validates_offline_against_its_three_schemas(item, no_network):
    global_validator = pystac.validation.RegisteredValidator._validator
    assert validate_stac_item(item) == [
        "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json",
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        "https://stac-extensions.github.io/datacube/v2.2.0/schema.json",
    ]
    assert item["stac_version"] == "1.1.0" and item["type"] == "Feature"
    assert pystac.validation.RegisteredValidator._validator is global_validator  # untouched


def test_without_the_schemas_validation_fails_naming_the_fetch_command(item, tmp_path):
    with pytest.raises(SchemasMissing) as caught:
        validate_stac_item(item, schema_dir=tmp_path / "nowhere")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert f"-m polar_cube.cube.stac_schemas {tmp_path / 'nowhere'}" in message
    assert "\n" not in message


def test_an_item_that_is_not_json_is_refused(item):
    with pytest.raises(StacError, match="is not JSON: Object of type set"):
        validate_stac_item({**item, "links": {"a"}})


def test_the_default_schema_folder_is_in_the_environment():
    assert (default_dir() / "sources.json").is_file(), "run: python -m polar_cube.cube.stac_schemas"


def test_identity_time_and_descriptive_properties(item):
    properties = item["properties"]
    assert item["id"] == "polar-100m-1x2048x2048-v1.1.0"
    assert properties["datetime"] is None
    assert properties["start_datetime"] == "2013-01-01T00:00:00Z"
    assert properties["end_datetime"] == "2017-01-01T00:00:00Z"
    assert properties["title"] == SPEC.title and properties["description"] == SPEC.description
    # the spec's license text is not an SPDX id: STAC says "other" and the text is kept
    assert properties["license"] == "other"
    assert properties["polar_cube:license_text"] == SPEC.license
    assert pd.Timestamp(properties["created"]).tzinfo is not None


def test_every_spec_variable_is_described_with_its_unit(item, cube):
    variables = item["properties"]["cube:variables"]
    assert list(variables) == [v.name for v in SPEC.variables]
    for spec_variable in SPEC.variables:
        described = variables[spec_variable.name]
        assert described["unit"] == spec_variable.units, spec_variable.name
        assert described["type"] == "data"
        assert described["dimensions"] == list(cube[spec_variable.name].dims)
        assert described["long_name"] == spec_variable.long_name
        assert described["description"] in (spec_variable.description, spec_variable.long_name)


def test_bbox_contains_the_cube_corners_and_lies_in_the_antarctic(item, cube):
    west, south, east, north = item["bbox"]
    assert -180 <= west < east <= 180 and -90 <= south < north <= -60
    to_lonlat = Transformer.from_crs(GRID.crs, "EPSG:4326", always_xy=True)
    xmin, ymin, xmax, ymax = GRID.bbox
    edges = [(xmin, ymin), (xmin, ymax), (xmax, ymin), (xmax, ymax)]
    centres = [(float(x), float(y)) for x in cube.x[[0, -1]] for y in cube.y[[0, -1]]]
    for x, y in edges + centres:
        lon, lat = to_lonlat.transform(x, y)
        assert west <= lon <= east and south <= lat <= north, (x, y, lon, lat)
    (lon_min, lon_max), (lat_min, lat_max) = _geographic_bounds(GRID)  # the cube's attributes
    assert west <= lon_min and south <= lat_min and lon_max <= east and lat_max <= north
    assert item["bbox"] == pytest.approx([lon_min, lat_min, lon_max, lat_max], abs=1e-3)


def test_bbox_reaches_the_edge_point_nearest_the_pole(item):
    """Latitude peaks mid-edge on a polar grid; sampling alone would cut the bbox short."""
    to_lonlat = Transformer.from_crs(GRID.crs, "EPSG:4326", always_xy=True)
    xmin, ymin, xmax, ymax = GRID.bbox
    ys = np.linspace(ymin, ymax, 200_001)  # the east edge (nearest the pole), densely
    lat = to_lonlat.transform(np.full(ys.size, xmax), ys)[1]
    assert item["bbox"][1] <= lat.min() < item["bbox"][1] + 1e-6


def test_geometry_is_the_closed_densified_outline_inside_the_bbox(item):
    geometry = item["geometry"]
    assert geometry["type"] == "Polygon"
    [ring] = geometry["coordinates"]
    assert ring[0] == ring[-1] and len(ring) > 100
    lon, lat = np.array(ring).T
    west, south, east, north = item["bbox"]
    assert west <= lon.min() and south <= lat.min() and lon.max() <= east and lat.max() <= north
    assert [lon.min(), lat.min(), lon.max(), lat.max()] == pytest.approx(item["bbox"], abs=1e-7)
    area = np.sum(lon * np.roll(lat, -1) - np.roll(lon, -1) * lat) / 2
    assert area > 0  # counter-clockwise exterior ring (RFC 7946)


def test_projection_fields_match_the_grid(item, cube):
    properties = item["properties"]
    assert properties["proj:code"] == "EPSG:3031"
    assert properties["proj:bbox"] == list(GRID.bbox)
    assert properties["proj:shape"] == [GRID.height, GRID.width]
    assert properties["proj:shape"] == [cube.sizes["y"], cube.sizes["x"]]
    a, b, c, d, e, f = properties["proj:transform"]
    for row, column in ((0, 0), (GRID.height - 1, GRID.width - 1)):  # array indices -> centres
        x = a * (column + 0.5) + b * (row + 0.5) + c
        y = d * (column + 0.5) + e * (row + 0.5) + f
        assert (x, y) == pytest.approx((float(cube.x[column]), float(cube.y[row])))


def test_datacube_dimensions_match_the_cube(item, cube):
    dimensions = item["properties"]["cube:dimensions"]
    assert set(dimensions) == {"x", "y", "time"}
    for axis in ("x", "y"):
        dimension = dimensions[axis]
        assert dimension["type"] == "spatial" and dimension["axis"] == axis
        assert dimension["extent"] == [float(cube[axis].min()), float(cube[axis].max())]
        assert dimension["step"] == GRID.resolution
        assert dimension["reference_system"] == 3031
    assert dimensions["time"]["type"] == "temporal"
    assert dimensions["time"]["values"] == ["2013-01-01T00:00:00Z", "2017-01-01T00:00:00Z"]


def test_assets_point_at_the_cube_and_its_quicklooks(item):
    assets = item["assets"]
    assert set(assets) == {"zarr", "quicklook-ice_thickness", "quicklook-thw_70_2013-01-01"}
    zarr = assets["zarr"]
    assert zarr["href"] == CUBE_URL
    assert zarr["type"] == "application/vnd+zarr" and zarr["roles"] == ["data"]
    assert zarr["title"]
    quicklook = assets["quicklook-ice_thickness"]
    assert quicklook == {
        "href": QUICKLOOKS[0],
        "type": "image/png",
        "title": "ice_thickness",
        "roles": ["overview"],
    }


def test_the_item_round_trips_through_json_and_pystac(item):
    text = json.dumps(item)
    assert json.loads(text) == item
    again = pystac.Item.from_dict(json.loads(text)).to_dict(
        include_self_link=False, transform_hrefs=False
    )
    assert again == item


def test_a_cube_lacking_a_spec_variable_is_refused(cube):
    with pytest.raises(StacError, match=r"cube lacks spec variable\(s\) thw_70"):
        cube_stac_item(cube.drop_vars("thw_70"), SPEC, GRID, CUBE_URL)


def test_duplicate_quicklooks_are_refused(cube):
    with pytest.raises(StacError, match="'quicklook-ice_thickness' given twice"):
        cube_stac_item(cube, SPEC, GRID, CUBE_URL, quicklook_urls=[QUICKLOOKS[0]] * 2)


def _swap_bbox(item):
    west, south, east, north = item["bbox"]
    item["bbox"] = [east, north, west, south]


def _shift_west(item):
    item["bbox"][0] += 10  # geometry sticks out


def _set(path, value):
    def change(item):
        *parents, last = path
        node = item
        for key in parents:
            node = node[key]
        node[last] = value

    return change


def _drop(path):
    def change(item):
        *parents, last = path
        node = item
        for key in parents:
            node = node[key]
        del node[last]

    return change


BROKEN = {
    "missing id": (_drop(["id"]), "id: 'id' is a required property"),
    "bbox order": (_swap_bbox, "bbox: not [W, S, E, N] in lon/lat with W <= E"),
    "bbox not containing the geometry": (_shift_west, "bbox: does not contain the geometry"),
    "variable without unit": (
        _drop(["properties", "cube:variables", "thw_70", "unit"]),
        "properties.cube:variables.thw_70.unit: missing",
    ),
    "geometry type": (
        _set(["geometry", "type"], "Pointy"),
        "geometry.type: 'Pointy' is not one of ['Point', 'LineString', 'Polygon',",
    ),
    "geometry coordinates": (
        _set(["geometry", "type"], "Point"),
        "geometry.coordinates: [[[",
    ),
    "no start_datetime": (
        _drop(["properties", "start_datetime"]),
        "properties.start_datetime: 'start_datetime' is a required property",
    ),
    "license with spaces": (_set(["properties", "license"], "my license"), "properties.license:"),
    "asset without href": (
        _drop(["assets", "zarr", "href"]),
        "assets.zarr.href: 'href' is a required property",
    ),
    "shape not matching transform": (
        _set(["properties", "proj:shape"], [100, 100]),
        "properties.proj:transform: ",
    ),
    "proj:code an integer": (
        _set(["properties", "proj:code"], 3031),
        "properties.proj:code: 3031 is not of type 'string', 'null'",
    ),
    "proj:shape with a string": (
        _set(["properties", "proj:shape"], [651, "707"]),
        "properties.proj:shape[1]: '707' is not of type 'integer'",
    ),
    "dimension without type": (
        _drop(["properties", "cube:dimensions", "x", "type"]),
        "properties.cube:dimensions.x.type: 'type' is a required property",
    ),
    "spatial dimension without axis": (
        _drop(["properties", "cube:dimensions", "x", "axis"]),
        "properties.cube:dimensions.x.axis: 'axis' is a required property",
    ),
    "variable type": (
        _set(["properties", "cube:variables", "thw_70", "type"], "measurement"),
        "properties.cube:variables.thw_70.type: 'measurement' is not 'data' or 'auxiliary'",
    ),
    "unknown variable dimension": (
        _set(["properties", "cube:variables", "ice_thickness", "dimensions"], ["y", "lon"]),
        "properties.cube:variables.ice_thickness.dimensions: ['lon'] not in cube:dimensions",
    ),
    "undeclared projection extension": (
        lambda item: item["stac_extensions"].remove(
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
        ),
        "properties.proj:bbox: used but https://stac-extensions.github.io/projection/v2.0.0/",
    ),
    "extension unknown offline": (
        lambda item: item["stac_extensions"].append(
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
        ),
        "stac_extensions: no offline schema for https://stac-extensions.github.io/eo/v1.1.0/",
    ),
    "stac_version": (_set(["stac_version"], "1.0.0"), "stac_version: '1.1.0' was expected"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_items_fail_naming_the_field(item, case, no_network):
    change, expected = BROKEN[case]
    broken = copy.deepcopy(item)
    change(broken)
    with pytest.raises(StacError) as caught:
        validate_stac_item(broken)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("STAC item ")
    assert any(line.strip().startswith(expected) for line in lines[1:]), lines
    assert all(len(line) < 300 for line in lines), lines


def test_write_to_a_new_local_folder(item, tmp_path):
    url = str(tmp_path / "published" / "polar.json")
    assert write_stac_item(item, url) == url
    assert json.loads(Path(url).read_text()) == item
    validate_stac_item(json.loads(Path(url).read_text()))


def test_write_through_fsspec_and_refuse_invalid_items(item):
    url = "memory://bucket/polar.json"
    try:
        assert write_stac_item(item, url) == url
        with fsspec.open(url, "r") as f:
            assert json.load(f) == item
        broken = {k: v for k, v in item.items() if k != "id"}
        with pytest.raises(StacError, match="id: 'id' is a required property"):
            write_stac_item(broken, "memory://bucket/broken.json")
        assert not fsspec.filesystem("memory").exists("/bucket/broken.json")
    finally:
        fsspec.filesystem("memory").rm("/bucket", recursive=True)
