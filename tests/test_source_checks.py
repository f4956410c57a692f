"""The per-format completeness checks on real files, whole and cut short."""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from polar_cube.sources.archives import ArchiveError, check_archive
from polar_cube.sources.checks import check_file
from polar_cube.sources.readers import SourceFormatError
from polar_cube.sources.sniff import body_kind

GHF = "200km_GHF_windowCenters.nc"
SMOS = "SMOS_IceThickness_2015_300.nc"
MAG = "ASE_MagneticCompilation_Dziadeketal_250m.tif"
WAIS = "WAIS_Max_Extent.zip"
SHP = "WAIS_Max_Extent/WAIS_Jan_2017_Polygons"


def cut_copy(source: Path, folder: Path, keep: float | int) -> tuple[Path, int]:
    """A copy of `source` in `folder` cut to `keep` bytes (or that fraction); (path, size)."""
    path = folder / source.name
    shutil.copyfile(source, path)
    full = path.stat().st_size
    os.truncate(path, keep if isinstance(keep, int) else int(full * keep))
    return path, full


@pytest.mark.parametrize(
    ("name", "fmt"), [(GHF, "gmt_netcdf"), (SMOS, "latlon_netcdf"), (MAG, "geotiff")]
)
def test_stand_ins_pass_and_truncated_copies_fail(small_standins, tmp_path, name, fmt):
    check_file(small_standins / name, fmt)
    path, full = cut_copy(small_standins / name, tmp_path, 0.5)
    with pytest.raises(SourceFormatError) as info:
        check_file(path, fmt, name="the copy")
    assert str(info.value) == (
        f"the copy is truncated: its header declares {full} bytes of data, the file has {full // 2}"
    )


@pytest.mark.parametrize("fmt", ["NETCDF3_CLASSIC", "NETCDF3_64BIT_OFFSET", "NETCDF3_64BIT_DATA"])
@pytest.mark.parametrize("record_variables", [0, 1, 2])
def test_classic_netcdf_sizes_from_the_header(tmp_path, fmt, record_variables):
    """CDF-1/2/5 with fixed and record variables: whole passes, missing 4 bytes of data fails
    (libnetcdf itself would read them as zeros)."""
    path = tmp_path / "c.nc"
    with netCDF4.Dataset(path, "w", format=fmt) as dataset:
        dataset.createDimension("time", None)
        dataset.createDimension("x", 3)
        dataset.createVariable("fixed", "i2", ("x",))[:] = [1, 2, 3]
        dataset.createVariable("scalar", "f8", ()).assignValue(2.0)
        for k in range(record_variables):
            dataset.createVariable(f"r{k}", "f4", ("time", "x"))[:] = np.ones((4, 3))
    check_file(path, "gmt_netcdf")
    full = path.stat().st_size
    os.truncate(path, full - 4)
    with netCDF4.Dataset(path) as dataset:  # what the checks are for: it opens
        assert dataset.variables
    with pytest.raises(SourceFormatError, match=rf"c.nc is truncated: .* {full} bytes"):
        check_file(path, "gmt_netcdf")


def test_cut_classic_header(small_standins, tmp_path):
    path, _ = cut_copy(small_standins / GHF, tmp_path, 100)
    with pytest.raises(SourceFormatError, match="netCDF header goes past the end of the file"):
        check_file(path, "gmt_netcdf")


def test_damaged_netcdf4_is_refused(small_standins, tmp_path):
    """A netCDF-4 file whose superblock survives but whose data is zeroed out."""
    path = tmp_path / SMOS
    shutil.copyfile(small_standins / SMOS, path)
    with path.open("r+b") as f:
        f.seek(2048)
        f.write(b"\0" * (path.stat().st_size - 4096))
    with pytest.raises(SourceFormatError, match=rf"{SMOS}: cannot .*(truncated or damaged\?)"):
        check_file(path, "latlon_netcdf")


def write_tif(path: Path, **profile) -> Path:
    values = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=96,
        height=64,
        count=1,
        dtype="float32",
        crs="EPSG:3031",
        transform=from_origin(0, 0, 100, 100),
        nodata=np.nan,
        **profile,
    ) as dst:
        dst.write(values, 1)
    return path


@pytest.mark.parametrize(
    "profile",
    [{"blockysize": 4}, {"tiled": True, "blockxsize": 32, "blockysize": 32, "compress": "deflate"}],
    ids=["strips", "compressed-tiles"],
)
def test_geotiff_strips_and_tiles(tmp_path, profile):
    path = write_tif(tmp_path / "t.tif", **profile)
    check_file(path, "geotiff")
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(SourceFormatError, match="t.tif is truncated: its header declares"):
        check_file(path, "geotiff")


