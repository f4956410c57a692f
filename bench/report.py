"""The benchmark's results and their markdown table: medians of N runs, ratios of medians."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from bench.measure import Measurement
from bench.phases import ALL_DATASETS, OUTSIDE_TASKS

GB = 1e9
LAYER_LABELS = {
    "ours": "ours: `polar_cube.dataset` convert → resample → describe → write (zarr)",
    "gdalwarp": "`gdalwarp -multi -wo NUM_THREADS=ALL_CPUS -r bilinear` (tiled ZSTD GeoTIFF)",
    "original": 'original: rioxarray + `Dataset.interp(method="linear")` + `to_zarr`',
}
ICE_SOURCE, MAGNETIC_SOURCE = "ice_thickness_cryosmos", "magnetic_anomaly"


@dataclass
class BuildRun:
    """One whole build: the command's measurement, its phases' wall seconds and peak RSS."""

    measurement: Measurement
    phases: dict[str, float]
    phase_peaks: dict[str, int] = field(default_factory=dict)
    objects: int = 0  # in the bucket after the build (0: not counted)
    stored_bytes: int = 0  # their size
    cpu_seconds: float = 0.0  # user + system of the build's whole process tree
    server_cpu_seconds: float = 0.0  # the S3 server's, during the build


@dataclass
class Results:
    command: str
    date: str
    machine: dict[str, str]
    runs: int
    target_resolution: float  # the spec's (the targets are for it)
    source_ids: list[str]
    layer_resolution: float | None = None
    layer_cells: int = 0
    layer: dict[str, list[Measurement]] = field(default_factory=dict)
    layer_commands: dict[str, str] = field(default_factory=dict)
    build_resolution: float | None = None
    build_command: str = ""
    builds: dict[float, list[BuildRun]] = field(default_factory=dict)
    cells: dict[float, int] = field(default_factory=dict)
    reruns: list[Measurement] = field(default_factory=list)
    formats: dict[str, list[BuildRun]] = field(default_factory=dict)  # builds in other formats
    format_commands: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """Every run's numbers (without the RSS samples)."""
        raw = _without_samples(asdict(self))
        raw["builds"] = {f"{r:g}": runs for r, runs in raw["builds"].items()}
        raw["cells"] = {f"{r:g}": n for r, n in raw["cells"].items()}
        return json.dumps(raw, indent=2, default=str) + "\n"


def _without_samples(value):
    if isinstance(value, dict):
        return {k: _without_samples(v) for k, v in value.items() if k != "samples"}
    if isinstance(value, list):
        return [_without_samples(v) for v in value]
    return value


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def spread(values: list[float], digits: int = 1) -> str:
    """The median, with min–max in brackets when there is more than one run."""
    if not values:
        return "–"
    text = _number(median(values), digits)
    if len(values) > 1:
        text += f" ({_number(min(values), digits)}–{_number(max(values), digits)})"
    return text


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _times(runs: list[Measurement]) -> list[float]:
    return [m.wall_seconds for m in runs]


def _peaks(runs: list[Measurement]) -> list[float]:
    return [m.peak_rss_bytes / GB for m in runs]


def _phase_values(runs: list[BuildRun], phase: str) -> list[float]:
    return [r.phases[phase] for r in runs if phase in r.phases]


def _phase_peak_values(runs: list[BuildRun], phase: str) -> list[float]:
    return [r.phase_peaks[phase] / GB for r in runs if phase in r.phase_peaks]


def _phase_median(runs: list[BuildRun], phase: str) -> float | None:
    return median(_phase_values(runs, phase))


