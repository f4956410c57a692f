"""Uploading per-dataset cubes to a local-folder store (the S3 variant is in test_s3.py):
complete copies with their levels, metadata last, skipped when the same, stale objects
removed, and an interrupted upload never taken for a complete one."""

import pytest
import xarray as xr

from polar_cube.cube import upload
from polar_cube.cube.upload import is_metadata, local_files, upload_cube, write_batches
from polar_cube.location import StoreLocation
from polar_cube.zarr_store import levels_path, stored_fingerprint, write_zarr_atomically
from tests.test_zarr_store import GRID, dataset


@pytest.fixture
def cube(tmp_path):
    return write_zarr_atomically(dataset(1.0), tmp_path / "local" / "lakes.zarr", GRID.chunk_size)


def uploaded(store, name="lakes"):
    return store / "inputs" / f"{name}.zarr", store / "inputs" / f"{name}.levels"


def test_an_upload_is_a_complete_copy_with_its_levels(cube, tmp_path):
    store = tmp_path / "store"
    result = upload_cube(cube, StoreLocation.local(store))
    remote, remote_levels = uploaded(store)
    assert not result.skipped and result.url == str(remote)
    assert local_files(remote) == local_files(cube)
    assert local_files(remote_levels) == local_files(levels_path(cube))
    assert stored_fingerprint(remote) == "fingerprint-1.0"
    xr.testing.assert_identical(xr.open_zarr(remote), xr.open_zarr(cube))


def test_metadata_goes_after_the_chunks_and_the_markers_last():
    keys = ["static/0.0", "static/.zarray", ".zgroup", ".zmetadata", "x/0", ".zlevels", "0.link"]
    batches = write_batches(keys)
    assert batches[0] == ["static/0.0", "x/0"]  # chunks first
    assert not any(is_metadata(k) for k in batches[0])
    assert batches[-2:] == [[".zmetadata"], [".zlevels"]]  # the completeness markers last


def test_the_same_cube_is_skipped_and_a_changed_one_replaces_it(cube, tmp_path):
    store = StoreLocation.local(tmp_path / "store")
    upload_cube(cube, store)
    remote, _ = uploaded(tmp_path / "store")
    before = {p: p.stat().st_mtime_ns for p in remote.rglob("*")}
    assert upload_cube(cube, store).skipped
    assert {p: p.stat().st_mtime_ns for p in remote.rglob("*")} == before

    stale = remote / "static" / "9.9"
    stale.write_bytes(b"left by an older cube")
    write_zarr_atomically(dataset(2.0), cube, GRID.chunk_size)
    assert not upload_cube(cube, store).skipped
    assert not stale.exists()
    assert stored_fingerprint(remote) == "fingerprint-2.0"
    assert float(xr.open_zarr(remote).static.mean()) == 2.0


def test_an_interrupted_upload_is_not_complete_and_the_next_completes_it(
    cube, tmp_path, monkeypatch
):
    store = StoreLocation.local(tmp_path / "store")
    upload_cube(cube, store)
    write_zarr_atomically(dataset(3.0), cube, GRID.chunk_size)
    real_replace, sent = upload.replace_file, []

    def dies_after_a_few(source, target):
        if len(sent) == 3:
            raise OSError("connection lost")
        sent.append(target)
        real_replace(source, target)

    monkeypatch.setattr(upload, "replace_file", dies_after_a_few)
    with pytest.raises(OSError, match="connection lost"):
        upload_cube(cube, store)
    remote, _ = uploaded(tmp_path / "store")
    assert sent and remote / ".zmetadata" not in sent  # cut short before the cube's marker
    assert stored_fingerprint(remote) is None  # the old marker went first: not a cube now
    monkeypatch.setattr(upload, "replace_file", real_replace)
    assert not upload_cube(cube, store).skipped
    assert stored_fingerprint(remote) == "fingerprint-3.0"
    assert local_files(remote) == local_files(cube)


def test_a_cube_without_consolidated_metadata_is_refused(cube, tmp_path):
    (cube / ".zmetadata").unlink()
    with pytest.raises(upload.UploadError, match=r"lakes.zarr: not a complete cube"):
        upload_cube(cube, StoreLocation.local(tmp_path / "store"))


def test_files_arrive_levels_first_chunks_before_metadata_and_markers_last(
    cube, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    remote, remote_levels = uploaded(store)
    real_replace, arrived = upload.replace_file, []

    def recording(source, target):
        real_replace(source, target)
        arrived.append(target)

    monkeypatch.setattr(upload, "replace_file", recording)
    upload_cube(cube, StoreLocation.local(store))
    levels = [
        p.relative_to(remote_levels).as_posix() for p in arrived if remote_levels in p.parents
    ]
    cube_files = [p.relative_to(remote).as_posix() for p in arrived if remote in p.parents]
    assert arrived == [remote_levels / k for k in levels] + [remote / k for k in cube_files]
    for keys, marker in ((levels, ".zlevels"), (cube_files, ".zmetadata")):
        assert keys[-1] == marker
        kinds = [is_metadata(k) for k in keys]
        assert kinds == sorted(kinds)  # every chunk (False) before any metadata (True)
    assert not all(is_metadata(k) for k in cube_files)
    assert sorted(levels) == sorted(local_files(levels_path(cube)))
    assert sorted(cube_files) == sorted(local_files(cube))


def test_damaged_remote_levels_are_sent_again_even_when_the_cube_is_the_same(cube, tmp_path):
    store = StoreLocation.local(tmp_path / "store")
    upload_cube(cube, store)
    remote, remote_levels = uploaded(tmp_path / "store")
    chunk = next(p for p in sorted(remote_levels.rglob("*")) if p.is_file() and p.name[0] != ".")
    chunk.unlink()
    cube_files = {p: p.stat().st_mtime_ns for p in remote.rglob("*")}
    assert not upload_cube(cube, store).skipped
    assert local_files(remote_levels) == local_files(levels_path(cube))
    assert {p: p.stat().st_mtime_ns for p in remote.rglob("*")} == cube_files  # cube kept


def test_local_levels_without_their_marker_are_refused(cube, tmp_path):
    (levels_path(cube) / ".zlevels").unlink()
    with pytest.raises(upload.UploadError, match=r"lakes.levels: not complete overview levels"):
        upload_cube(cube, StoreLocation.local(tmp_path / "store"))
    assert not (tmp_path / "store").exists()
