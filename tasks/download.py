"""Download (and extract) one source."""

from __future__ import annotations

from pathlib import Path

from prefect import Task, get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from polar_cube.dataset import FetchedSource
from polar_cube.fetch import fetch_source
from polar_cube.spec import SourceSpec


def load_credentials(block_name: str) -> tuple[str, str]:
    """'user:password' from a Prefect Secret block, as a basic-auth pair (never logged)."""
    user, _, password = Secret.load(block_name).get().partition(":")
    return user, password


def _worth_retrying(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures only: not a 4xx, a bad checksum or an unsafe archive."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by Prefect
        return bool(getattr(error, "retryable", False))
    return False


@task(
    task_run_name="download-{source.id}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
)
def download_source(source: SourceSpec, cache_dir: Path, mirror: str | None) -> FetchedSource:
    auth = load_credentials(source.credentials_block) if source.credentials_block else None
    return fetch_source(source, cache_dir, mirror=mirror, auth=auth, logger=get_run_logger())
