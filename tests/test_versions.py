"""The catalog of a cube's published versions and its `latest` pointer (cube/versions.py):
version numbers, publishing, readers resolving `latest`, rollback, prune, and a damaged
catalog. Versions here are a few stand-in objects per key, in a local folder: what the
catalog does with them does not depend on their content (test_cube_core.py builds real
ones)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from polar_cube.cube.versions import (
    Catalog,
    PublishedVersion,
    VersionError,
    catalog_key,
    latest_cube,
    next_version,
    prune,
    publish_version,
    read_catalog,
    rollback,
    write_catalog,
)
from polar_cube.keys import VersionKeys
from polar_cube.location import StoreLocation
from polar_cube.spec import load_spec
from tests.conftest import REPO

SPEC = load_spec(REPO / "cube.geojson")
SERIES = SPEC.series


def entry(version: str, fingerprint: str = "f") -> PublishedVersion:
    cube = SPEC.at_version(version).data_id
    return PublishedVersion(version, cube, fingerprint, "p", "2026-01-01T00:00:00Z")


def catalog(*versions: str, latest: str | None = None) -> Catalog:
    return Catalog(
        SERIES, latest or (versions[-1] if versions else None), tuple(map(entry, versions))
    )


def store_version(location: StoreLocation, version: str) -> list[Path]:
    """A version's objects as a build leaves them (a cube, its levels, a source's metadata,
    a quicklook, the STAC item); returns the files."""
    keys = VersionKeys(SPEC.at_version(version).data_id)
    files = [
        Path(location.path(keys.cube, ".zmetadata")),
        Path(location.path(keys.cube, "magnetic_anomaly", "0.0")),
        Path(location.path(keys.levels, ".zlevels")),
        Path(location.path(keys.levels, "1.zarr", "magnetic_anomaly", "0.0")),
        Path(location.path(keys.input_key("magnetic_anomaly"), ".zmetadata")),
        Path(location.path(keys.quicklooks, "magnetic_anomaly.png")),
        Path(location.path(keys.stac_item)),
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(version)
    return files


def publish(location: StoreLocation, version: str, fingerprint: str = "f") -> PublishedVersion:
    store_version(location, version)
    return publish_version(location, SPEC.at_version(version), fingerprint, "p", ["a", "b"])


def stored_versions(location: StoreLocation) -> list[str]:
    """The version numbers of every version of SERIES with any object stored."""
    pattern = re.compile(re.escape(SERIES) + r"-v(\d+\.\d+\.\d+)\.")
    found = {pattern.match(path.name) for path in Path(location.root).iterdir()}
    return sorted({match.group(1) for match in found if match})


@pytest.fixture
def location(tmp_path) -> StoreLocation:
    return StoreLocation.local(tmp_path / "store")


def test_the_first_version_is_the_specs_and_each_later_one_the_next_patch():
    assert SPEC.version == "1.1.0"
    assert next_version(Catalog(SERIES), "1.1.0") == "1.1.0"
    assert next_version(catalog("1.1.0"), "1.1.0") == "1.1.1"
    assert next_version(catalog("1.1.0", "1.1.9"), "1.1.0") == "1.1.10"  # numbers, not text
    # the highest published counts, not `latest` (rolled back to 1.1.0 here)
    assert next_version(catalog("1.1.0", "1.1.1", latest="1.1.0"), "1.1.0") == "1.1.2"
    # raising the spec's version makes that the next one; lowering it changes nothing
    assert next_version(catalog("1.1.0", "1.1.1"), "1.2.0") == "1.2.0"
    assert next_version(catalog("1.1.0", "1.1.1"), "2.0.0") == "2.0.0"
    assert next_version(catalog("1.1.0", "1.1.1"), "1.0.0") == "1.1.2"
    assert next_version(catalog("1.1.0", "1.1.1"), "1.1.1") == "1.1.2"
    with pytest.raises(VersionError, match=r"version '1\.2' is not X\.Y\.Z"):
        next_version(catalog("1.1.0"), "1.2")


def test_publishing_adds_the_version_and_moves_latest_in_one_write(location):
    with pytest.raises(VersionError) as nothing:
        latest_cube(location, SERIES)
    assert str(nothing.value) == (
        f"{location.url(catalog_key(SERIES))}: no published version of {SERIES}; "
        "build it first (`polar-cube build`)"
    )
    assert read_catalog(location, SERIES) == Catalog(SERIES)

    first = publish(location, "1.1.0", "inputs-1")
    assert first.cube == SPEC.data_id and first.variables == ["a", "b"]
    second = publish(location, "1.1.1", "inputs-2")
    assert latest_cube(location, SERIES) == SPEC.at_version("1.1.1").data_id
    found = read_catalog(location, SERIES)
    assert found.latest == "1.1.1" and found.versions == (first, second)
    assert found.latest_version == second
    record = json.loads(Path(location.path(catalog_key(SERIES))).read_text())
    assert record["latest_cube"] == second.cube  # what readers that do not parse it open
    assert [v["fingerprint"] for v in record["versions"]] == ["inputs-1", "inputs-2"]
    # the catalog is replaced by a rename: nothing else is left next to it
    assert sorted(p.name for p in Path(location.root).iterdir() if "versions" in p.name) == [
        catalog_key(SERIES)
    ]


def test_rollback_moves_latest_back_and_refuses_an_unknown_or_missing_version(location):
    for version in ("1.1.0", "1.1.1", "1.1.2"):
        publish(location, version)
    before = read_catalog(location, SERIES).versions
    assert rollback(location, SERIES, "v1.1.0").version == "1.1.0"
    assert latest_cube(location, SERIES) == SPEC.data_id
    assert read_catalog(location, SERIES).versions == before  # nothing removed
    assert rollback(location, SERIES, "1.1.2").cube == latest_cube(location, SERIES)

    with pytest.raises(VersionError) as unknown:
        rollback(location, SERIES, "1.0.9")
    assert str(unknown.value) == (
        f"{SERIES}: no published version 1.0.9 (published: 1.1.0, 1.1.1, 1.1.2)"
    )
    Path(location.path(SPEC.at_version("1.1.1").data_id, ".zmetadata")).unlink()
    with pytest.raises(VersionError, match=r"v1\.1\.1\.zarr: version 1\.1\.1 is gone"):
        rollback(location, SERIES, "1.1.1")
    assert read_catalog(location, SERIES).latest == "1.1.2"
    with pytest.raises(VersionError, match=r"no published version 1\.1\.0 \(published: none\)"):
        rollback(StoreLocation.local(location.root + "-empty"), SERIES, "1.1.0")


def test_prune_keeps_the_newest_and_latest_and_removes_older_versions_and_drafts(location):
    for version in ("1.1.0", "1.1.1", "1.1.2", "1.1.3"):
        publish(location, version)
    rollback(location, SERIES, "1.1.0")
    draft = store_version(location, "1.1.4")  # a build stopped before publishing
    other = StoreLocation.local(location.root)
    neighbours = [  # other series next to it, one whose name begins with this one's
        Path(other.path(f"{SERIES}-extra-v1.1.1.zarr", ".zmetadata")),
        Path(other.path("polar-1km-1x2048x2048-v1.1.1.zarr", ".zmetadata")),
    ]
    for path in neighbours:
        path.parent.mkdir(parents=True)
        path.write_text("not this series")
    assert stored_versions(location) == ["1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4"]

    with pytest.raises(VersionError, match=r"--keep 0: keep at least 1 version"):
        prune(location, SERIES, 0)
    assert stored_versions(location) == ["1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4"]

    removed = prune(location, SERIES, 2)
    assert sorted(removed) == ["1.1.1", "1.1.4 (unpublished draft)"]
    assert stored_versions(location) == ["1.1.0", "1.1.2", "1.1.3"]
    assert not any(path.exists() for path in draft)
    found = read_catalog(location, SERIES)
    assert [v.version for v in found.versions] == ["1.1.0", "1.1.2", "1.1.3"]
    assert found.latest == "1.1.0"  # latest is never pruned, however old
    assert all(path.read_text() == "not this series" for path in neighbours)
    assert prune(location, SERIES, 2) == []
    assert prune(location, SERIES, 1) == ["1.1.2"]
    assert stored_versions(location) == ["1.1.0", "1.1.3"]


def test_an_interrupted_prune_leaves_unlisted_objects_the_next_prune_removes(location):
    for version in ("1.1.0", "1.1.1"):
        publish(location, version)
    listed = read_catalog(location, SERIES)
    # what a prune killed after its catalog write leaves: 1.1.0 unlisted, still stored
    write_catalog(location, replace(listed, versions=listed.versions[1:]))
    assert stored_versions(location) == ["1.1.0", "1.1.1"]
    assert prune(location, SERIES, 5) == ["1.1.0 (unpublished draft)"]
    assert stored_versions(location) == ["1.1.1"]
    assert latest_cube(location, SERIES) == SPEC.at_version("1.1.1").data_id


@pytest.mark.parametrize(
    "damage",
    ["not json {", '{"series": "x"}', '{"versions": [{"version": "1.1.0"}]}', "[]"],
)
def test_a_damaged_catalog_is_refused_naming_the_file(location, damage):
    publish(location, "1.1.0")
    path = Path(location.path(catalog_key(SERIES)))
    path.write_text(damage)
    for read in (
        lambda: read_catalog(location, SERIES),
        lambda: latest_cube(location, SERIES),
        lambda: next_version(read_catalog(location, SERIES), SPEC.version),
        lambda: publish(location, "1.1.1"),
        lambda: rollback(location, SERIES, "1.1.0"),
        lambda: prune(location, SERIES, 1),
    ):
        with pytest.raises(VersionError) as refused:
            read()
        message = str(refused.value)
        assert message.startswith(f"{location.url(catalog_key(SERIES))}: not a readable "), message
        assert message.endswith("; restore it from the bucket's versioning or rebuild")
    assert path.read_text() == damage  # never overwritten
    assert stored_versions(location) == ["1.1.0", "1.1.1"]
