"""The parent run's artifacts: its progress (updated through every phase, the percentage in
the card's description) and, at the end, the summary, the coverage table and the links.

Created in the body of `build-cube` (not inside a task), so they belong to the parent flow
run itself: the UI's flow-run page lists them under "Flow run". Reporting progress never
fails a build: an unreachable API only costs a warning.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from polar_cube.cube.report import CubeReport
from polar_cube.cube.summary import (
    PHASES,
    BuildProgress,
    Phase,
    ProgressSpan,
    RunSummary,
    progress_text,
)
from polar_cube.cube.verify import stats_table_rows

PROGRESS_KEY = "polar-cube-progress"
SUMMARY_KEY = "polar-cube-summary"
COVERAGE_KEY = "polar-cube-coverage"
PUBLISHED_KEY = "polar-cube-published"
QUICKLOOKS_KEY = "polar-cube-quicklooks"
STAC_KEY = "polar-cube-stac-item"
VIEWER_KEY = "polar-cube-viewer"
DATASETS_PROGRESS_KEY = "polar-cube-datasets-progress"


def start_progress(what: str, phases: Sequence[Phase] = PHASES) -> tuple[BuildProgress, str | None]:
    """A progress artifact at 0 % on the running flow, and the `BuildProgress` through
    `phases` updating it (with its id, None if it could not be created)."""
    try:
        artifact_id = str(
            create_progress_artifact(
                0.0, key=PROGRESS_KEY, description=progress_text(0, f"{what}: starting")
            )
        )
    except Exception as error:  # never fail a build for its progress bar
        get_run_logger().warning("no progress artifact (%s)", error)
        return BuildProgress(phases), None
    return BuildProgress(
        phases, on_change=lambda percent, text: update_progress(artifact_id, percent, text)
    ), artifact_id


def update_progress(artifact_id: str | None, percent: float, text: str) -> None:
    """Set the progress artifact `artifact_id` to `percent` with the description `text`."""
    if artifact_id is None:
        return
    try:
        update_progress_artifact(artifact_id, progress=percent, description=text)
    except Exception as error:
        get_run_logger().warning("progress not updated (%s)", error)


def progress_span(progress: BuildProgress, artifact_id: str | None, phase: str, label: str):
    """The part of the parent's progress that phase `phase` covers, for a subflow to report
    into; None without a progress artifact."""
    if artifact_id is None:
        return None
    start, end = progress.span(phase)
    return ProgressSpan(artifact_id=artifact_id, start=start, end=end, label=label)


def report_span(span: ProgressSpan | None, done: int, total: int, latest: str = "") -> None:
    """`done` of `total` items of a subflow's part finished: move the parent's progress."""
    if span is not None:
        update_progress(
            span.artifact_id,
            span.at(done / total if total else 1.0),
            span.text(done, total, latest),
        )


def create_result_artifacts(summary: RunSummary, report: CubeReport) -> None:
    """The summary (markdown with thumbnails), coverage table and links, on the running flow."""
    create_markdown_artifact(
        key=SUMMARY_KEY, markdown=summary.markdown(), description=summary.description()
    )
    create_table_artifact(
        key=COVERAGE_KEY,
        table=stats_table_rows(report.stats),
        description=f"{summary.cube_name}: valid-pixel coverage and value range per variable",
    )
    create_link_artifact(
        key=PUBLISHED_KEY,
        link=summary.cube_url,
        link_text=summary.cube_name,
        description=f"The published cube; overview levels in {summary.levels_url}/",
    )
    create_link_artifact(
        key=QUICKLOOKS_KEY,
        link=f"{report.folder}/",
        link_text=f"{len(report.quicklooks)} quicklooks",
        description=(
            "Full-size PNG per variable (and time step), with stats.json and summary.md; "
            f"thumbnails of them are in {SUMMARY_KEY}"
        ),
    )
    create_link_artifact(
        key=STAC_KEY,
        link=summary.stac_url,
        link_text=summary.stac_url.rsplit("/", 1)[-1],
        description="STAC item describing the cube (validated against its schemas)",
    )
    if summary.viewer_url:
        create_link_artifact(
            key=VIEWER_KEY,
            link=summary.viewer_url,
            link_text=f"{summary.cube_name} in xcube's viewer",
            description=f"Opens once the viewer runs: {summary.viewer_command}",
        )
