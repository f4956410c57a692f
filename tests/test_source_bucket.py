"""What cluster workers that share only the bucket rely on, on a local-folder "bucket":
sources staged with a manifest written last, readers that read from the staged copy, and
each source's chunks written straight into a cube version (`write_zarr_split`), its
metadata apart with its markers last, other sources' parts of the version untouched."""

import json
import pickle
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from polar_cube.dataset import FetchedSource, convert_source
from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.location import StoreLocation
from polar_cube.sources.readers import open_source
from polar_cube.sources.staging import MANIFEST, source_files, stage_source
from polar_cube.spec import load_spec
from polar_cube.zarr_store import (
    SplitTarget,
    add_grid_coords,
    levels_path,
    sibling_levels,
    stored_fingerprint,
    stored_levels_fingerprint,
    write_zarr_atomically,
    write_zarr_split,
)
from tests.test_readers import write_tif


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


# a grid with overview levels (700 x 600 cells > one 512 tile: level 1 has chunks too)
SPLIT_GRID = TargetGrid("EPSG:3031", (-2_602_500, -1_626_000, -2_252_500, -1_326_000), 500, 256)
VERSION = "polar-test-v1.0.0.zarr"


def layers(value, names=("static", "stepped"), fail=False, hole=False):
    """A source's dataset on SPLIT_GRID: a static layer and one with two time steps, all
    `value` (the second step `value + 1`); `fail`: the chunk at (1, 1) raises while being
    written; `hole`: the chunk at (0, 0) is all NaN (so not stored)."""

    def block(block_info=None):
        where = block_info[None]["chunk-location"]
        if fail and where == (1, 1):
            raise RuntimeError("boom in the middle of writing")
        fill = np.nan if hole and where == (0, 0) else value
        return np.full(block_info[None]["chunk-shape"], fill, dtype=np.float32)

    static = da.map_blocks(block, chunks=SPLIT_GRID.chunks(), dtype=np.float32)
    stepped = da.stack([static, static + 1])
    data = xr.Dataset(
        {names[0]: (("y", "x"), static), names[1]: (("time", "y", "x"), stepped)},
        coords={"time": np.array(["2013-01-01", "2017-01-01"], dtype="datetime64[ns]")},
    )
    data.attrs["polar_cube_inputs_sha256"] = f"fingerprint-{names[0]}-{value}"
    return add_grid_coords(data, SPLIT_GRID)


def in_version(root, source_id):
    """(metadata, chunks) of `source_id` in VERSION, as `dataset.InVersion` names them."""
    keys = VersionKeys(VERSION)
    bucket = StoreLocation.local(root)
    return bucket.child(keys.input_key(source_id)), SplitTarget(
        bucket.child(keys.cube), bucket.child(keys.levels)
    )


def write_split(data, root, source_id):
    metadata, chunks = in_version(root, source_id)
    return write_zarr_split(data, metadata, chunks, SPLIT_GRID.chunk_size)


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def variable_of(key: str) -> str:
    """The array a key of a cube (`static/0.0`) or of its levels (`levels/1.zarr/static/0.0`)
    belongs to."""
    parts = key.split("/")
    return parts[2] if parts[0] == "levels" and len(parts) > 2 else parts[0]


def split_files(root: Path, source_id: str, variables) -> tuple[dict, dict]:
    """(files in `.inputs/`, its variables' chunk files in the version's cube and levels) of
    one source in VERSION, keyed as in a cube `<id>.zarr` and its levels `<id>.levels`
    (so comparable with a cube written whole)."""
    keys = VersionKeys(VERSION)
    own = files(root / keys.input_key(source_id))
    own |= {f"levels/{k}": v for k, v in files(root / keys.input_levels_key(source_id)).items()}
    shared = files(root / keys.cube) | {
        f"levels/{k}": v for k, v in files(root / keys.levels).items()
    }
    return own, {k: v for k, v in shared.items() if variable_of(k) in variables}


def whole_files(cube: Path, variables) -> tuple[dict, dict]:
    """(everything else, the variables' chunk files) of a cube written whole and its levels."""
    everything = files(cube) | {f"levels/{k}": v for k, v in files(levels_path(cube)).items()}
    chunks = {
        k: v for k, v in everything.items() if variable_of(k) in variables and not is_metadata(k)
    }
    return {k: v for k, v in everything.items() if k not in chunks}, chunks


def open_split(root: Path, source_id: str, scratch: Path, level: int = 0) -> xr.Dataset:
    """The source's cube (or its overview `level`) as a reader sees it once merged: its
    metadata over the version's chunks (copied into `scratch`)."""
    metadata, chunks = split_files(root, source_id, ("static", "stepped", "other", "steps"))
    folder = scratch / f"{source_id}-{level}"
    prefix = "" if level == 0 else f"levels/{level}.zarr/"
    for key, value in (chunks | metadata).items():
        if key.startswith(prefix) and (level or not key.startswith("levels/")):
            path = folder / key.removeprefix(prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value)
    return xr.open_zarr(folder, consolidated=True)


