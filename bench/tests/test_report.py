import datetime as dt
import json

from bench.measure import Measurement
from bench.report import BuildRun, Results, render

GB = 10**9
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def run(seconds: float, gb: float) -> Measurement:
    return Measurement(seconds, int(gb * GB), int(gb * GB) - 1000, T0, samples=((0.0, 1),))


def build(seconds: float, gb: float, cubes: float, merge: float, publish: float) -> BuildRun:
    phases = {
        "download": 1.0,
        "cube magnetic_anomaly": cubes / 4,
        "cube ice_thickness_cryosmos": cubes / 4 * 1.5,
        "all per-dataset cubes": cubes,
        "merge": merge,
        "publish": publish,
    }
    return BuildRun(run(seconds, gb), phases, {"merge": int(gb * GB / 2)})


def results(resolution: float) -> Results:
    return Results(
        command=".venv/bin/python -m bench --runs 3",
        date="2026-01-01 00:00 UTC",
        machine={"CPU": "Test CPU", "cores": "2 usable"},
        runs=3,
        target_resolution=100,
        source_ids=["magnetic_anomaly", "ice_thickness_cryosmos"],
        layer_resolution=resolution,
        layer_cells=100,
        layer={
            "ours": [run(10, 1.0), run(12, 1.2), run(11, 1.1)],
            "gdalwarp": [run(30, 0.5), run(30, 0.5), run(36, 0.6)],
            "original": [run(60, 12), run(80, 14), run(70, 13)],
        },
        layer_commands={"ours": "python -m bench.layer ours …"},
        build_resolution=resolution,
        build_command="polar-cube build …",
        builds={
            resolution: [
                build(250, 2.5, 200, 8, 4),
                build(260, 2.6, 210, 9, 4),
                build(240, 2.4, 190, 7, 4),
            ],
            2 * resolution: [build(70, 1.0, 50, 2, 1)] * 3,
        },
        cells={resolution: 400, 2 * resolution: 100},
        reruns=[run(20, 0.4), run(25, 0.4), run(40, 0.5)],
    )


def row(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_medians_ranges_and_ratios_of_medians():
    text = render(results(100))
    assert "- **CPU**: Test CPU" in text
    assert row(text, "| ours").endswith(
        "→ write (zarr) | 11.0 (10.0–12.0) | 1.10 (1.00–1.20) | 1.00 | 1.00 |"
    )
    assert row(text, "| original").endswith(
        "| 70.0 (60.0–80.0) | 13.00 (12.00–14.00) | 6.36 | 11.82 |"
    )
    assert row(text, "| merge |") == "| merge | 8.0 (7.0–9.0) | 1.25 (1.20–1.30) |"
    assert (
        row(text, "| **whole build**")
        == "| **whole build** | 250.0 (240.0–260.0) | 2.50 (2.40–2.60) |"
    )
    assert row(text, "| **rerun").startswith("| **rerun with nothing changed** | 25.0 (20.0–40.0)")
    assert (
        row(text, "| ratio 100 m ÷ 200 m") == "| ratio 100 m ÷ 200 m | 4.00 | 3.57 | 4.00 | 2.50 |"
    )


def test_targets_are_checked_against_the_medians():
    text = render(results(100))
    assert (
        row(text, "| whole build at 100 m ≤ 5 min")
        == "| whole build at 100 m ≤ 5 min wall (after the downloads) | 250.0 s | yes |"
    )
    assert row(text, "| whole build at 100 m ≤ 3 GB").endswith("| 2.50 GB | yes |")
    assert row(text, "| merge + publish").endswith("| 0.06 × | yes |")  # (8 + 4) / 200
    assert row(text, "| rerun with nothing changed ≤ 30 s").endswith("| 25.0 s | yes |")
    assert row(text, "| build time 100 m ÷ 200 m").endswith("| 3.57 × | yes |")
    assert row(text, "| one layer: ≥ 5×").endswith("| 6.36 × | yes |")
    assert row(text, "| one layer: ≤ 1/8").endswith("| 11.82 × | yes |")
    assert row(text, "| one layer: ≥ 2× faster than gdalwarp").endswith("| 2.73 × | yes |")
    assert row(text, "| ice_thickness's cube").endswith("| 1.50 × | yes |")
    assert "reduced resolution" not in text


def test_a_reduced_run_says_so_and_a_missed_target_stands_out():
    text = render(results(1500))
    assert row(text, "| whole build at 100 m ≤ 5 min").endswith("| 250.0 s | yes (at 1500 m) |")
    assert "targets are for 100 m" in text
    slow = results(100)
    slow.reruns = [run(31, 0.4)]
    assert row(render(slow), "| rerun with nothing changed ≤ 30 s").endswith("| 31.0 s | **no** |")


def test_parts_not_measured_are_left_out_and_marked():
    partial = results(100)
    partial.layer, partial.builds, partial.reruns = {}, {}, []
    text = render(partial)
    assert "One layer" not in text and "Whole build" not in text and "Scaling" not in text
    assert row(text, "| one layer: ≥ 5×").endswith("| not measured | |")
    assert row(text, "| whole build at 100 m ≤ 5 min").endswith("| not measured | |")


def test_raw_numbers_are_kept_without_the_samples():
    raw = json.loads(results(100).to_json())
    assert raw["builds"]["100"][0]["measurement"]["wall_seconds"] == 250
    assert "samples" not in raw["reruns"][0]
    assert raw["layer"]["ours"][1]["largest_process_peak_bytes"] == int(1.2 * GB) - 1000
