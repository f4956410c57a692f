"""The run's story without Prefect: progress through the phases, the summary markdown."""

import pytest

from polar_cube.cube.summary import (
    PHASES,
    BuildProgress,
    DatasetOutcome,
    ProgressSpan,
    RunSummary,
    build_phases,
    format_seconds,
    timing_table,
    variable_sections,
)
from polar_cube.cube.verify import VariableStats


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_phases_of_a_versioned_build_in_order():
    """Issue 20: the chunks go straight into the new version (datasets), unchanged sources
    are carried, merge writes metadata, and publishing (pointing `latest`) comes last."""
    assert [p.key for p in PHASES] == [
        "check",
        "datasets",
        "carry",
        "merge",
        "patch",
        "verify",
        "metadata",  # issue 22: the metadata gate, before anything is published
        "report",
        "stac",
        "publish",
    ]
    progress = BuildProgress()
    spans = [progress.span(p.key) for p in PHASES]
    assert spans[0][0] == 0 and spans[-1][1] == pytest.approx(100)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):  # they tile 0..100 %
        assert start == pytest.approx(end)
    total = sum(p.weight for p in PHASES)
    for phase, (start, end) in zip(PHASES, spans, strict=True):
        assert end - start == pytest.approx(100 * phase.weight / total), phase.key
    # the datasets (download, resample, write every chunk) are most of a build's time
    assert max(PHASES, key=lambda p: p.weight).key == "datasets"
    # `--format icechunk`: the commit to the repository comes after the catalog's write
    assert build_phases() == PHASES
    assert [p.key for p in build_phases("icechunk")] == [*(p.key for p in PHASES), "icechunk"]


def test_progress_moves_through_every_phase_to_100():
    clock, seen = Clock(), []
    progress = BuildProgress(on_change=lambda p, text: seen.append((p, text)), clock=clock)
    for seconds, phase in enumerate(p.key for p in PHASES):
        progress.start(phase)
        clock.now += seconds + 1
        if phase == "datasets":
            progress.advance(0.5, "datasets: half")
    progress.finish("published x.zarr")
    percents = [p for p, _ in seen]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100
    assert len(set(percents)) == len(PHASES) + 2  # each phase's start, the half, the end
    assert seen[-1][1] == "100 % · published x.zarr in 55.0 s"  # 1 + 2 + … + 10 s
    start, end = progress.span("datasets")
    half = (start + end) / 2
    assert seen[2] == (pytest.approx(half), f"{half:.0f} % · datasets: half")
    assert 40 < half < 42  # weights 1 + 80/2 of 100
    merge = [text for _, text in seen if "merge:" in text]
    assert merge == [
        f"{progress.span('merge')[0]:.0f} % · merge: {PHASES[3].title} (phase 4 of 10)"
    ]
    publish = [text for _, text in seen if "publish:" in text]
    assert publish == [
        f"{progress.span('publish')[0]:.0f} % · publish: {PHASES[9].title} (phase 10 of 10)"
    ]
    rows = {row.key: row.seconds for row in progress.timing_rows()}
    assert list(rows) == [p.key for p in PHASES]
    assert rows["check"] == 1 and rows["carry"] == 3 and rows["stac"] == 9
    assert rows["publish"] == 10 and progress.finished == 55


def test_skipped_and_failed_phases_say_why():
    clock = Clock()
    progress = BuildProgress(clock=clock)
    progress.start("check")
    progress.skip("merge", "the cube is already current")
    progress.start("verify")
    clock.now += 2
    before = progress.percent
    progress.failed(ValueError("the published cube has no crs"))
    assert progress.percent == before
    assert progress.description == (
        f"{before:.0f} % · failed in verify: the published cube has no crs"
    )
    rows = {row.key: row for row in progress.timing_rows()}
    assert (
        rows["merge"].note == "skipped: the cube is already current"
        and rows["merge"].seconds is None
    )
    assert rows["verify"].note == "failed: ValueError" and rows["verify"].seconds == 2


def test_a_span_maps_its_part_into_the_parents_percentages():
    span = ProgressSpan(artifact_id="x", start=1.0, end=51.0, label="per-dataset cubes")
    assert span.at(0) == 1 and span.at(0.5) == 26 and span.at(2) == 51
    assert span.text(3, 10, "ice_thickness") == (
        "16 % · per-dataset cubes: 3 of 10 done (latest: ice_thickness)"
    )
    assert span.text(0, 0) == "51 % · per-dataset cubes: 0 of 0 done"


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "–"), (0.04, "0.0 s"), (12.34, "12.3 s"), (125, "2 min 05 s"), (3725, "1 h 02 min")],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


STATS = [
    VariableStats("ice_thickness", "m", None, 0.5843, 94.07, 2503.0, 1447.0),
    VariableStats("thw_70", "1", "2013-01-01", 0.0001, 0.0, 1.0, 0.4688),
    VariableStats("thw_70", "1", "2017-01-01", 0.0001, 0.0, 1.0, 0.2344),
]
THUMBS = {
    "ice_thickness.png": "data:image/png;base64,AAAA",
    "thw_70_2013-01-01.png": "data:image/png;base64,BBBB",
    "thw_70_2017-01-01.png": "data:image/png;base64,CCCC",
}


def test_one_table_per_variable_with_its_thumbnails():
    lines = variable_sections(STATS, {"ice_thickness": "Ice Thickness"}, THUMBS)
    text = "\n".join(lines)
    assert "### `ice_thickness`: Ice Thickness [m]" in text
    assert "### `thw_70`: thw_70\n" in text  # no long name known, units 1 not shown
    assert "![ice_thickness](data:image/png;base64,AAAA)" in text
    assert (
        "![thw_70 2013-01-01](data:image/png;base64,BBBB) "
        "![thw_70 2017-01-01](data:image/png;base64,CCCC)"
    ) in text
    assert "| – | 58.43 | 94.07 | 2503 | 1447 |" in text
    assert "| 2013-01-01 | 0.01 | 0 | 1 | 0.4688 |" in text
    assert text.count("| time | valid % | min | max | mean |") == 2


