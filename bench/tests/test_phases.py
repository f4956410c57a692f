import datetime as dt
import time

import pytest

from bench.phases import (
    ALL_DATASETS,
    OUTSIDE_TASKS,
    TaskSpan,
    phase_of,
    phase_peaks,
    phase_seconds,
    read_task_spans,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SOURCES = ["magnetic_anomaly", "ice_thickness_cryosmos"]


def span(name: str, start: float, end: float) -> TaskSpan:
    return TaskSpan(name, T0 + dt.timedelta(seconds=start), T0 + dt.timedelta(seconds=end))


BUILD = [
    span("download-magnetic_anomaly", 0, 2),
    span("download-ice_thickness_cryosmos", 1, 3),  # in parallel: the phase takes 3 s, not 4
    span("stage-ice_thickness_cryosmos", 3, 3.5),
    span("convert-magnetic_anomaly", 3, 4),
    span("resample-magnetic_anomaly", 4, 4.5),
    span("write-magnetic_anomaly", 4.5, 8),
    span("write-ice_thickness_cryosmos", 8, 9),  # ice's cube ran 3-3.5 and 8-9: 1.5 s
    span("carry-into-polar-100m-1x2048x2048-v2", 9, 10.5),
    span("merge-polar-100m-1x2048x2048-v2", 10.5, 12),
    span("patch-polar-100m-1x2048x2048-v2", 12, 12.25),
    span("verify-polar-100m-1x2048x2048-v2.zarr", 12.25, 12.75),
    span("report-polar-100m-1x2048x2048-v2", 12.75, 13.25),
    span("stac-polar-100m-1x2048x2048-v2", 13.25, 13.5),
    span("publish-polar-100m-1x2048x2048-v2", 13.5, 14),
    span("quicklooks-polar.zarr", 14, 14.5),  # a step this benchmark does not know yet
]


def test_a_task_belongs_to_its_source_cube_or_to_its_step():
    assert phase_of("write-magnetic_anomaly", SOURCES) == "cube magnetic_anomaly"
    assert phase_of("write-magnetic_anomaly.zarr", SOURCES) == "cube magnetic_anomaly"  # a folder
    assert phase_of("convert-ice_thickness_cryosmos", SOURCES) == "cube ice_thickness_cryosmos"
    assert phase_of("stage-ice_thickness_cryosmos", SOURCES) == "cube ice_thickness_cryosmos"
    assert phase_of("download-magnetic_anomaly", SOURCES) == "download"
    assert phase_of("carry-into-polar-100m-1x2048x2048-v2", SOURCES) == "carry"
    assert phase_of("merge-polar-100m-1x2048x2048-v2", SOURCES) == "merge"
    assert phase_of("publish-polar-100m-1x2048x2048-v2", SOURCES) == "publish"
    assert phase_of("write-unknown_source", SOURCES) == "write"  # not one of the spec's


def test_a_phase_is_the_time_its_tasks_ran_in_build_order():
    # the order is the build's, whatever order the API returned the task runs in
    phases = phase_seconds(list(reversed(BUILD)), SOURCES, total_seconds=16)
    assert list(phases) == [
        "download",
        "cube magnetic_anomaly",
        "cube ice_thickness_cryosmos",
        ALL_DATASETS,
        "carry",
        "merge",
        "patch",
        "verify",
        "report",
        "stac",
        "publish",
        "quicklooks",
        OUTSIDE_TASKS,
    ]
    assert phases["download"] == 3
    assert phases["cube magnetic_anomaly"] == 5
    # staged at 3-3.5, written at 8-9: the gap between its tasks is not counted
    assert phases["cube ice_thickness_cryosmos"] == 1.5
    assert phases[ALL_DATASETS] == 6  # 3..9, the two cubes overlapping
    assert phases["carry"] == 1.5
    assert phases["merge"] == 1.5
    assert phases["patch"] == 0.25
    assert phases["verify"] == 0.5
    assert phases["report"] == 0.5
    assert phases["stac"] == 0.25
    assert phases["publish"] == 0.5
    assert phases["quicklooks"] == 0.5
    assert phases[OUTSIDE_TASKS] == 1.5  # tasks cover 0..14.5 without gaps
    assert OUTSIDE_TASKS not in phase_seconds(BUILD, SOURCES)


def test_a_phase_peak_is_the_largest_sample_inside_it():
    epoch = T0.timestamp()
    samples = [(epoch + t / 10, 100 + t) for t in range(0, 150)]  # rising every 0.1 s
    samples.append((epoch + 5.0, 10_000))  # a spike while magnetic_anomaly's cube is written
    peaks = phase_peaks(BUILD, SOURCES, samples)
    assert peaks["cube magnetic_anomaly"] == 10_000
    assert peaks[ALL_DATASETS] == 10_000
    assert peaks["download"] == 130  # t = 3.0 s
    assert peaks["merge"] == 220  # t = 12.0 s
    assert peaks["publish"] == 240  # t = 14.0 s
    assert phase_peaks(BUILD, SOURCES, []) == {}


@pytest.mark.slow
def test_task_spans_come_from_the_prefect_api():
    """A real flow with a subflow, run on the ephemeral API, read back as the build's is."""
    from prefect import flow, task

    @task(task_run_name="download-{source_id}")
    def download(source_id: str) -> None:
        time.sleep(0.2)

    @task(task_run_name="write-{source_id}")
    def write(source_id: str) -> None:
        time.sleep(0.3)

    @task(task_run_name="merge-cube.zarr")
    def merge() -> None:
        time.sleep(0.1)

    @flow(name="bench-test-datasets")
    def datasets() -> None:
        for future in [download.submit(s) for s in SOURCES]:
            future.result()
        for source_id in SOURCES:
            write(source_id)

    @flow(name="bench-test-build")
    def build() -> None:
        datasets()
        merge()

    since = dt.datetime.now(dt.UTC)
    build()
    spans = read_task_spans(since)
    names = sorted(s.name for s in spans)
    assert names == sorted(
        [f"download-{s}" for s in SOURCES] + [f"write-{s}" for s in SOURCES] + ["merge-cube.zarr"]
    )  # the subflow's own placeholder task run is left out
    phases = phase_seconds(spans, SOURCES)
    assert phases["cube magnetic_anomaly"] >= 0.3
    assert phases[ALL_DATASETS] >= 0.6
    assert phases["download"] >= 0.2
    assert read_task_spans(dt.datetime.now(dt.UTC), timeout_seconds=1) == []
