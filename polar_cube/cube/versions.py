"""Published versions of a cube and the `latest` pointer: one small catalog object.

Every build that changes a cube publishes a new, immutable version `<series>-v<X.Y.Z>.zarr`
(`keys.VersionKeys` names all its keys); nothing published is ever rewritten. Which versions
exist, and which one is `latest`, is one JSON object next to them:

    <root>/<series>.versions.json   {"series", "latest", "latest_cube": "<cube name>",
                                     "versions": [{"version", "cube", "fingerprint",
                                     "patch", "published", "variables"}, …]}

Publishing a version is a single write of that object (an S3 PUT, or a rename in a local
folder): a reader sees the old catalog or the new one, never a mix, so a publish killed at
any moment leaves `latest` at the old or the new version, both complete. Readers resolve
`latest` through it (`latest_cube`); `rollback` moves the pointer back and `prune` removes
old versions (never the one `latest` names). A series built with `--format icechunk` follows
along in its Icechunk repository: rollback resets its `main` to the version's tag, prune
deletes the removed versions' tags first (`cube/icechunk_repo.py`).

Version numbers: the spec's `version` is the first one a series publishes; a build whose
result differs from `latest` publishes the next patch version (1.1.0 → 1.1.1); raising the
spec's version (to 1.2.0, say) makes that the next one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.keys import VersionKeys, icechunk_key
from polar_cube.location import StoreLocation, remote_files
from polar_cube.spec import CubeSpec

CATALOG_SUFFIX = ".versions.json"
_SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class VersionError(PolarCubeError, ValueError):
    """An unknown version, a damaged catalog, or a request that would drop `latest`."""


@dataclass(frozen=True)
class PublishedVersion:
    """One entry of the catalog."""

    version: str
    cube: str  # `<series>-v<version>.zarr`
    fingerprint: str  # the inputs fingerprint of the cube (`polar_cube_inputs_sha256`)
    patch: str  # the digest of the patch it carries
    published: str  # ISO time, UTC
    variables: list[str] = field(default_factory=list)

    @property
    def keys(self) -> VersionKeys:
        return VersionKeys(self.cube)


@dataclass(frozen=True)
class Catalog:
    series: str
    latest: str | None = None
    versions: tuple[PublishedVersion, ...] = ()

    def find(self, version: str) -> PublishedVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def latest_version(self) -> PublishedVersion | None:
        return self.find(self.latest) if self.latest else None


def version_tuple(version: str) -> tuple[int, int, int]:
    match = _SEMVER.fullmatch(version)
    if not match:
        raise VersionError(f"version {version!r} is not X.Y.Z")
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


def catalog_key(series: str) -> str:
    return f"{series}{CATALOG_SUFFIX}"


def read_catalog(location: StoreLocation, series: str) -> Catalog:
    """The catalog of `series` at `location` (an empty one if nothing is published)."""
    path = location.path(catalog_key(series))
    try:
        raw = location.fs.cat_file(path)
    except FileNotFoundError:
        return Catalog(series)
    try:
        record = json.loads(raw)
        versions = tuple(PublishedVersion(**entry) for entry in record["versions"])
        return Catalog(series, record.get("latest"), versions)
    except (ValueError, KeyError, TypeError) as error:
        raise VersionError(
            f"{location.url(catalog_key(series))}: not a readable version catalog ({error})",
            hint="restore it from the bucket's versioning or rebuild",
        ) from None


def write_catalog(location: StoreLocation, catalog: Catalog) -> None:
    """Replace the catalog in one write: an S3 PUT, or a new file renamed over the old."""
    latest = catalog.latest_version
    record = {
        "series": catalog.series,
        "latest": catalog.latest,
        "latest_cube": latest.cube if latest else None,  # what readers open
        "versions": [asdict(v) for v in sorted(catalog.versions, key=_order)],
    }
    data = json.dumps(record, indent=1).encode()
    key = catalog_key(catalog.series)
    if location.is_local:
        final = Path(location.path(key))
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{final.name}.tmp-*"):  # a killed write's
            leftover.unlink(missing_ok=True)
        temporary = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        temporary.write_bytes(data)
        os.replace(temporary, final)
    else:
        location.fs.pipe_file(location.path(key), data)
    location.fs.invalidate_cache()


def _order(entry: PublishedVersion) -> tuple[int, int, int]:
    return version_tuple(entry.version)


def next_version(catalog: Catalog, spec_version: str) -> str:
    """The version the next changed build publishes: the spec's, unless a version at or
    above it is published already, then the patch after the highest."""
    if not catalog.versions:
        return spec_version
    highest = max(version_tuple(v.version) for v in catalog.versions)
    wanted = version_tuple(spec_version)
    if wanted > highest:
        return spec_version
    major, minor, patch = highest
    return f"{major}.{minor}.{patch + 1}"


def latest_is_current(
    catalog: Catalog, fingerprint: str, patch_digest: str, spec_version: str
) -> PublishedVersion | None:
    """`latest`, when it is what this build would publish (same inputs, same patch, and the
    spec does not ask for a newer version); else None."""
    latest = catalog.latest_version
    if latest is None or (latest.fingerprint, latest.patch) != (fingerprint, patch_digest):
        return None
    if version_tuple(spec_version) > version_tuple(latest.version):
        return None
    return latest


def publish_version(
    location: StoreLocation,
    spec: CubeSpec,
    fingerprint: str,
    patch_digest: str,
    variables: list[str],
) -> PublishedVersion:
    """Add the version `spec` names (already complete) to the catalog and point `latest` at
    it: the one write that publishes it."""
    catalog = read_catalog(location, spec.series)
    entry = PublishedVersion(
        version=spec.version,
        cube=spec.data_id,
        fingerprint=fingerprint,
        patch=patch_digest,
        published=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        variables=list(variables),
    )
    others = tuple(v for v in catalog.versions if v.version != entry.version)
    write_catalog(location, replace(catalog, latest=entry.version, versions=(*others, entry)))
    return entry


def latest_cube(location: StoreLocation, series: str) -> str:
    """The cube name `latest` points at; VersionError when nothing is published."""
    latest = read_catalog(location, series).latest_version
    if latest is None:
        raise VersionError(
            f"{location.url(catalog_key(series))}: no published version of {series}",
            hint="build it first (`polar-cube build`)",
        )
    return latest.cube


def published_cube(location: StoreLocation, series: str, version: str | None = None) -> str:
    """The cube name of the published `version` of `series` (default: `latest`'s)."""
    if version is None:
        return latest_cube(location, series)
    entry = read_catalog(location, series).find(version)
    if entry is None:
        raise VersionError(
            f"{location.url(catalog_key(series))}: {series} has no published version {version}",
            hint="`polar-cube versions` lists them",
        )
    return entry.cube


def find_version(location: StoreLocation, series: str, version: str | None) -> PublishedVersion:
    """The published `version` (X.Y.Z or vX.Y.Z) of `series`, or `latest` when None;
    VersionError naming the published ones when there is no such version."""
    if version is None:
        return read_catalog(location, series).find(latest_cube_version(location, series))
    catalog = read_catalog(location, series)
    entry = catalog.find(version.removeprefix("v"))
    if entry is None:
        known = ", ".join(v.version for v in catalog.versions) or "none"
        raise VersionError(f"{series}: no published version {version} (published: {known})")
    return entry


def latest_cube_version(location: StoreLocation, series: str) -> str:
    """The version `latest` names; VersionError when nothing is published."""
    latest_cube(location, series)  # raises when nothing is published
    return read_catalog(location, series).latest


def rollback(location: StoreLocation, series: str, version: str) -> PublishedVersion:
    """Point `latest` at an earlier (or any published) `version`."""
    catalog = read_catalog(location, series)
    entry = catalog.find(version.removeprefix("v"))
    if entry is None:
        known = ", ".join(v.version for v in catalog.versions) or "none"
        raise VersionError(f"{series}: no published version {version} (published: {known})")
    if not any(location.exists(entry.cube, name) for name in (".zmetadata", "zarr.json")):
        raise VersionError(f"{location.url(entry.cube)}: version {version} is gone from the store")
    write_catalog(location, replace(catalog, latest=entry.version))
    from polar_cube.cube.icechunk_repo import reset_to_version

    reset_to_version(location, icechunk_key(series), f"v{entry.version}")  # if there is one
    return entry


def prune(location: StoreLocation, series: str, keep: int) -> list[str]:
    """Remove all but the `keep` newest versions (never `latest`), and drafts no build is
    writing (the caller holds the target's lock); returns the removed versions. The catalog
    is written first, so an interrupted prune leaves unlisted leftovers, never a listed
    version with objects missing; the next prune removes them."""
    if keep < 1:
        raise VersionError(f"--keep {keep}: keep at least 1 version")
    catalog = read_catalog(location, series)
    newest = sorted(catalog.versions, key=_order, reverse=True)
    kept = {v.version for v in newest[:keep]} | ({catalog.latest} if catalog.latest else set())
    removed = [v for v in catalog.versions if v.version not in kept]
    remaining = tuple(v for v in catalog.versions if v.version in kept)
    if removed:
        from polar_cube.cube.icechunk_repo import delete_version_tags

        delete_version_tags(location, icechunk_key(series), [f"v{v.version}" for v in removed])
        write_catalog(location, replace(catalog, versions=remaining))
    listed = {v.cube for v in remaining}
    gone = [v.version for v in removed]
    for stem in _stored_versions(location, series):
        cube = f"{stem}.zarr"
        if cube in listed:
            continue
        deleted = False
        for key in VersionKeys(cube).all_keys():
            stored = [  # an object store may list emptied prefixes (SeaweedFS does)
                name
                for name, size in remote_files(location, key).items()
                if not name.endswith("/") and (name or size)  # "": the key is one object
            ]
            if stored:
                location.fs.rm(location.path(key), recursive=True)
                deleted = True
            elif location.is_local and location.exists(key):
                location.fs.rm(location.path(key), recursive=True)
        version = stem.removeprefix(f"{series}-v")
        if deleted and version not in gone:
            gone.append(f"{version} (unpublished draft)")
    location.fs.invalidate_cache()
    return gone


def _stored_versions(location: StoreLocation, series: str) -> list[str]:
    """Stems `<series>-vX.Y.Z` of every version with anything stored."""
    if not location.exists():
        return []
    pattern = re.compile(re.escape(series) + r"-v\d+\.\d+\.\d+")
    stems = set()
    for path in location.fs.ls(location.path(), detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        stem = _version_stem(name)
        if stem and pattern.fullmatch(stem):
            stems.add(stem)
    return sorted(stems)


def _version_stem(name: str) -> str:
    """`polar-…-v1.2.3` of `polar-…-v1.2.3.zarr`, `.levels`, `.inputs`, `.stac-item.json`."""
    match = re.match(r"(.*-v\d+\.\d+\.\d+)\.", name)
    return match.group(1) if match else ""
