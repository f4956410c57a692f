"""Download (and extract) one source."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE

from polar_cube.sources.fetch import FetchedSource, fetch_source
from polar_cube.spec import SourceSpec


def load_credentials(block_name: str) -> tuple[str, str]:
    """'user:password' from a Prefect Secret block, as a basic-auth pair (never logged)."""
    user, _, password = Secret.load(block_name).get().partition(":")
    return user, password


# No Prefect retries: `download_file` is the one retry layer (it resumes with Range requests),
# bounded by POLAR_CUBE_DOWNLOAD_ATTEMPTS and POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS.
@task(task_run_name="download-{source.id}", cache_policy=NO_CACHE)
def download_source(
    source: SourceSpec,
    cache_dir: Path,
    mirror: str | None,
    files: list[str] | None = None,
) -> FetchedSource:
    """Fetch `source` into the cache; `files` are the archive members the spec reads
    (`polar_cube.sources.fetch.needed_files`), checked by the source format."""
    auth = load_credentials(source.credentials_block) if source.credentials_block else None
    return fetch_source(
        source, cache_dir, mirror=mirror, auth=auth, files=files, logger=get_run_logger()
    )
