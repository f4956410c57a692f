"""What cluster workers that share only the bucket rely on, on a local-folder "bucket":
sources staged with a manifest written last, readers that read from the staged copy, and
per-dataset cubes written in place with their markers last."""

import json
import pickle

import numpy as np
import pytest
import xarray as xr

from polar_cube.dataset import FetchedSource, convert_source
from polar_cube.location import StoreLocation
from polar_cube.sources.readers import open_source
from polar_cube.sources.staging import MANIFEST, source_files, stage_source
from polar_cube.spec import load_spec
from polar_cube.zarr_store import (
    sibling_levels,
    stored_fingerprint,
    stored_levels_fingerprint,
    write_zarr_atomically,
    write_zarr_in_place,
)
from tests.test_readers import write_tif
from tests.test_zarr_store import dataset


def fetched_folder(tmp_path, sha="a" * 64):
    folder = tmp_path / "cache" / "lakes" / "extracted"
    folder.mkdir(parents=True)
    (folder / "one.tif").write_bytes(b"1" * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "two.tif").write_bytes(b"2" * 20)
    (folder / ".extracted.json").write_text("{}")  # the cache's own record: not staged
    (folder / "three.tif.part").write_bytes(b"x")  # an unfinished download: not staged
    spec = load_spec("cube.geojson")
    source = spec.sources[0]
    return FetchedSource(source, folder, "https://example.org/lakes.tar", sha), source.id


def test_staging_copies_the_files_then_the_manifest_and_skips_when_the_same(tmp_path):
    fetched, source_id = fetched_folder(tmp_path)
    bucket = StoreLocation.local(tmp_path / "bucket")
    staged = stage_source(fetched, bucket)
    where = tmp_path / "bucket" / "sources" / source_id
    assert not staged.skipped and (staged.files, staged.bytes) == (2, 30)
    assert sorted(source_files(where)) == ["one.tif", "sub/two.tif"]
    manifest = json.loads((where / MANIFEST).read_text())
    assert manifest["sha256"] == "a" * 64 and manifest["url"] == fetched.url
    assert manifest["files"]["sub/two.tif"]["size"] == 20
    assert len(manifest["files"]["one.tif"]["sha256"]) == 64
    # the manifest is the marker: written after every file
    assert (where / MANIFEST).stat().st_mtime_ns >= (where / "sub" / "two.tif").stat().st_mtime_ns

    before = {p: p.stat().st_mtime_ns for p in where.rglob("*")}
    assert stage_source(fetched, bucket).skipped
    assert {p: p.stat().st_mtime_ns for p in where.rglob("*")} == before


def test_another_download_is_staged_again_and_stale_files_go(tmp_path):
    fetched, source_id = fetched_folder(tmp_path)
    bucket = StoreLocation.local(tmp_path / "bucket")
    stage_source(fetched, bucket)
    (fetched.folder / "sub" / "two.tif").unlink()
    (fetched.folder / "one.tif").write_bytes(b"new" * 5)
    changed = FetchedSource(fetched.source, fetched.folder, fetched.url, "b" * 64)
    assert not stage_source(changed, bucket).skipped
    where = tmp_path / "bucket" / "sources" / source_id
    assert sorted(source_files(where)) == ["one.tif"]
    assert (where / "one.tif").read_bytes() == b"new" * 5
    assert json.loads((where / MANIFEST).read_text())["sha256"] == "b" * 64


def test_a_half_staged_source_is_not_taken_for_a_staged_one(tmp_path):
    fetched, source_id = fetched_folder(tmp_path)
    bucket = StoreLocation.local(tmp_path / "bucket")
    stage_source(fetched, bucket)
    where = tmp_path / "bucket" / "sources" / source_id
    (where / "sub" / "two.tif").write_bytes(b"cut")  # a copy cut short, manifest still there
    assert not stage_source(fetched, bucket).skipped
    assert (where / "sub" / "two.tif").read_bytes() == b"2" * 20


def test_readers_read_the_staged_copy_not_the_cache(tmp_path):
    """The lazy layer reads from the staged copy (what a worker without the cache does);
    it survives pickling, as it does on its way to a dask worker."""
    values = np.arange(48, dtype=np.float32).reshape(6, 8)
    local, staged = tmp_path / "cache.tif", tmp_path / "bucket" / "a.tif"
    write_tif(local, values, -2_000_000.0, -400_000.0, 250.0)
    staged.parent.mkdir()
    write_tif(staged, values * 10, -2_000_000.0, -400_000.0, 250.0)  # tells the two apart
    layer = open_source(local, "geotiff", None, "EPSG:3031", StoreLocation.local(staged))
    shipped = pickle.loads(pickle.dumps(layer.data))
    np.testing.assert_array_equal(shipped.values, values * 10)
    assert layer.data.encoding["source"] == str(staged)


def test_cube_written_in_place_equals_the_swapped_in_one(tmp_path):
    swapped = write_zarr_atomically(dataset(1.0), tmp_path / "local" / "cube.zarr", 64)
    bucket = StoreLocation.local(tmp_path / "bucket")
    in_place = write_zarr_in_place(dataset(1.0), bucket.child("cube.zarr"), 64)
    assert stored_fingerprint(in_place) == "fingerprint-1.0"
    assert stored_levels_fingerprint(sibling_levels(in_place)) == "fingerprint-1.0"
    a, b = xr.open_zarr(swapped), xr.open_zarr(in_place.root)
    for name in ("static", "stepped"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
        assert a[name].attrs["polar_cube_stats"] == b[name].attrs["polar_cube_stats"]

    def names(folder):
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}

    assert names(tmp_path / "bucket" / "cube.zarr") == names(swapped)


def test_an_interrupted_write_in_place_is_no_cube_and_the_next_replaces_it(tmp_path):
    bucket = StoreLocation.local(tmp_path / "bucket")
    target = bucket.child("cube.zarr")
    write_zarr_in_place(dataset(1.0), target, 64)
    with pytest.raises(RuntimeError, match="boom"):
        write_zarr_in_place(dataset(5.0, fail=True), target, 64)
    # the old cube was taken down first; what the failed write left has no markers
    assert stored_fingerprint(target) is None
    assert stored_levels_fingerprint(sibling_levels(target)) is None
    write_zarr_in_place(dataset(5.0), target, 64)
    assert stored_fingerprint(target) == "fingerprint-5.0"
    assert float(xr.open_zarr(target.root).static.mean()) == 5.0


def test_convert_source_reads_every_layer_from_the_bucket(small_standins, tmp_path):
    """The magnetic GeoTIFF and the CryoSMOS netCDF, staged, read back equal to the cache."""
    spec = load_spec("cube.geojson")
    bucket = StoreLocation.local(tmp_path / "bucket")
    for source_id in ("magnetic_anomaly", "ice_thickness_cryosmos"):
        source = next(s for s in spec.sources if s.id == source_id)
        fetched = FetchedSource(source, small_standins, source.download_url, "c" * 64)
        staged = stage_source(fetched, bucket).location
        local = convert_source(spec, fetched)
        remote = convert_source(spec, FetchedSource(**{**vars(fetched), "staged": staged}))
        for here, there in zip(local, remote, strict=True):
            for a, b in zip(here.layers.values(), there.layers.values(), strict=True):
                assert b.data.encoding["source"].startswith(str(tmp_path / "bucket"))
                shipped = pickle.loads(pickle.dumps(b.data))
                np.testing.assert_array_equal(a.data.values, shipped.values)