def test_a_split_write_puts_the_chunks_in_the_version_and_the_metadata_apart(tmp_path):
    """The same bytes as a cube written whole: every chunk (cube and levels) in the version's
    cube and levels under the same keys, the metadata (markers included) in `.inputs/`,
    no chunk beside it."""
    whole = write_zarr_atomically(layers(1.0), tmp_path / "local" / "a.zarr", 256)
    root = tmp_path / "bucket"
    metadata = write_split(layers(1.0), root, "a")
    assert stored_fingerprint(metadata) == "fingerprint-static-1.0"
    assert stored_levels_fingerprint(sibling_levels(metadata)) == "fingerprint-static-1.0"

    variables = ("static", "stepped")
    own, split_chunks = split_files(root, "a", variables)
    rest, whole_chunks = whole_files(whole, variables)
    assert any(k.startswith("levels/1.zarr/static/") for k in whole_chunks)  # levels have chunks
    assert split_chunks == whole_chunks  # every chunk, byte for byte, under the same key
    # beside the metadata only what is not a variable's chunk (coordinates, crs, markers)
    assert own.keys() == rest.keys()
    assert {".zmetadata", "static/.zarray", "levels/.zlevels", "levels/0.link"} <= own.keys()
    assert not [k for k in own if variable_of(k) in variables and not is_metadata(k)]
    keys = VersionKeys(VERSION)
    assert not [k for k in files(root / keys.cube) if is_metadata(k)]  # the merge writes it
    assert {p.name for p in root.iterdir()} == {keys.cube, keys.inputs, keys.levels}

    cube, level = open_split(root, "a", tmp_path), open_split(root, "a", tmp_path, level=1)
    reference = xr.open_zarr(whole)
    for name in ("static", "stepped"):
        np.testing.assert_array_equal(cube[name].values, reference[name].values)
        assert cube[name].attrs["polar_cube_stats"] == reference[name].attrs["polar_cube_stats"]
        assert float(level[name].isel({"time": 0} if name == "stepped" else {}).mean()) == 1.0


def test_an_interrupted_split_write_is_not_complete_and_the_next_replaces_it(tmp_path):
    root = tmp_path / "bucket"
    metadata = write_split(layers(1.0), root, "a")
    with pytest.raises(RuntimeError, match="boom"):
        write_split(layers(5.0, fail=True), root, "a")
    # its markers were taken down first; what the failed write left is not complete
    assert stored_fingerprint(metadata) is None
    assert stored_levels_fingerprint(sibling_levels(metadata)) is None

    write_split(layers(5.0, hole=True), root, "a")
    assert stored_fingerprint(metadata) == "fingerprint-static-5.0"
    assert stored_levels_fingerprint(sibling_levels(metadata)) == "fingerprint-static-5.0"
    cube = open_split(root, "a", tmp_path)
    static = cube.static.values
    assert np.isnan(static[:256, :256]).all()  # no chunk of the earlier writes is left there
    assert (static[256:, :] == 5.0).all() and (static[:, 256:] == 5.0).all()
    assert (cube.stepped.values[1][256:, 256:] == 6.0).all()
    _, chunks = split_files(root, "a", ("static", "stepped"))
    assert "static/0.0" not in chunks and "stepped/1.0.0" not in chunks
    assert {"static/1.1", "stepped/1.1.1"} <= chunks.keys()


def test_other_sources_in_the_same_version_are_untouched(tmp_path):
    root = tmp_path / "bucket"
    write_split(layers(1.0), root, "a")
    write_split(layers(2.0, names=("other", "steps")), root, "b")
    keys = VersionKeys(VERSION)

    def b_files():
        return {
            str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for folder in (keys.cube, keys.levels, keys.inputs)
            for p in (root / folder).rglob("*")
            if p.is_file() and ("/other" in str(p) or "/steps" in str(p) or "/b." in str(p))
        }

    before = b_files()
    assert any("/levels" not in k and k.endswith("other/0.0") for k in before)
    assert any(".levels/1.zarr/steps/" in k for k in before)
    with pytest.raises(RuntimeError, match="boom"):  # a failed rewrite of another source …
        write_split(layers(3.0, fail=True), root, "a")
    write_split(layers(3.0), root, "a")  # … and a whole one
    assert b_files() == before  # b's chunks and metadata: the same objects, never rewritten
    b = open_split(root, "b", tmp_path)
    assert float(b.other.mean()) == 2.0 and float(b.steps.isel(time=1).mean()) == 3.0
    assert stored_fingerprint(in_version(root, "b")[0]) == "fingerprint-other-2.0"
    assert float(open_split(root, "a", tmp_path).static.mean()) == 3.0


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
