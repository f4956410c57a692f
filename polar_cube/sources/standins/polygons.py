"""Polygon stand-ins: the WAIS supraglacial lakes and channels, and described polygon sets.

``WAIS_Max_Extent.zip``: ``WAIS_Max_Extent/WAIS_Jan_2017_Polygons.{shp,shx,dbf,prj,cpg}``
(ESRI WKT polar stereographic, standard parallel -71, no EPSG code), ``.geojson`` (lon/lat)
and ``.kmz`` (doc.kml, lon/lat). Fields ID, Feature_Cl (Lake/Channel), POLY_AREA (m2),
Location (Ice Shelf/Grounded Ice/Crosses GL). full: 10478 polygons (10223 Lake, 255
Channel); small: 500 (488 Lake, 12 Channel). Lakes clustered on coastal ice shelves.
The .dbf carries a fixed date, so the bytes are the same on every run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from polar_cube.sources.standins.packing import FIXED_TIME, zip_bytes
from polar_cube.spec import PolygonStandin, Scale, SourceSpec, VariableSpec

WAIS_FILE = "WAIS_Max_Extent.zip"
WAIS_COUNTS = {"full": (10223, 255), "small": (488, 12)}  # (lakes, channels)
WAIS_PRJ = (
    'PROJCS["Polar_Stereographic_South_71",GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",'
    'SPHEROID["WGS_1984",6378137.0,298.257223563]],PRIMEM["Greenwich",0.0],'
    'UNIT["Degree",0.0174532925199433]],PROJECTION["Stereographic_South_Pole"],'
    'PARAMETER["False_Easting",0.0],PARAMETER["False_Northing",0.0],'
    'PARAMETER["Central_Meridian",0.0],PARAMETER["Standard_Parallel_1",-71.0],'
    'UNIT["Meter",1.0]]'
)
WAIS_CRS = "+proj=stere +lat_0=-90 +lat_ts=-71 +lon_0=0 +x_0=0 +y_0=0 +datum=WGS84 +units=m"
# Supraglacial lake clusters (x, y, along-coast spread m, across spread m, weight).
LAKE_CLUSTERS = (
    (-1387700.0, -971700.0, 90000.0, 25000.0, 0.30),  # Getz
    (-1914600.0, -66900.0, 80000.0, 25000.0, 0.20),  # Abbot
    (-1774500.0, -328900.0, 40000.0, 15000.0, 0.10),  # Cosgrove
    (-1569600.0, -666200.0, 50000.0, 20000.0, 0.15),  # Dotson / Crosson
    (-1603000.0, -282700.0, 30000.0, 12000.0, 0.10),  # Pine Island
    (-740000.0, -1228300.0, 30000.0, 20000.0, 0.15),  # Sulzberger
)


def _cluster_point(rng: np.random.Generator, cluster: tuple) -> tuple[float, float]:
    """A random point of a lake cluster, spread along the coast (normal to the pole
    direction) and across it; truncated at 2.5 sigma so it stays inside the cube bbox."""
    cx, cy, along, across, _ = cluster
    a, b = np.clip(rng.normal(0.0, 1.0, 2), -2.5, 2.5) * (along, across)
    rho = np.hypot(cx, cy)
    return cx + (-a * cy - b * cx) / rho, cy + (a * cx - b * cy) / rho


def _lake_polygons(rng: np.random.Generator, n: int) -> list[shapely.Polygon]:
    """Irregular star-shaped blobs 50 m .. 3 km across, clustered on coastal ice shelves."""
    weights = np.array([c[4] for c in LAKE_CLUSTERS])
    which = rng.choice(len(LAKE_CLUSTERS), size=n, p=weights / weights.sum())
    polygons = []
    for k in which:
        x0, y0 = _cluster_point(rng, LAKE_CLUSTERS[k])
        diameter = np.exp(rng.uniform(np.log(50.0), np.log(3000.0)))
        polygons.append(_blob(rng, x0, y0, diameter))
    return polygons


def _blob(rng: np.random.Generator, x0: float, y0: float, diameter: float) -> shapely.Polygon:
    """An irregular star-shaped (hence valid) polygon of `diameter` centred on (x0, y0)."""
    n_vert = int(np.clip(diameter / 40.0, 8, 40))
    t = np.linspace(0.0, 2 * np.pi, n_vert, endpoint=False)
    r = (1.0 + 0.6 * rng.uniform() * np.cos(t) ** 2) * rng.uniform(0.9, 1.1, n_vert)
    for harmonic in range(2, 6):  # radius stays > 0
        r += rng.uniform(0.0, 0.3 / harmonic) * np.cos(harmonic * t + rng.uniform(0, 7))
    r *= diameter / 2 / r.max()
    turn = rng.uniform(0, np.pi)
    return shapely.Polygon(np.c_[x0 + r * np.cos(t + turn), y0 + r * np.sin(t + turn)])


def _channel_polygons(rng: np.random.Generator, n: int) -> list[shapely.Polygon]:
    """Buffered meandering lines 1..20 km long and 50..300 m wide, near the lake clusters."""
    polygons = []
    for _ in range(n):
        x0, y0 = _cluster_point(rng, LAKE_CLUSTERS[rng.integers(len(LAKE_CLUSTERS))])
        length = rng.uniform(1e3, 20e3)
        steps = max(8, int(length / 250.0))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.15, steps))
        step = length / steps
        x = x0 + np.cumsum(step * np.cos(heading))
        y = y0 + np.cumsum(step * np.sin(heading))
        line = shapely.LineString(np.c_[x, y]).simplify(step / 10)
        polygons.append(line.buffer(rng.uniform(25.0, 150.0), quad_segs=2))
    return polygons


def _wais_frame(scale: Scale) -> gpd.GeoDataFrame:
    """The supraglacial lake/channel polygons with the real attribute fields."""
    rng = np.random.default_rng(500)
    n_lake, n_channel = WAIS_COUNTS[scale]
    geoms = _lake_polygons(rng, n_lake) + _channel_polygons(rng, n_channel)
    order = rng.permutation(len(geoms))
    geoms = [geoms[i] for i in order]
    kinds = np.array(["Lake"] * n_lake + ["Channel"] * n_channel)[order]
    location = rng.choice(
        ["Ice Shelf", "Grounded Ice", "Crosses GL"], len(geoms), p=[0.7, 0.2, 0.1]
    )
    return gpd.GeoDataFrame(
        {
            "ID": np.arange(1, len(geoms) + 1, dtype=np.int32),
            "Feature_Cl": kinds,
            "POLY_AREA": shapely.area(geoms),
            "Location": location,
        },
        geometry=geoms,
        crs=WAIS_CRS,
    )


def _kml(frame: gpd.GeoDataFrame) -> str:
    """A minimal KML document of ``frame`` (exterior rings only) in lon/lat."""
    lonlat = frame.to_crs("EPSG:4326")
    marks = []
    for row in lonlat.itertuples():
        coords = " ".join(f"{x:.7f},{y:.7f}" for x, y in row.geometry.exterior.coords)
        marks.append(
            f"<Placemark><name>{row.ID}</name><description>{row.Feature_Cl}; {row.Location}; "
            f"{row.POLY_AREA:.1f} m2</description><Polygon><outerBoundaryIs><LinearRing>"
            f"<coordinates>{coords}</coordinates></LinearRing></outerBoundaryIs></Polygon>"
            "</Placemark>"
        )
    body = "\n".join(marks)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<kml xmlns="http://www.opengis.net/kml/2.2">'
        f"<Document><name>WAIS_Jan_2017_Polygons</name>\n{body}\n</Document></kml>\n"
    )


def _fixed_date_dbf(dbf: Path) -> bytes:
    """The .dbf's bytes with its "last update" date set to FIXED_TIME's (it is today's)."""
    data = bytearray(dbf.read_bytes())
    data[1:4] = bytes([FIXED_TIME[0] - 1900, FIXED_TIME[1], FIXED_TIME[2]])
    return bytes(data)


def write_wais_zip(path: Path, scale: Scale) -> Path:
    """Corr et al. (2022) zip: shapefile set, GeoJSON and KMZ under ``WAIS_Max_Extent/``."""
    frame = _wais_frame(scale)
    stem = "WAIS_Jan_2017_Polygons"
    with tempfile.TemporaryDirectory() as tmp:
        shp = Path(tmp) / f"{stem}.shp"
        frame.to_file(shp, driver="ESRI Shapefile", engine="pyogrio", encoding="UTF-8")
        members = {f"{stem}{ext}": shp.with_suffix(ext).read_bytes() for ext in (".shp", ".shx")}
        members[f"{stem}.dbf"] = _fixed_date_dbf(shp.with_suffix(".dbf"))
        members[f"{stem}.prj"] = WAIS_PRJ.encode()
        members[f"{stem}.cpg"] = b"UTF-8"
        geojson = Path(tmp) / f"{stem}.geojson"
        frame.to_crs("EPSG:4326").to_file(geojson, driver="GeoJSON", engine="pyogrio")
        members[f"{stem}.geojson"] = geojson.read_bytes()
    members[f"{stem}.kmz"] = zip_bytes({"doc.kml": _kml(frame).encode()})
    prefixed = {f"WAIS_Max_Extent/{name}": data for name, data in members.items()}
    path.write_bytes(zip_bytes(prefixed, dirs=("WAIS_Max_Extent/",)))
    return path


def _described_polygons(
    standin: PolygonStandin, scale: Scale, variables: list[VariableSpec], seed: int, crs: str
) -> gpd.GeoDataFrame:
    """Blobs scattered over the bounds; each variable's attribute gets one of its classes."""
    rng = np.random.default_rng(seed)
    xmin, ymin, xmax, ymax = standin.bounds
    small, large = standin.diameters
    count = standin.count[scale]
    margin_x, margin_y = (min(large / 2, (hi - lo) / 2) for lo, hi in ((xmin, xmax), (ymin, ymax)))
    x0 = rng.uniform(xmin + margin_x, xmax - margin_x, count)
    y0 = rng.uniform(ymin + margin_y, ymax - margin_y, count)
    diameters = np.exp(rng.uniform(np.log(small), np.log(large), count))
    geometries = [_blob(rng, x, y, d) for x, y, d in zip(x0, y0, diameters, strict=True)]
    columns: dict[str, object] = {"ID": np.arange(1, count + 1, dtype=np.int32)}
    for variable in variables:
        columns[variable.source_variable] = rng.choice(sorted(variable.classes), count)
    return gpd.GeoDataFrame(columns, geometry=geometries, crs=crs)


def write_described_polygons(
    path: Path, source: SourceSpec, variables: list[VariableSpec], scale: Scale, seed: int
) -> list[Path]:
    """A shapefile set (.shp .shx .dbf .prj .cpg) or a GeoJSON file of blobs scattered over
    the `standin` bounds; return the files."""
    standin = source.standin
    assert isinstance(standin, PolygonStandin)
    frame = _described_polygons(standin, scale, variables, seed, source.source_crs)
    if path.suffix.lower() == ".geojson":
        frame.to_file(path, driver="GeoJSON", engine="pyogrio")
        return [path]
    frame.to_file(path, driver="ESRI Shapefile", engine="pyogrio", encoding="UTF-8")
    path.with_suffix(".dbf").write_bytes(_fixed_date_dbf(path.with_suffix(".dbf")))
    return sorted(p for p in path.parent.glob(f"{path.stem}.*") if p.is_file())
