"""Integrity at rest, in the library (fast; a local folder as the target): each source's
write records the sha256 and size of every chunk object it stores (cube, levels; zarr 2 and
zarr 3 shards) next to its metadata; the version's manifest combines them; `deep_verify`
names each damaged, missing or unexpected chunk by variable and index; a version without a
manifest is never published and gets one clear line; a level chunk is repaired to the same
bytes by halving the level above. The whole command line, from the sources, against
SeaweedFS and a folder: `tests/test_repair.py`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from polar_cube.cube.integrity import (
    IntegrityError,
    chunk_of,
    deep_verify,
    read_manifest,
    record_carried_digests,
    refuse_damaged_draft,
    repair_version,
    write_manifest,
)
from polar_cube.cube.target import StagedCube, publish_staged_cube
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.spec import load_spec
from polar_cube.zarr_store import write_zarr_split
from tests.test_source_bucket import SPLIT_GRID, VERSION, in_version, layers

KEYS = VersionKeys(VERSION)
SOURCES = ("a", "b")


def stored_chunks(root: Path) -> dict[str, list]:
    """{key: [sha256, size]} of every chunk object under the version's cube and levels."""
    chunk = re.compile(r"(\d+\.zarr/)?[^/]+/(\d+(\.\d+)+|c(/\d+){2,})")
    found = {}
    for part in (KEYS.cube, KEYS.levels):
        for path in (root / part).rglob("*"):
            relative = path.relative_to(root / part).as_posix()
            if path.is_file() and chunk.fullmatch(relative):
                data = path.read_bytes()
                found[f"{part}/{relative}"] = [hashlib.sha256(data).hexdigest(), len(data)]
    return found


def write_version(root: Path, shards: int | None = None) -> StoreLocation:
    """Two sources' chunks in VERSION (the first with an all-NaN chunk, not stored)."""
    for source_id, value in zip(SOURCES, (1.0, 2.0), strict=True):
        names = (f"{source_id}_static", f"{source_id}_stepped")
        metadata, chunks = in_version(root, source_id)
        data = layers(value, names=names, hole=source_id == "a")
        write_zarr_split(data, metadata, chunks, SPLIT_GRID.chunk_size, shards)
    return StoreLocation.local(root)


@pytest.fixture(scope="module", params=[None, 2], ids=["zarr2", "zarr3-shards"])
def version(request, tmp_path_factory) -> Path:
    """A version of two sources with its manifest, written once per format (copied by tests
    that damage it)."""
    root = tmp_path_factory.mktemp("version")
    location = write_version(root, request.param)
    merge_arrays_metadata(root)
    write_manifest(location, KEYS, SOURCES)
    return root


def merge_arrays_metadata(root: Path) -> None:
    """What the merge writes next to the chunks, as far as repair reads it: each variable's
    array metadata in the version's cube and levels, and the levels' `.zlevels`."""
    methods = {}
    for source_id in SOURCES:
        for inputs, into in (
            (KEYS.input_key(source_id), KEYS.cube),
            (KEYS.input_levels_key(source_id), KEYS.levels),
        ):
            for path in (root / inputs).rglob("*"):
                relative = path.relative_to(root / inputs)
                if path.name in (".zarray", ".zattrs", "zarr.json") and len(relative.parts) > 1:
                    if f"{source_id}_" in relative.as_posix():
                        (root / into / relative).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, root / into / relative)
        record = json.loads((root / KEYS.input_levels_key(source_id) / ".zlevels").read_text())
        methods |= record["agg_methods"]
    (root / KEYS.levels / ".zlevels").write_text(json.dumps({"agg_methods": methods}))


def test_each_source_records_every_chunk_object_it_stored(version):
    stored = stored_chunks(version)
    recorded = {}
    for source_id in SOURCES:
        part = json.loads((version / KEYS.input_chunks_key(source_id)).read_text())
        assert part["algorithm"] == "sha256"
        recorded |= {f"{KEYS.cube}/{k}": v for k, v in part["cube"].items()}
        recorded |= {f"{KEYS.levels}/{k}": v for k, v in part["levels"].items()}
    assert recorded == stored  # every stored chunk, as stored; the all-NaN one in neither
    assert any(chunk_of(KEYS, key)[1] == 1 for key in stored)  # level 1 has chunks too
    if not (version / KEYS.cube / "a_static" / "c").exists():  # zarr 2 (a shard holds 2 x 2)
        assert f"{KEYS.cube}/a_static/0.0" not in stored
    manifest = read_manifest(StoreLocation.local(version), KEYS)
    assert {key: list(digest) for key, digest in manifest.items()} == stored


def test_deep_verify_names_each_damaged_missing_and_unexpected_chunk(version, tmp_path):
    shutil.copytree(version, tmp_path / "v")
    location = StoreLocation.local(tmp_path / "v")
    clean = deep_verify(location, KEYS)
    assert (
        not clean.problems and clean.variables == 4 and clean.chunks == len(stored_chunks(version))
    )

    keys = sorted(stored_chunks(version))
    flipped = next(k for k in keys if "/b_stepped/" in k and chunk_of(KEYS, k)[1] == 0)
    gone = next(k for k in keys if "/a_static/" in k and chunk_of(KEYS, k)[1] == 1)
    path = tmp_path / "v" / flipped
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    (tmp_path / "v" / gone).unlink()
    extra = f"{KEYS.cube}/a_static/{'c/9/9' if '/c/' in flipped else '9.9'}"
    (tmp_path / "v" / extra).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "v" / extra).write_bytes(b"stray")

    report = deep_verify(location, KEYS)
    lines = sorted(p.line(location, KEYS) for p in report.problems)
    index = chunk_of(KEYS, flipped)[2]
    assert len(lines) == 3
    assert re.fullmatch(
        rf"b_stepped: chunk {re.escape(index)} damaged \(sha256 [0-9a-f]{{12}} ≠ manifest "
        rf"[0-9a-f]{{12}}\): {re.escape(str(tmp_path / 'v' / flipped))}",
        lines[2],
    )
    assert lines[0] == (
        f"a_static: chunk 9.9 unexpected (stored, not in the manifest): {tmp_path / 'v' / extra}"
    )
    assert (
        lines[1]
        == f"a_static: level 1 chunk {chunk_of(KEYS, gone)[2]} missing: {tmp_path / 'v' / gone}"
    )


