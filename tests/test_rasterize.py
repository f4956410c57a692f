"""Polygons burnt onto the grid at cell centres."""

import geopandas
import numpy as np
import pytest
from shapely.geometry import box

from polar_cube.grid import TargetGrid
from polar_cube.rasterize import rasterize_layer, read_polygons
from polar_cube.sources.readers import SourceFormatError

STEREO_71 = "+proj=stere +lat_0=-90 +lat_ts=-71 +lon_0=0 +x_0=0 +y_0=0 +datum=WGS84 +units=m"
CLASSES = {"Lake": 1, "Channel": 2}


def write_shapefile(tmp_path, rows, crs=STEREO_71):
    frame = geopandas.GeoDataFrame(
        {"Feature_Cl": [r[0] for r in rows]}, geometry=[r[1] for r in rows], crs=crs
    )
    path = tmp_path / "polygons.shp"
    frame.to_file(path)
    return path


def test_cells_take_the_code_of_the_polygon_holding_their_centre(tmp_path):
    rows = [
        ("Lake", box(1000, 1000, 3000, 2000)),  # covers centres x 1050..2950, y 1050..1950
        ("Channel", box(2420, 0, 2580, 4000)),  # thin: holds the centres at x=2450 and 2550
        ("Lake", box(3000, 3000, 3040, 3040)),  # smaller than a cell, holds no centre
    ]
    path = write_shapefile(tmp_path, rows)
    layer = read_polygons(path, "Feature_Cl", CLASSES, 0, "EPSG:3031")
    assert "3 polygons (2 Lake, 1 Channel)" in layer.description
    grid = TargetGrid("EPSG:3031", (0, 0, 4000, 4000), 100, chunk_size=16)
    out = rasterize_layer(layer, grid).values
    assert out.dtype == np.float32
    at = lambda x, y: out[int((y - 50) // 100), int((x - 50) // 100)]  # noqa: E731
    assert at(1050, 1050) == 1 and at(2950, 1950) == 1  # lake corners, y ascending
    assert at(950, 1050) == 0 and at(1050, 2050) == 0  # just outside
    assert at(2450, 1500) == 2 and at(2550, 3500) == 2  # channel wins over lake
    assert at(2350, 3500) == 0 and at(3050, 3050) == 0
    assert (out == 1).sum() == 20 * 10 - 2 * 10  # lake minus the channel's two columns


def test_unknown_class_and_attribute_are_named(tmp_path):
    path = write_shapefile(tmp_path, [("Pond", box(0, 0, 10, 10))])
    with pytest.raises(SourceFormatError, match=r"polygons.shp: Feature_Cl values \['Pond'\]"):
        read_polygons(path, "Feature_Cl", CLASSES, 0, "EPSG:3031")
    with pytest.raises(SourceFormatError, match=r"polygons.shp: no attribute 'Kind'"):
        read_polygons(path, "Kind", CLASSES, 0, "EPSG:3031")