def test_sparse_geotiff_passes(tmp_path):
    """Tiles GDAL did not write (all nodata, SPARSE_OK) take no bytes and are fine."""
    path = tmp_path / "sparse.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=1,
        dtype="float32",
        nodata=0,
        tiled=True,
        blockxsize=32,
        blockysize=32,
        sparse_ok=True,
        crs="EPSG:3031",
        transform=from_origin(0, 0, 100, 100),
    ) as dst:
        dst.write(np.ones((32, 32), np.float32), 1, window=((0, 32), (0, 32)))
    with rasterio.open(path) as src:
        assert src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1) in (None, "", "0")
    check_file(path, "geotiff")


def test_geotiff_damaged_in_its_last_block(tmp_path):
    path = write_tif(tmp_path / "d.tif", tiled=True, blockxsize=32, blockysize=32, compress="lzw")
    with rasterio.open(path) as src:
        offsets = [
            int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
            for r in range(2)
            for c in range(3)
        ]
    with path.open("r+b") as f:
        f.seek(max(offsets))
        f.write(b"\xff" * 64)
    with pytest.raises(SourceFormatError, match="d.tif: cannot decode its last block"):
        check_file(path, "geotiff")


@pytest.fixture
def wais_folder(small_standins, tmp_path) -> Path:
    with zipfile.ZipFile(small_standins / WAIS) as archive:
        archive.extractall(tmp_path)
    return tmp_path


def test_polygons_pass(wais_folder):
    check_file(wais_folder / f"{SHP}.shp", "polygons")
    check_file(wais_folder / f"{SHP}.geojson", "polygons")


@pytest.mark.parametrize("part", [".shp", ".shx", ".dbf"])
def test_shapefile_with_a_cut_part(wais_folder, part):
    """GDAL would read a cut .shp as features without geometry: the check refuses it."""
    path = wais_folder / f"{SHP}{part}"
    full = path.stat().st_size
    declared = full - 1 if part == ".dbf" else full  # a .dbf ends with an extra EOF byte
    os.truncate(path, full // 2)
    with pytest.raises(SourceFormatError) as info:
        check_file(wais_folder / f"{SHP}.shp", "polygons", name="member x.shp")
    assert str(info.value) == (
        f"member x{part} is truncated: its header declares {declared} bytes of data, "
        f"the file has {full // 2}"
    )


def test_shapefile_without_its_dbf(wais_folder):
    (wais_folder / f"{SHP}.dbf").unlink()
    with pytest.raises(SourceFormatError, match=r"Polygons.dbf: missing"):
        check_file(wais_folder / f"{SHP}.shp", "polygons")


@pytest.mark.parametrize(
    ("fmt", "what"), [("gmt_netcdf", "netCDF"), ("geotiff", "GeoTIFF"), ("polygons", "polygons")]
)
def test_web_pages_and_text_are_named(tmp_path, fmt, what):
    page = tmp_path / "login.bin"
    page.write_text("\n  <!DOCTYPE html><html><body>Please log in</body></html>")
    with pytest.raises(SourceFormatError) as info:
        check_file(page, fmt)
    assert str(info.value) == (
        f"{page}: cannot open as {what}: it is an HTML page (a login or error page?), not data"
    )
    if fmt != "polygons":  # GeoJSON and KML are text
        page.write_text("Service temporarily unavailable, try again later")
        with pytest.raises(SourceFormatError, match=r"it is text, not data: 'Service temp"):
            check_file(page, fmt)


def test_body_kind():
    assert body_kind(b"  \r\n<!doctype HTML>\n<html>") == "html"
    assert body_kind(b"\xef\xbb\xbf<HTML lang='en'>") == "html"
    assert body_kind(b"<?xml version='1.0'?><Error>AccessDenied</Error>") == "text"
    assert body_kind("Zugriff verweigert: Anmeldung nötig".encode()[:-1]) == "text"  # cut char
    assert body_kind(b"") == "empty"
    assert body_kind(b"CDF\x01\x00\x00\x00\x00") is None
    assert body_kind(b"II*\x00\x08\x00") is None
    assert body_kind(bytes(range(256))) is None


def test_tar_cut_at_a_member_boundary(small_standins, tmp_path):
    """tarfile lists such a tar without complaint; its missing end block gives it away."""
    source = small_standins / "Malczyk_etal_2020_data_v2.tar"
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    boundary = members[-2].offset_data + -(-members[-2].size // 512) * 512
    path, _ = cut_copy(source, tmp_path, boundary)
    with pytest.raises(ArchiveError) as info:
        check_archive(path, "tar")
    assert str(info.value) == (
        f"{path.name} is truncated: it ends after member {members[-2].name!r} "
        "without the tar end block"
    )
    assert check_archive(source, "tar") == [m.name for m in members]


def test_cut_zip(small_standins, tmp_path):
    path, _ = cut_copy(small_standins / WAIS, tmp_path, 0.7)
    with pytest.raises(ArchiveError, match=rf"{WAIS}: cannot read as a zip archive \(truncated"):
        check_archive(path, "zip")
