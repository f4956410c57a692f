"""When a Prefect task retries: only after transient failures, never after bad input."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun

from polar_cube.errors import PolarCubeError, environment_problem


def is_transient(error: BaseException) -> bool:
    """A network hiccup or a busy server may pass; bad input, a full disk or a refused key
    will not, so retrying them only delays the one clear error."""
    if isinstance(error, PolarCubeError) or environment_problem(error):
        return bool(getattr(error, "retryable", False))
    return True


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry the failed run only if its error is transient."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by Prefect
        return is_transient(error)
    return False