def render(results: Results) -> str:
    """The whole report as markdown."""
    n = results.runs
    parts = [
        "### Benchmark results",
        "",
        f"Command: `{results.command}` ({results.date})",
        "",
        *[f"- **{name}**: {value}" for name, value in results.machine.items()],
        "",
        f"Every number is the median of {n} run{'s' * (n > 1)}"
        + (" (min–max in brackets)" if n > 1 else "")
        + "; ratios are ratios of medians. Wall: the measured command from launch to exit, "
        "Python start-up and imports included. Peak RSS: the largest summed resident memory "
        "of the command's whole process tree, sampled every 0.1 s (never below the exact "
        "peak of its largest process, its `VmHWM`); the Prefect API server and "
        "the S3 server run as separate processes and are not counted. GB = 10⁹ bytes.",
    ]
    if results.layer:
        parts += ["", *_layer_section(results)]
    if results.builds.get(results.build_resolution):
        parts += ["", *_build_section(results)]
    if len(results.builds) > 1:
        parts += ["", *_scaling_section(results)]
    if results.formats and results.builds.get(results.build_resolution):
        parts += ["", *_formats_section(results)]
    if any(r.cpu_seconds for r in results.builds.get(results.build_resolution, [])):
        parts += ["", *_cpu_section(results)]
    parts += ["", *_targets_section(results)]
    return "\n".join(parts) + "\n"


