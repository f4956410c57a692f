"""Fetching a source: download (through a mirror when asked) and extract archives."""

from __future__ import annotations

import logging
from pathlib import Path

import platformdirs

from polar_cube.archives import extract_archive
from polar_cube.dataset import FetchedSource
from polar_cube.download import download_file
from polar_cube.mirror import mirror_url
from polar_cube.spec import SourceSpec


def default_cache_dir() -> Path:
    return Path(platformdirs.user_data_dir("polar-cube")) / "sources"


def source_url(source: SourceSpec, mirror: str | None = None) -> str:
    """The URL to fetch: the spec's, or its file on the mirror."""
    return mirror_url(source.download_url, mirror) if mirror else source.download_url


def fetch_source(
    source: SourceSpec,
    cache_dir: Path,
    *,
    mirror: str | None = None,
    auth: tuple[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> FetchedSource:
    """Download `source` into `cache_dir/<id>/` (reusing a complete earlier download) and
    extract it when it is an archive."""
    url = source_url(source, mirror)
    folder = Path(cache_dir) / source.id
    result = download_file(
        url,
        folder / source.file_name,
        label=source.id,
        expected_size=source.size,
        sha256=source.sha256,
        auth=auth,
        logger=logger,
    )
    if source.compression_format is not None:
        folder = extract_archive(
            result.path,
            folder / "extracted",
            source.compression_format,
            archive_sha256=result.sha256,
        )
    return FetchedSource(
        source=source, folder=folder, url=source.download_url, sha256=result.sha256
    )
