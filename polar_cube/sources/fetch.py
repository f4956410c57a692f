"""Fetching a source: download (through a mirror when asked), check, and extract archives.

A download is kept only when it opens as the source's declared format (an archive: when it
lists completely and the files the spec reads from it pass their format's check).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from polar_cube.location import StoreLocation
from polar_cube.sources.archives import MARKER_NAME, ArchiveError, check_archive, extract_archive
from polar_cube.sources.checks import check_file
from polar_cube.sources.download import DownloadResult, discard_download, download_file, redact_url
from polar_cube.sources.mirror import mirror_url
from polar_cube.sources.readers import SourceFormatError
from polar_cube.spec import CubeSpec, SourceSpec

# Archive members checked when the caller does not say which files the spec reads.
FORMAT_SUFFIXES = {
    "gmt_netcdf": (".nc",),
    "latlon_netcdf": (".nc",),
    "geotiff": (".tif", ".tiff"),
    "polygons": (".shp",),
}


@dataclass(frozen=True)
class FetchedSource:
    """A downloaded (and extracted) source: where its files are and what was fetched."""

    source: SourceSpec
    folder: Path  # the download's folder, or the archive's extraction folder
    url: str
    sha256: str
    # the same files in the bucket (`polar_cube.sources.staging`), for workers that cannot
    # read `folder`: the lazy layers then read from there
    staged: StoreLocation | None = None
    downloaded: bool = False  # fetched by this run (False: reused from the cache)
    replaced_sha256: str | None = None  # the cached copy this run's download replaced


DEFAULT_CACHE_DIR = "data/cache"


def default_cache_dir() -> Path:
    """The download cache unless `--cache` says otherwise: a state folder of the current
    folder (nothing is written outside it unless asked), made absolute."""
    return Path(DEFAULT_CACHE_DIR).resolve()


def source_url(source: SourceSpec, mirror: str | None = None) -> str:
    """The URL to fetch: the spec's, or its file on the mirror."""
    return mirror_url(source.download_url, mirror) if mirror else source.download_url


def needed_files(spec: CubeSpec, source_id: str) -> list[str]:
    """The files in a source's download that the spec's variables read."""
    return sorted({f for v in spec.variables_of(source_id) for f in v.files_by_time.values()})


class _BadArchiveContent(Exception):
    """An archive's member failed its check; `error` is the user-facing error to raise."""

    def __init__(self, error: ArchiveError | SourceFormatError) -> None:
        super().__init__(str(error))
        self.error = error


def fetch_source(
    source: SourceSpec,
    cache_dir: Path,
    *,
    mirror: str | None = None,
    auth: tuple[str, str] | None = None,
    files: Iterable[str] | None = None,
    logger: logging.Logger | None = None,
) -> FetchedSource:
    """Download `source` into `cache_dir/<id>/` (reusing a complete, still valid earlier
    download) and extract it when it is an archive.

    `files` are the archive members to check by the source format (see `needed_files`);
    without them, every member with the format's file extension is checked. A download or
    extraction that fails a check is deleted, and the error names the source id and URL.
    """
    url = source_url(source, mirror)
    where = f"{source.id}: {redact_url(url)}"
    dest = Path(cache_dir) / source.id / source.file_name
    fmt = source.compression_format

    def validate(path: Path, name: str) -> None:
        if fmt is None:
            check_file(path, source.source_format, name)
        else:
            check_archive(path, fmt, name)

    def download() -> DownloadResult:
        return download_file(
            url,
            dest,
            label=source.id,
            expected_size=source.size,
            sha256=source.sha256,
            auth=auth,
            validate=validate,
            binary=fmt is not None or source.source_format != "polygons",
            identity=source.download_url,  # a mirror on another address reuses the cache
            revalidate=True,  # one conditional request: new bytes at the same URL are fetched
            logger=logger,
        )

    result = download()
    folder = dest.parent
    if fmt is not None:
        members = None if files is None else list(files)
        try:
            folder = _extract_checked(source, result.path, result.sha256, members, where)
        except _BadArchiveContent as bad:
            if not result.reused:
                raise bad.error from None
            if logger is not None:
                logger.warning("%s; fetching it again", bad.error)
            result = download()
            try:
                folder = _extract_checked(source, result.path, result.sha256, members, where)
            except _BadArchiveContent as again:
                raise again.error from None
    return FetchedSource(
        source=source,
        folder=folder,
        url=source.download_url,
        sha256=result.sha256,
        downloaded=not result.reused,
        replaced_sha256=result.replaced_sha256,
    )


def _extract_checked(
    source: SourceSpec, archive: Path, sha256: str, files: list[str] | None, where: str
) -> Path:
    """Extract `archive` next to it and check the members; on a bad archive or member, delete
    the archive, its record and the extraction, and raise _BadArchiveContent."""
    target = archive.parent / "extracted"
    try:
        extract_archive(
            archive, target, source.compression_format, archive_sha256=sha256, name=archive.name
        )
    except ArchiveError as error:
        _forget(archive, target)
        raise _BadArchiveContent(type(error)(f"{where}: {error}")) from error
    present = sorted(
        p.relative_to(target).as_posix()
        for p in target.rglob("*")
        if p.is_file() and p.name != MARKER_NAME
    )
    if files is None:
        suffixes = FORMAT_SUFFIXES[source.source_format]
        files = [f for f in present if Path(f).suffix.lower() in suffixes]
    missing = [f for f in files if not (target / f).is_file()]
    if missing:  # a complete archive without the file: the spec is wrong; keep the download
        shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
        raise SourceFormatError(
            f"{where}: the archive has no member {', '.join(map(repr, missing))} (it has: {shown})"
        )
    for relative in files:
        try:
            check_file(target / relative, source.source_format, f"member {relative}")
        except SourceFormatError as error:
            _forget(archive, target)
            raise _BadArchiveContent(SourceFormatError(f"{where}: {error}")) from error
    return target


def _forget(archive: Path, extracted: Path) -> None:
    shutil.rmtree(extracted, ignore_errors=True)
    discard_download(archive)