def summary(**changes):
    values = dict(
        title="Polar Data Cube v1.1.0",
        cube_name="polar-3km-1x2048x2048-v1.1.0.zarr",
        cube_url="s3://bucket/cubes/polar-3km-1x2048x2048-v1.1.0.zarr",
        resolution=3000.0,
        grid_shape=(707, 651),
        datasets=[
            DatasetOutcome("ice_thickness_cryosmos", downloaded=True, reused=False),
            DatasetOutcome("magnetic_anomaly", downloaded=False, reused=True),
            DatasetOutcome("thwaites", downloaded=False, reused=False),
        ],
        cube_reused=False,
        stats=STATS,
        long_names={"ice_thickness": "Ice Thickness", "thw_70": "Subglacial Lake Thw 70"},
        timings=BuildProgress().timing_rows(),
        total_seconds=130.0,
        quicklooks_url="s3://bucket/cubes/polar-3km-1x2048x2048-v1.1.0.quicklooks",
        quicklooks=["a.png", "b.png", "c.png"],
        thumbnails=THUMBS,
        levels_url="s3://bucket/cubes/polar-3km-1x2048x2048-v1.1.0.levels",
        stac_url="s3://bucket/cubes/polar-3km-1x2048x2048-v1.1.0.stac-item.json",
        viewer_url="http://127.0.0.1:8080/viewer/?dataset=polar-3km-1x2048x2048-v1.1.0",
        viewer_command=(
            "polar-cube view --bucket-block b --cube-id polar-3km-1x2048x2048-v1.1.0.zarr"
        ),
    )
    return RunSummary(**(values | changes))


def test_the_summary_says_what_was_built_reused_where_and_how_long():
    text = summary().markdown()
    assert text.startswith("# polar-3km-1x2048x2048-v1.1.0.zarr\n")
    assert "**Polar Data Cube v1.1.0** at 3000 m (651 × 707 cells), published at" in text
    assert "in 2 min 10 s." in text
    assert (
        "- **Source downloads**: 1 fetched, reused 2 of 3 from the cache "
        "(fetched: `ice_thickness_cryosmos`)"
    ) in text
    assert (
        "- **Per-dataset cubes**: 2 built, reused 1 of 3 "
        "(built: `ice_thickness_cryosmos`, `thwaites`)"
    ) in text
    assert "- **Cube**: merged, patched, verified and published" in text
    assert "- STAC item: `s3://bucket/cubes/polar-3km-1x2048x2048-v1.1.0.stac-item.json`" in text
    assert (
        "- Viewer: [http://127.0.0.1:8080/viewer/?dataset=polar-3km-1x2048x2048-v1.1.0]"
        "(http://127.0.0.1:8080/viewer/?dataset=polar-3km-1x2048x2048-v1.1.0) once "
        "`polar-cube view --bucket-block b --cube-id polar-3km-1x2048x2048-v1.1.0.zarr` runs"
    ) in text
    assert "| merge | write the merged cube's and levels' metadata | – |" in text
    assert "| publish | point `latest` at the new version | – |" in text
    lines = text.splitlines()
    table = lines[
        lines.index("| phase | what | time |") + 2 : lines.index("| **total** | | **2 min 10 s** |")
    ]
    assert [row.split(" | ")[0] for row in table] == [f"| {p.key}" for p in PHASES]  # publish last
    assert "| **total** | | **2 min 10 s** |" in text
    assert text.count("data:image/png;base64,") == 3
    assert summary().description() == (
        "polar-3km-1x2048x2048-v1.1.0.zarr at 3000 m: 2 of 3 per-dataset cubes built, cube "
        "merged and published, 3 layers checked, in 2 min 10 s"
    )


def test_a_rerun_that_changed_nothing_says_so():
    reused = [DatasetOutcome("a", False, True), DatasetOutcome("b", False, True)]
    text = summary(datasets=reused, cube_reused=True, report_reused=True).markdown()
    assert "- **Source downloads**: 0 fetched, reused 2 of 2 from the cache\n" in text
    assert "- **Per-dataset cubes**: 0 built, reused 2 of 2\n" in text
    assert "- **Cube**: already current: reused (nothing merged, patched or published)" in text
    assert "- **Statistics and quicklooks**: reused (the cube is unchanged)" in text
    assert ", reused at `s3://" in text


def test_the_timing_table_shows_times_and_notes():
    progress = BuildProgress(clock=Clock())
    progress.start("check")
    progress.skip("merge", "the cube is already current")
    progress.finish()
    lines = timing_table(progress.timing_rows(), progress.finished)
    assert lines[:3] == [
        "| phase | what | time |",
        "|---|---|---:|",
        "| check | check the spec, grid and patch | 0.0 s |",
    ]
    merge = "| merge | write the merged cube's and levels' metadata |"
    assert f"{merge} skipped: the cube is already current |" in lines
    assert lines[-1] == "| **total** | | **0.0 s** |"


def test_a_source_changed_upstream_is_named_with_both_checksums():
    changed = DatasetOutcome(
        "magnetic_anomaly", True, False, sha256="b" * 64, replaced_sha256="a" * 64
    )
    text = summary(datasets=[changed]).markdown()
    assert (
        f"- **Changed upstream**: `magnetic_anomaly`, new bytes at the same URL: sha256 "
        f"`{'a' * 64}` → `{'b' * 64}`"
    ) in text
    assert "Changed upstream" not in summary().markdown()
