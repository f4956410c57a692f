"""Sources in the bucket: each downloaded source is staged under `<root>/sources/<id>/`, so
that cluster workers, which share nothing with the flow's machine but the bucket, read it
from there.

A staged source is its files (an archive's extracted members) plus a manifest
`.source.json` (download URL and sha256, each file's size and sha256), written last: no
manifest, no staged source. Staging is skipped when the manifest names the same download
and the bucket holds the same files with the same sizes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from polar_cube.errors import PolarCubeError
from polar_cube.location import FILES_IN_FLIGHT, StoreLocation, remote_files
from polar_cube.sources.fetch import FetchedSource

SOURCES_PREFIX = "sources"
MANIFEST = ".source.json"


class StagingError(PolarCubeError, RuntimeError):
    """What arrived in the bucket differs from the source's files; names the source."""


@dataclass(frozen=True)
class StagedSource:
    source_id: str
    location: StoreLocation  # `<root>/sources/<id>`: where the workers read its files
    files: int
    bytes: int
    skipped: bool


def source_files(folder: Path) -> dict[str, Path]:
    """{relative name: path} of a fetched source's files: not the cache's own records
    (hidden files, `*.meta.json`) nor unfinished downloads (`*.part`)."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and not path.name.endswith((".meta.json", ".part"))
    }


def staged_location(location: StoreLocation, source_id: str) -> StoreLocation:
    return location.child(SOURCES_PREFIX, source_id)


def stage_source(fetched: FetchedSource, location: StoreLocation) -> StagedSource:
    """Copy the source's files to `<root>/sources/<id>/` unless the same are there: the old
    manifest is removed first, the files sent, stale ones removed, sizes checked, the new
    manifest written last."""
    source_id = fetched.source.id
    where = staged_location(location, source_id)
    local = source_files(fetched.folder)
    sizes = {name: path.stat().st_size for name, path in local.items()}
    remote = remote_files(where)
    if _manifest_matches(where, fetched, sizes) and remote == {**sizes, MANIFEST: remote[MANIFEST]}:
        return StagedSource(source_id, where, len(sizes), sum(sizes.values()), skipped=True)
    fs = where.fs
    if MANIFEST in remote:
        fs.rm_file(where.path(MANIFEST))
    fs.put(
        [str(path) for path in local.values()],
        [where.path(name) for name in local],
        batch_size=FILES_IN_FLIGHT,
    )
    stale = sorted(set(remote) - set(local) - {MANIFEST})
    if stale:
        fs.rm([where.path(name) for name in stale])
    arrived = remote_files(where)
    damaged = sorted(name for name, size in sizes.items() if arrived.get(name) != size)
    if damaged:
        raise StagingError(
            f"{source_id}: {len(damaged)} file(s) did not arrive intact in {where.root}: "
            f"{', '.join(damaged[:5])}"
        )
    manifest = {
        "url": fetched.url,
        "sha256": fetched.sha256,
        "files": {
            name: {"size": sizes[name], "sha256": _sha256(path)} for name, path in local.items()
        },
    }
    fs.pipe_file(where.path(MANIFEST), json.dumps(manifest, indent=1).encode())
    return StagedSource(source_id, where, len(sizes), sum(sizes.values()), skipped=False)


def _manifest_matches(where: StoreLocation, fetched: FetchedSource, sizes: dict) -> bool:
    """The bucket's manifest names the same download (sha256) and the same files and sizes;
    the files were checked against it when it was written."""
    try:
        manifest = json.loads(where.fs.cat_file(where.path(MANIFEST)))
        listed = {name: entry["size"] for name, entry in manifest["files"].items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return manifest.get("sha256") == fetched.sha256 and listed == sizes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
