"""A build's per-phase breakdown, from the task runs the Prefect API recorded for it.

A task run's phase is its name's prefix (`download-…`, `upload-…`, `merge-…`, …); the
per-dataset tasks (`convert-<id>`, `resample-<id>`, `write-<id>.zarr`, or any other
`<step>-<source id>`) make one phase per source, `cube <id>`. A phase's wall time is the
time at least one of its tasks ran: parallel tasks are not added up, and the gaps between
its tasks (the two verifications, before and after publishing) are not counted.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass

DATASET_PREFIX = "cube "
ALL_DATASETS = "all per-dataset cubes"
OUTSIDE_TASKS = "outside tasks"
SHARED_STEPS = ("download",)  # named after a source too, but not part of its cube
PHASE_ORDER = ("download", DATASET_PREFIX, "carry", "merge", "patch", "verify", "report")
PHASE_ORDER += ("stac", "publish", "commit")  # commit: to Icechunk (`--format icechunk`)
_PAGE = 200
_TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class TaskSpan:
    name: str
    start: dt.datetime
    end: dt.datetime


def phase_of(task_name: str, source_ids: Iterable[str]) -> str:
    """`cube <id>` for a per-dataset step of source `<id>`, else the name's prefix."""
    step, _, subject = task_name.partition("-")
    subject = subject.removesuffix(".zarr")
    if step not in SHARED_STEPS and subject in set(source_ids):
        return DATASET_PREFIX + subject
    return step


Window = tuple[dt.datetime, dt.datetime]


def _window(spans: list[TaskSpan]) -> Window:
    return min(s.start for s in spans), max(s.end for s in spans)


def _union_seconds(spans: list[TaskSpan]) -> float:
    """Time covered by at least one span."""
    covered, reach = 0.0, None
    for span in sorted(spans, key=lambda s: s.start):
        if reach is None or span.start > reach:
            covered += (span.end - span.start).total_seconds()
            reach = span.end
        elif span.end > reach:
            covered += (span.end - reach).total_seconds()
            reach = span.end
    return covered


def phase_groups(spans: list[TaskSpan], source_ids: list[str]) -> dict[str, list[TaskSpan]]:
    """The task spans of each phase, in build order: download, `cube <id>` per source (spec
    order), ALL_DATASETS, upload, merge, patch, verify, publish, report, stac, then any
    other prefix."""
    groups: dict[str, list[TaskSpan]] = {}
    for span in spans:
        groups.setdefault(phase_of(span.name, source_ids), []).append(span)
    ordered: dict[str, list[TaskSpan]] = {}
    for phase in PHASE_ORDER:
        if phase == DATASET_PREFIX:
            cubes = [DATASET_PREFIX + i for i in source_ids if DATASET_PREFIX + i in groups]
            for name in cubes:
                ordered[name] = groups[name]
            if cubes:
                ordered[ALL_DATASETS] = [s for n in cubes for s in groups[n]]
        elif phase in groups:
            ordered[phase] = groups[phase]
    for phase in sorted(set(groups) - set(ordered)):
        ordered[phase] = groups[phase]
    return ordered


def phase_windows(spans: list[TaskSpan], source_ids: list[str]) -> dict[str, Window]:
    """(first start, last end) per phase, in the order of `phase_groups`."""
    return {phase: _window(group) for phase, group in phase_groups(spans, source_ids).items()}


def phase_seconds(
    spans: list[TaskSpan], source_ids: list[str], total_seconds: float | None = None
) -> dict[str, float]:
    """Wall seconds per phase: the time at least one of its tasks ran; with
    `total_seconds` (the whole command) also OUTSIDE_TASKS, the time no task ran."""
    result = {
        phase: _union_seconds(group) for phase, group in phase_groups(spans, source_ids).items()
    }
    if total_seconds is not None and spans:
        result[OUTSIDE_TASKS] = max(0.0, total_seconds - _union_seconds(spans))
    return result


def phase_peaks(
    spans: list[TaskSpan], source_ids: list[str], samples: Iterable[tuple[float, int]]
) -> dict[str, int]:
    """The largest RSS sample (epoch seconds, bytes) inside each phase's window; phases
    too short to hold a sample are left out."""
    samples = list(samples)
    peaks = {}
    for phase, (start, end) in phase_windows(spans, source_ids).items():
        inside = [rss for t, rss in samples if start.timestamp() <= t <= end.timestamp()]
        if inside:
            peaks[phase] = max(inside)
    return peaks


def read_task_spans(since: dt.datetime, timeout_seconds: float = 60) -> list[TaskSpan]:
    """The task runs of every flow run started after `since` (a build and its subflows).

    The API records task runs from events, a moment after they happen: this waits until the
    flow runs are over and every task run has ended, or `timeout_seconds` have passed.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            flow_runs, task_runs = _read_runs(client, since)
            placeholders = {f.parent_task_run_id for f in flow_runs if f.parent_task_run_id}
            runs = [t for t in task_runs if t.id not in placeholders]
            settled = all(_terminal(f) for f in flow_runs) and all(
                t.start_time and t.end_time for t in runs
            )
            if (flow_runs and settled) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return sorted(
        (TaskSpan(t.name, t.start_time, t.end_time) for t in runs if t.start_time and t.end_time),
        key=lambda s: s.start,
    )


def _terminal(flow_run) -> bool:
    state = getattr(flow_run.state_type, "value", flow_run.state_type)
    return str(state) in _TERMINAL


def _read_runs(client, since: dt.datetime) -> tuple[list, list]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
    )

    flow_runs = _all_pages(
        lambda offset: client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
            limit=_PAGE,
            offset=offset,
        )
    )
    if not flow_runs:
        return [], []
    ids = FlowRunFilter(id=FlowRunFilterId(any_=[f.id for f in flow_runs]))
    task_runs = _all_pages(
        lambda offset: client.read_task_runs(flow_run_filter=ids, limit=_PAGE, offset=offset)
    )
    return flow_runs, task_runs


def _all_pages(read) -> list:
    found, offset = [], 0
    while True:
        page = read(offset)
        found.extend(page)
        if len(page) < _PAGE:
            return found
        offset += len(page)
