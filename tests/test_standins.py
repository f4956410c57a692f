"""Tests for the deterministic source stand-ins (small scale only)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import geopandas as gpd
import netCDF4
import numpy as np
import pytest
import rasterio

from polar_cube.dataset import convert_source
from polar_cube.sources.fetch import fetch_source
from polar_cube.sources.mirror import serving_mirror
from polar_cube.sources.standins import CUBE_BBOX, make_standins, write_gmt_grid
from polar_cube.spec import load_spec

GMT_FILES = [
    f"{km}km_{name}.nc"
    for km in (200, 300)
    for name in ("Dziadek_etal_CurieDepth_Results", "GHF_windowCenters", "GHF_uncertainty")
]
EXPECTED = {
    *GMT_FILES,
    "ASE_MagneticCompilation_Dziadeketal_250m.tif",
    "Malczyk_etal_2020_data_v2.tar",
    "WAIS_Max_Extent.zip",
    "SMOS_IceThickness_2015_300.nc",
}
THW_MEMBERS = {
    f"Thw{lake}_{year}_mask.tif" for lake in (70, 124, 142, 170) for year in (2013, 2017)
}
WAIS = "WAIS_Max_Extent/WAIS_Jan_2017_Polygons"


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    paths = make_standins(tmp_path_factory.mktemp("standins"), "small")
    return {p.name: p for p in paths}


def _read_gmt(path: Path) -> dict:
    with netCDF4.Dataset(path) as ds:
        ds.set_auto_maskandscale(False)
        out = {name: ds[name][:] for name in ds.variables}
        out["dims"] = {name: len(dim) for name, dim in ds.dimensions.items()}
        out["format"] = ds.data_model
        out["z_attrs"] = {k: ds["z"].getncattr(k) for k in ds["z"].ncattrs()}
        out["global"] = ds.ncattrs()
    return out


def test_all_files_written(standins):
    assert set(standins) == EXPECTED
    assert all(p.is_file() and p.stat().st_size > 0 for p in standins.values())


@pytest.mark.parametrize("name", GMT_FILES)
def test_gmt_layout(standins, name):
    g = _read_gmt(standins[name])
    assert g["format"] == "NETCDF3_CLASSIC"
    assert set(g) >= {"x_range", "y_range", "z_range", "spacing", "dimension", "z"}
    nx, ny = g["dimension"]
    assert g["dims"] == {"side": 2, "xysize": nx * ny}
    assert g["dimension"].dtype == np.int32 and g["z"].dtype == np.float32
    attrs = g["z_attrs"]
    assert attrs["scale_factor"] == 1.0 and attrs["add_offset"] == 0.0
    assert np.isnan(attrs["_FillValue"])
    node_offset = int(attrs["node_offset"])
    assert node_offset == (0 if name.startswith("200") else 1)
    assert {"title", "source"} <= set(g["global"])
    (x0, x1), (y0, y1), (dx, dy) = g["x_range"], g["y_range"], g["spacing"]
    assert nx == round((x1 - x0) / dx) + 1 - node_offset
    assert ny == round((y1 - y0) / dy) + 1 - node_offset
    inset = 0 if name.startswith("200") else 50000
    assert (x0, x1, y0, y1) == (-2470000 + inset, -810000 - inset, -1480000 + inset, 380000 - inset)
    z = g["z"]
    assert np.isfinite(z).all()
    assert tuple(g["z_range"]) == (z.min(), z.max())


@pytest.mark.parametrize(
    "stem, lo, hi",
    [
        ("Dziadek_etal_CurieDepth_Results", -25.0, -6.5),
        ("GHF_windowCenters", 50.0, 235.0),
        ("GHF_uncertainty", 3.0, 73.0),
    ],
)
def test_gmt_value_ranges(standins, stem, lo, hi):
    z200 = _read_gmt(standins[f"200km_{stem}.nc"])["z"]
    z300 = _read_gmt(standins[f"300km_{stem}.nc"])["z"]
    for z in (z200, z300):
        assert lo - 1e-3 <= z.min() and z.max() <= hi + 1e-3
        assert z.max() - z.min() > 0.3 * (hi - lo)  # a real spatial field, not a constant
    assert np.ptp(z300) < np.ptp(z200)  # the 300 km field is smoother


@pytest.mark.parametrize("node_offset", [0, 1])
def test_write_gmt_grid_north_first(tmp_path, node_offset):
    x_range, y_range, d = (0.0, 40.0), (100.0, 130.0), 10.0
    half = d / 2 * node_offset
    x = np.arange(x_range[0] + half, x_range[1] - half + 1e-9, d)
    y = np.arange(y_range[1] - half, y_range[0] + half - 1e-9, -d)  # north first
    z = np.broadcast_to(y[:, None], (y.size, x.size))
    path = tmp_path / "zy.nc"
    write_gmt_grid(
        path, z, x_range=x_range, y_range=y_range, spacing=(d, d), node_offset=node_offset
    )
    g = _read_gmt(path)
    nx, ny = g["dimension"]
    assert (nx, ny) == (x.size, y.size) == (5 - node_offset, 4 - node_offset)
    rows = g["z"].reshape(ny, nx)
    assert (rows[0] == y.max()).all() and (rows[-1] == y.min()).all()
    assert tuple(g["z_range"]) == (y.min(), y.max())


@pytest.mark.skipif(shutil.which("gmt") is None, reason="GMT not installed")
@pytest.mark.parametrize("node_offset", [0, 1])
def test_real_gmt_reads_north_first(tmp_path, node_offset):
    """GMT itself places row 0 at y max and honours the registration."""
    half = 5.0 * node_offset
    y = np.arange(130.0 - half, 100.0 + half - 1e-9, -10.0)
    z = np.broadcast_to(y[:, None], (y.size, 5 - node_offset))
    path = tmp_path / "zy.nc"
    kw = dict(x_range=(0.0, 40.0), y_range=(100.0, 130.0), spacing=(10.0, 10.0))
    write_gmt_grid(path, z, node_offset=node_offset, **kw)
    out = subprocess.run(["gmt", "grd2xyz", str(path)], capture_output=True, text=True, check=True)
    xyz = np.loadtxt(io.StringIO(out.stdout))
    assert tuple(xyz[0]) == (half, 130.0 - half, 130.0 - half)
    assert np.array_equal(xyz[:, 1], xyz[:, 2])  # every node's value equals its y


def test_write_gmt_grid_rejects_bad_shapes(tmp_path):
    kw = dict(x_range=(0.0, 40.0), y_range=(0.0, 30.0), spacing=(10.0, 10.0))
    with pytest.raises(ValueError):
        write_gmt_grid(tmp_path / "a.nc", np.zeros((4, 5)), node_offset=1, **kw)
    with pytest.raises(ValueError):
        write_gmt_grid(tmp_path / "b.nc", np.zeros((5, 4)), node_offset=0, **kw)
    with pytest.raises(ValueError):
        write_gmt_grid(
            tmp_path / "c.nc", np.zeros((4, 5)), node_offset=0, **kw | {"x_range": (0, 45)}
        )


def test_magnetic_tif(standins):
    with rasterio.open(standins["ASE_MagneticCompilation_Dziadeketal_250m.tif"]) as src:
        assert tuple(src.bounds) == CUBE_BBOX
        assert src.crs.to_epsg() == 3031
        assert (src.width, src.height) == (651, 707) and src.res == (3000.0, 3000.0)
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert src.transform.e < 0  # north-up
        a = src.read(1)
    valid = np.isfinite(a)
    assert 0.55 < valid.mean() < 0.85
    assert not valid[0].any() and not valid[-1].any()  # NaN margins
    assert not valid[:, 0].any() and not valid[:, -1].any()
    assert np.abs(a[valid]).max() <= 2100 and np.abs(a[valid]).max() > 500


def test_thwaites_tar(standins):
    with tarfile.open(standins["Malczyk_etal_2020_data_v2.tar"]) as tar:
        members = tar.getmembers()
        assert {m.name for m in members} == THW_MEMBERS and len(members) == 8
        masks = {}
        for m in members:
            with rasterio.open(io.BytesIO(tar.extractfile(m).read())) as src:
                assert src.crs.to_epsg() == 3031 and src.res == (500.0, 500.0)
                assert src.dtypes[0] == "uint8" and src.nodata is None
                b = src.bounds
                assert -1470000 <= b.left < b.right <= -1370000
                assert -470000 <= b.bottom < b.top <= -380000
                masks[m.name] = (src.read(1), tuple(b))
    for lake in (70, 124, 142, 170):
        (m13, b13), (m17, b17) = (
            masks[f"Thw{lake}_2013_mask.tif"],
            masks[f"Thw{lake}_2017_mask.tif"],
        )
        assert b13 == b17
        assert set(np.unique(m13)) == set(np.unique(m17)) == {0, 1}
        assert (m13 != m17).any()


def test_wais_zip(standins):
    path = standins["WAIS_Max_Extent.zip"]
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        prj = zf.read(f"{WAIS}.prj").decode()
        with zipfile.ZipFile(io.BytesIO(zf.read(f"{WAIS}.kmz"))) as kmz:
            assert "<Polygon>" in kmz.read("doc.kml").decode()
    exts = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".geojson", ".kmz")
    assert {f"{WAIS}{ext}" for ext in exts} <= names
    assert "EPSG" not in prj and "-71" in prj
    frame = gpd.read_file(f"zip://{path}!{WAIS}.shp")
    assert len(frame) == 500
    assert frame["Feature_Cl"].value_counts().to_dict() == {"Lake": 488, "Channel": 12}
    assert set(frame["Location"]) <= {"Ice Shelf", "Grounded Ice", "Crosses GL"}
    assert frame.is_valid.all() and (frame.geom_type == "Polygon").all()
    assert np.allclose(frame["POLY_AREA"], frame.area, rtol=1e-6)
    xmin, ymin, xmax, ymax = frame.total_bounds
    assert (
        CUBE_BBOX[0] < xmin and ymin > CUBE_BBOX[1] and xmax < CUBE_BBOX[2] and ymax < CUBE_BBOX[3]
    )
    assert frame.crs.equals(frame.to_crs(3031).crs) or frame.crs.to_epsg() == 3031
    lonlat = gpd.read_file(f"zip://{path}!{WAIS}.geojson")
    assert len(lonlat) == 500 and lonlat.total_bounds[3] < -60


def test_smos(standins):
    with netCDF4.Dataset(standins["SMOS_IceThickness_2015_300.nc"]) as ds:
        lat, lon = ds["lat"][:], ds["lon"][:]
        est, mrg, index = ds["est"][:], ds["mrg"][:], ds["index"][:]
        assert ds["est"].units == ds["mrg"].units == "m"
    assert lat.shape == (584,) and lon.shape == (1388,)
    assert (np.diff(lat) > 0).all() and (np.diff(lon) > 0).all()
    assert np.ptp(np.diff(lat)) > 0.01
    assert np.isclose(lon[0], -179.87, atol=0.01) and np.isclose(lon[-1], 179.87, atol=0.01)
    assert mrg.min() == 0 and 3500 < mrg.max() <= 4100
    valid_est = est[est > 0]
    assert set(np.unique(est[est <= 0])) == {-999.0}
    assert valid_est.size > 0 and valid_est.max() <= 4100
    assert set(np.unique(index)) == {0, 1, 2}
    assert (mrg[index == 0] == 0).all() and (mrg[index > 0] > 0).all()
    assert (lat[np.nonzero(mrg.any(axis=1))[0]] < -60).all()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_deterministic(standins, tmp_path):
    again = {p.name: p for p in make_standins(tmp_path, "small")}
    for name, path in standins.items():
        assert _digest(path.read_bytes()) == _digest(again[name].read_bytes()), name


# --- described stand-ins: one per format, from spec entries alone ------------------------
DESCRIBED_SOURCES = [
    {
        "id": "demo_stack",
        "name": "two-band GeoTIFFs per year in a tar",
        "download_url": "https://example.org/demo/stack.tar",
        "compression_format": "tar",
        "source_format": "geotiff",
        "source_crs": "EPSG:3031",
        "standin": {
            "bounds": [-1600000, -800000, -1200000, -400000],
            "pixel_size": {"small": 10000, "full": 1000},
            "values": [0, 5],
            "wavelengths": [30000, 200000],
        },
    },
    {
        "id": "demo_gmt",
        "name": "a gridline-registered GMT grid",
        "download_url": "https://example.org/demo/grid.nc",
        "source_format": "gmt_netcdf",
        "source_crs": "EPSG:3031",
        "standin": {
            "bounds": [-2400000, -1400000, -900000, 300000],
            "pixel_size": {"small": 50000, "full": 10000},
            "values": [-30, -5],
            "wavelengths": [100000, 800000],
            "registration": "gridline",
            "valid_fraction": 0.7,
        },
    },
    {
        "id": "demo_latlon",
        "name": "two variables on lat/lon axes",
        "download_url": "https://example.org/demo/latlon.nc",
        "source_format": "latlon_netcdf",
        "source_crs": "EPSG:4326",
        "standin": {
            "bounds": [-140, -82, -70, -64],
            "pixel_size": {"small": 0.5, "full": 0.1},
            "values": [10, 90],
            "wavelengths": [2, 30],
        },
    },
    {
        "id": "demo_shapes",
        "name": "a shapefile in a zip",
        "download_url": "https://example.org/demo/shapes.zip",
        "compression_format": "zip",
        "source_format": "polygons",
        "source_crs": "EPSG:3031",
        "standin": {
            "bounds": [-1800000, -1000000, -1000000, -200000],
            "count": {"small": 40, "full": 4000},
            "diameters": [5000, 60000],
            "seed": 3,
        },
    },
    {
        "id": "demo_geojson",
        "name": "a GeoJSON file",
        "download_url": "https://example.org/demo/areas.geojson",
        "source_format": "polygons",
        "source_crs": "EPSG:3031",
        "standin": {
            "bounds": [-2000000, -900000, -1500000, -400000],
            "count": {"small": 25, "full": 250},
            "diameters": [10000, 40000],
        },
    },
]


def _variable(name: str, source: str, **recipe) -> dict:
    base = {"name": name, "long_name": name, "units": "1", "dims": ["y", "x"], "source": source}
    return base | recipe


DESCRIBED_VARIABLES = [
    _variable(
        "stack_band_2",
        "demo_stack",
        dims=["time", "y", "x"],
        source_files_by_time={"2013-01-01": "a/2013.tif", "2017-01-01": "a/2017.tif"},
        source_variable="2",
        resampling="linear",
    ),
    _variable("gmt_z", "demo_gmt", source_file="grid.nc", resampling="linear"),
    _variable(
        "lat_a", "demo_latlon", source_file="latlon.nc", source_variable="a", resampling="linear"
    ),
    _variable(
        "lat_b", "demo_latlon", source_file="latlon.nc", source_variable="b", resampling="nearest"
    ),
    _variable(
        "shapes",
        "demo_shapes",
        source_file="shapes/shapes.shp",
        source_variable="kind",
        classes={"big": 1, "small": 2},
        background=0,
    ),
    _variable(
        "areas",
        "demo_geojson",
        source_file="areas.geojson",
        source_variable="type",
        classes={"x": 1},
    ),
]


@pytest.fixture(scope="module")
def described_spec(repo_spec_path, tmp_path_factory):
    document = json.loads(repo_spec_path.read_text())
    document["properties"]["sources"] = DESCRIBED_SOURCES
    document["properties"]["variables"] = DESCRIBED_VARIABLES
    path = tmp_path_factory.mktemp("described") / "cube.geojson"
    path.write_text(json.dumps(document))
    return load_spec(path)


@pytest.fixture(scope="module")
def described(described_spec, tmp_path_factory):
    """{source id: its converted variables}, downloaded from the mirror as a build does."""
    folder = tmp_path_factory.mktemp("described-standins")
    paths = make_standins(folder, "small", described_spec)
    assert [p.name for p in paths] == [s.file_name for s in described_spec.sources]
    converted = {}
    with serving_mirror(folder) as mirror:
        for source in described_spec.sources:
            fetched = fetch_source(source, folder / "cache", mirror=mirror)
            converted[source.id] = {
                c.variable.name: c.layers for c in convert_source(described_spec, fetched)
            }
    return folder, converted


def test_described_standins_are_deterministic(described, described_spec, tmp_path):
    folder, _ = described
    for path in make_standins(tmp_path, "small", described_spec):
        assert _digest(path.read_bytes()) == _digest((folder / path.name).read_bytes()), path.name


def test_described_geotiffs_in_a_tar(described, described_spec):
    folder, converted = described
    with tarfile.open(folder / "stack.tar") as tar:
        assert tar.getnames() == ["a/2013.tif", "a/2017.tif"]
    layers = converted["demo_stack"]["stack_band_2"]
    assert [str(t) for t in layers] == ["2013-01-01", "2017-01-01"]
    first, second = (layer.data.values for layer in layers.values())
    assert first.shape == (40, 40) and not np.array_equal(first, second)  # a field per year
    assert 0 <= first.min() < first.max() <= 5 and np.isfinite(first).all()
    x = layers[min(layers)].data["x"].values
    assert x[0] == -1600000 + 5000 and x[-1] == -1200000 - 5000


def test_described_gmt_grid_has_gridline_nodes(described):
    _, converted = described
    (layer,) = converted["demo_gmt"]["gmt_z"].values()
    x, y = layer.data["x"].values, layer.data["y"].values
    assert (x[0], x[-1], y[0], y[-1]) == (-2400000, -900000, -1400000, 300000)
    assert "gridline registration" in layer.description
    values = layer.data.values
    assert 0.5 < np.isfinite(values).mean() < 0.9  # valid_fraction 0.7
    assert -30 <= np.nanmin(values) < np.nanmax(values) <= -5


def test_described_latlon_netcdf_holds_each_variable(described):
    _, converted = described
    (a,) = converted["demo_latlon"]["lat_a"].values()
    (b,) = converted["demo_latlon"]["lat_b"].values()
    assert a.data.shape == b.data.shape == (36, 140)
    assert (np.diff(a.data["y"].values) > 0).all() and a.data["y"].values[0] == -81.75
    assert not np.array_equal(a.data.values, b.data.values)
    assert 10 <= float(a.data.min()) < float(a.data.max()) <= 90


def test_described_polygons_carry_the_recipe_classes(described, described_spec):
    folder, converted = described
    with zipfile.ZipFile(folder / "shapes.zip") as archive:
        assert sorted(archive.namelist()) == [
            f"shapes/shapes.{ext}" for ext in ("cpg", "dbf", "prj", "shp", "shx")
        ]
    (shapes,) = converted["demo_shapes"]["shapes"].values()
    assert len(shapes.frame) == 40 and set(shapes.frame["code"]) == {1, 2}
    assert shapes.frame.is_valid.all()
    xmin, ymin, xmax, ymax = shapes.frame.total_bounds
    assert -1800000 <= xmin and xmax <= -1000000 and -1000000 <= ymin and ymax <= -200000
    (areas,) = converted["demo_geojson"]["areas"].values()
    assert len(areas.frame) == 25 and set(areas.frame["code"]) == {1}
    assert areas.frame.crs.to_epsg() == 3031