def _layer_section(results: Results) -> list[str]:
    ours = results.layer.get("ours", [])
    ours_time, ours_peak = median(_times(ours)), median(_peaks(ours))
    lines = [
        f"#### One layer: the 250 m magnetic anomaly GeoTIFF onto the {results.layer_resolution:g}"
        f" m grid ({results.layer_cells:,} cells)",
        "",
        "| method | wall (s) | peak RSS (GB) | wall ÷ ours | peak RSS ÷ ours |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, runs in results.layer.items():
        time_ratio = ratio(median(_times(runs)), ours_time)
        peak_ratio = ratio(median(_peaks(runs)), ours_peak)
        lines.append(
            f"| {LAYER_LABELS.get(method, method)} | {spread(_times(runs))} | "
            f"{spread(_peaks(runs), 2)} | {_number(time_ratio, 2)} | {_number(peak_ratio, 2)} |"
        )
    lines += ["", "Exact commands:", "", "```text"]
    lines += [f"{method}: {command}" for method, command in results.layer_commands.items()]
    return lines + ["```"]


def _build_section(results: Results) -> list[str]:
    resolution = results.build_resolution
    runs = results.builds[resolution]
    phases = list(dict.fromkeys(p for r in runs for p in r.phases))
    lines = [
        f"#### Whole build at {resolution:g} m into the local S3 server",
        "",
        "Downloads already in the cache; each run starts with no per-dataset cubes and an "
        "empty bucket (a fresh SeaweedFS). Phases from the task runs the Prefect API recorded: "
        "a phase's wall time is the time at least one of its tasks ran (parallel tasks are "
        "not added up), its peak RSS the largest sample of the build's memory from its first "
        "task's start to its last task's end.",
        "",
        f"`{results.build_command}`",
        "",
        "| step | wall (s) | peak RSS (GB) |",
        "|---|---:|---:|",
    ]
    for phase in phases:
        name = f"**{phase}**" if phase == ALL_DATASETS else phase
        if phase == OUTSIDE_TASKS:
            name = "outside tasks (start-up, Prefect, flow code)"
        peaks = spread(_phase_peak_values(runs, phase), 2)
        lines.append(f"| {name} | {spread(_phase_values(runs, phase))} | {peaks} |")
    build = [r.measurement for r in runs]
    lines.append(f"| **whole build** | {spread(_times(build))} | {spread(_peaks(build), 2)} |")
    if results.reruns:
        lines.append(
            f"| **rerun with nothing changed** | {spread(_times(results.reruns))} | "
            f"{spread(_peaks(results.reruns), 2)} |"
        )
    return lines


def _scaling_section(results: Results) -> list[str]:
    resolutions = sorted(results.builds, reverse=True)  # coarse first
    lines = [
        "#### Scaling: the whole build at " + ", ".join(f"{r:g} m" for r in resolutions),
        "",
        "Merge and publish against the cube's size: the merge writes metadata only, the "
        "publish one catalog object.",
        "",
        "| resolution | cells per layer | whole build (s) | all per-dataset cubes (s) | "
        "merge (s) | publish (s) | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for resolution in resolutions:
        runs = results.builds[resolution]
        build = [r.measurement for r in runs]
        lines.append(
            f"| {resolution:g} m | {results.cells[resolution]:,} | {spread(_times(build))} | "
            f"{spread(_phase_values(runs, ALL_DATASETS))} | "
            f"{spread(_phase_values(runs, 'merge'), 2)} | "
            f"{spread(_phase_values(runs, 'publish'), 2)} | {spread(_peaks(build), 2)} |"
        )
    fine, coarse = resolutions[-1], resolutions[0]
    fine_runs, coarse_runs = results.builds[fine], results.builds[coarse]
    ratios = [
        ratio(results.cells[fine], results.cells[coarse]),
        _build_ratio(results, fine, coarse),
        ratio(_phase_median(fine_runs, ALL_DATASETS), _phase_median(coarse_runs, ALL_DATASETS)),
        ratio(_peak_median(fine_runs), _peak_median(coarse_runs)),
    ]
    shown = " | ".join(_number(r, 2) for r in ratios[:3])
    lines.append(f"| ratio {fine:g} m ÷ {coarse:g} m | {shown} | | | {_number(ratios[3], 2)} |")
    return lines


def _formats_section(results: Results) -> list[str]:
    fine = results.build_resolution
    rows = {"zarr 2 (the default)": results.builds[fine], **results.formats}
    lines = [
        f"#### Formats: the whole build at {fine:g} m in each",
        "",
        "| format | whole build (s) | all per-dataset cubes (s) | merge (s) | publish (s) | "
        "objects in the bucket | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in rows.items():
        build = [r.measurement for r in runs]
        objects = median([r.objects for r in runs if r.objects])
        lines.append(
            f"| {label} | {spread(_times(build))} | {spread(_phase_values(runs, ALL_DATASETS))} "
            f"| {spread(_phase_values(runs, 'merge'), 2)} | "
            f"{spread(_phase_values(runs, 'publish'), 2)} | "
            f"{_number(objects, 0)} | {spread(_peaks(build), 2)} |"
        )
    lines += ["", "```text", *(f"{k}: {v}" for k, v in results.format_commands.items()), "```"]
    return lines


def _cpu_section(results: Results) -> list[str]:
    """CPU seconds of the build and of the S3 server beside it, against the wall time:
    how busy the machine's cores were."""
    fine = results.build_resolution
    rows = {"zarr 2 (the default)": results.builds[fine], **results.formats}
    cores = results.machine.get("cores", "")
    lines = [
        f"#### Where the CPU goes: the whole build at {fine:g} m",
        "",
        "CPU seconds (user + system) of the build's process tree and of the S3 server during "
        "it; cores busy: both together ÷ wall time (the machine has "
        f"{cores.split(' ', 1)[0] or '?'} cores).",
        "",
        "| format | build (CPU s) | S3 server (CPU s) | cores busy | GB in the bucket | "
        "S3 server CPU s per GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, runs in rows.items():
        runs = [r for r in runs if r.cpu_seconds]
        if not runs:
            continue
        busy = [(r.cpu_seconds + r.server_cpu_seconds) / r.measurement.wall_seconds for r in runs]
        stored = [r.stored_bytes / GB for r in runs if r.stored_bytes]
        per_gb = [r.server_cpu_seconds / (r.stored_bytes / GB) for r in runs if r.stored_bytes]
        lines.append(
            f"| {label} | {spread([r.cpu_seconds for r in runs])} | "
            f"{spread([r.server_cpu_seconds for r in runs])} | {spread(busy, 2)} | "
            f"{spread(stored, 2)} | {spread(per_gb)} |"
        )
    return lines


def _peak_median(runs: list[BuildRun]) -> float | None:
    return median(_peaks([r.measurement for r in runs]))


def _build_ratio(results: Results, fine: float, coarse: float) -> float | None:
    def wall(resolution: float) -> float | None:
        return median([r.measurement.wall_seconds for r in results.builds.get(resolution, [])])

    return ratio(wall(fine), wall(coarse))


@dataclass(frozen=True)
class Target:
    text: str
    measured: float | None
    unit: str
    holds: Callable[[float], bool]
    at_resolution: float | None  # where it was measured


# The absolute times were set on a host where this gdalwarp took 21.2 s: goals are
# scaled by the gdalwarp time measured in the same run (hosts differ by up to 2×).
REFERENCE_GDALWARP_SECONDS = 21.2


def host_scale(results: Results) -> float | None:
    """gdalwarp here ÷ gdalwarp on the issue's host (None without the layer comparison)."""
    gdalwarp = median(_times(results.layer.get("gdalwarp", [])))
    return gdalwarp / REFERENCE_GDALWARP_SECONDS if gdalwarp else None


def targets(results: Results) -> list[Target]:
    """The issue's targets with the measured values (None: not measured)."""
    fine = results.build_resolution
    runs = results.builds.get(fine, []) if fine is not None else []
    build = [r.measurement for r in runs]
    layer = results.layer
    layer_time = {m: median(_times(r)) for m, r in layer.items()}
    layer_peak = {m: median(_peaks(r)) for m, r in layer.items()}
    moving = [_phase_median(runs, p) for p in ("carry", "merge", "publish")]
    moved = sum(v for v in moving if v is not None) if any(v is not None for v in moving) else None
    scale = host_scale(results)
    here = scale or 1.0
    scaled = (
        f" (here ≤ {{:.0f}} s: gdalwarp {scale * REFERENCE_GDALWARP_SECONDS:.1f} s ÷ 21.2 s)"
        if scale
        else " (not scaled: no gdalwarp run)"
    )
    t = results.target_resolution
    return [
        Target(
            f"whole build at {t:g} m ≤ 100 s wall" + scaled.format(100 * here),
            median(_times(build)),
            "s",
            lambda v: v <= 100 * here,
            fine,
        ),
        Target(
            f"whole build at {t:g} m ≤ 2 GB peak RSS",
            median(_peaks(build)),
            "GB",
            lambda v: v <= 2,
            fine,
        ),
        Target(
            "upload (carry) + merge + publish ≤ 15 % of the build's wall time",
            ratio(moved, median(_times(build))),
            "×",
            lambda v: v <= 0.15,
            fine,
        ),
        Target(
            f"publish at {t:g} m ≤ 2 s",
            _phase_median(runs, "publish"),
            "s",
            lambda v: v <= 2,
            fine,
        ),
        Target(
            "rerun with nothing changed ≤ 10 s" + scaled.format(10 * here),
            median(_times(results.reruns)),
            "s",
            lambda v: v <= 10 * here,
            fine,
        ),
        Target(
            "one layer: ≥ 5× faster than the original method",
            ratio(layer_time.get("original"), layer_time.get("ours")),
            "×",
            lambda v: v >= 5,
            results.layer_resolution,
        ),
        Target(
            "one layer: ≤ 1/8 of the original method's peak RSS (original ÷ ours ≥ 8)",
            ratio(layer_peak.get("original"), layer_peak.get("ours")),
            "×",
            lambda v: v >= 8,
            results.layer_resolution,
        ),
        Target(
            "one layer: ≥ 2× faster than gdalwarp -multi",
            ratio(layer_time.get("gdalwarp"), layer_time.get("ours")),
            "×",
            lambda v: v >= 2,
            results.layer_resolution,
        ),
        Target(
            "ice_thickness's cube ≤ 2× magnetic_anomaly's (same size, one layer)",
            ratio(
                _phase_median(runs, f"cube {ICE_SOURCE}"),
                _phase_median(runs, f"cube {MAGNETIC_SOURCE}"),
            ),
            "×",
            lambda v: v <= 2,
            fine,
        ),
    ]


def _targets_section(results: Results) -> list[str]:
    lines = [
        "#### The issue's targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    elsewhere = False
    for target in targets(results):
        if target.measured is None:
            lines.append(f"| {target.text} | not measured | |")
            continue
        digits = 2 if target.unit in ("×", "GB") else 1
        met = "yes" if target.holds(target.measured) else "**no**"
        if target.at_resolution != results.target_resolution:
            met += f" (at {target.at_resolution:g} m)"
            elsewhere = True
        measured = f"{_number(target.measured, digits)} {target.unit}"
        lines.append(f"| {target.text} | {measured} | {met} |")
    if elsewhere:
        lines += [
            "",
            f'Rows marked "at … m" were measured at a reduced resolution; the targets are '
            f"for {results.target_resolution:g} m and only a run there checks them.",
        ]
    return lines