def test_a_level_chunk_is_repaired_to_the_bytes_the_build_wrote(version, tmp_path):
    """Levels derive from the level above alone: halving its window again gives the same
    bytes (edge chunks, time steps, and zarr 3 included); no source is needed."""
    shutil.copytree(version, tmp_path / "v")
    location = StoreLocation.local(tmp_path / "v")
    levels = [k for k in sorted(stored_chunks(version)) if chunk_of(KEYS, k)[1] == 1]
    for key in levels[::2]:
        (tmp_path / "v" / key).unlink()
    for key in levels[1::2]:
        data = bytearray((tmp_path / "v" / key).read_bytes())
        data[-1] ^= 0x80
        (tmp_path / "v" / key).write_bytes(bytes(data))
    spec = SimpleNamespace(data_id=VERSION, series="polar-test", variables=[])

    def no_download(source):
        raise AssertionError("a level chunk needs no source")

    report, repaired = repair_version(location, spec, SPLIT_GRID, no_download)
    assert len(repaired) == len(levels) and not report.problems
    assert stored_chunks(tmp_path / "v") == stored_chunks(version)


def test_a_carried_source_without_a_record_gets_the_digests_of_its_copies(version, tmp_path):
    shutil.copytree(version, tmp_path / "v")
    location = StoreLocation.local(tmp_path / "v")
    into = VersionKeys("polar-test-v1.0.1.zarr")
    origin_part = json.loads((version / KEYS.input_chunks_key("b")).read_text())
    (tmp_path / "v" / KEYS.input_chunks_key("b")).unlink()  # an origin built before records
    copies = []
    for key in stored_chunks(version):
        if "/b_" in key:
            copy = key.replace(KEYS.stem, into.stem, 1)
            (tmp_path / "v" / copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(version / key, tmp_path / "v" / copy)
            copies.append(copy)
    record_carried_digests(location, KEYS, into, "b", copies)
    part = json.loads((tmp_path / "v" / into.input_chunks_key("b")).read_text())
    assert (part["cube"], part["levels"]) == (origin_part["cube"], origin_part["levels"])


def test_no_version_is_published_without_its_manifest_and_an_old_one_gets_one_line(tmp_path):
    location = StoreLocation.local(tmp_path)
    with pytest.raises(IntegrityError) as missing:
        write_manifest(location, KEYS, ["a"])
    assert str(missing.value) == (
        f"{tmp_path}/{KEYS.input_chunks_key('a')}: missing, a's chunks were not recorded "
        "(rerun the build)"
    )
    spec = load_spec("cube.geojson").at_resolution(3000)
    staged = StagedCube(spec.data_id, "f" * 64, False, VersionKeys(spec.data_id).levels)
    with pytest.raises(IntegrityError, match=r"\.chunks\.json: missing, .* not recorded"):
        publish_staged_cube(location, spec, staged, {})
    assert not list(tmp_path.iterdir())  # no catalog written
    with pytest.raises(IntegrityError) as old:
        deep_verify(location, VersionKeys(spec.data_id))
    assert str(old.value) == (
        f"{tmp_path}/{spec.data_id}: no chunk manifest ({VersionKeys(spec.data_id).manifest}): "
        "built before chunks were recorded, it cannot be deep-verified (a rebuild records them)"
    )


def test_a_draft_failing_deep_verification_names_each_chunk_and_is_rebuilt_next(version, tmp_path):
    """What a build with `deep_verify` does with a damaged draft: one line per bad chunk,
    nothing published, and the record of the source owning it dropped, so that the rerun
    builds that source again rather than reusing it."""
    shutil.copytree(version, tmp_path / "v")
    location = StoreLocation.local(tmp_path / "v")
    flipped = next(
        k for k in sorted(stored_chunks(version)) if k.startswith(f"{KEYS.cube}/b_static/")
    )
    path = tmp_path / "v" / flipped
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    variables = [
        SimpleNamespace(name=f"{s}_{kind}", source=s)
        for s in SOURCES
        for kind in ("static", "stepped")
    ]
    spec = SimpleNamespace(data_id=VERSION, variables=variables)
    error = refuse_damaged_draft(location, spec, deep_verify(location, KEYS))
    first, *lines = str(error).splitlines()
    assert first == (
        f"{tmp_path / 'v' / KEYS.cube}: 1 chunk(s) not as written, nothing published "
        "(a rerun writes their sources again; chunks carried from an earlier version: "
        "`polar-cube repair` that one first):"
    )
    assert len(lines) == 1 and lines[0].startswith("b_static: chunk ")
    assert not (tmp_path / "v" / KEYS.input_chunks_key("b")).exists()
    assert (tmp_path / "v" / KEYS.input_chunks_key("a")).exists()
