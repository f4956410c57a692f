"""The story of one build, for the Prefect UI: its phases and how far it is (a percentage
through all of them), and the run's summary in markdown (what was built and what reused,
the time of each phase, one table per variable with its thumbnails).

Plain functions and classes; the Prefect layer (`polar_cube.flows.build_cube`) turns them
into a progress artifact and a markdown artifact on the parent flow run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from polar_cube.cube.compliance import MetadataReport
from polar_cube.cube.verify import VariableStats, stats_table_rows


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    weight: float  # its share of a typical build's time (they need not add up to 100)


PHASES = (
    Phase("check", "check the spec, grid and patch", 1),
    Phase("datasets", "download the sources, write each one's chunks into the new version", 80),
    Phase("carry", "copy unchanged sources from the version that has them", 3),
    Phase("merge", "write the merged cube's and levels' metadata", 2),
    Phase("patch", "apply the patch", 1),
    Phase("verify", "verify the new version's cube and levels", 2),
    Phase("metadata", "check CF-1.10 and ACDD-1.3, no worse than the last published", 1),
    Phase("report", "statistics, quicklooks and thumbnails", 7),
    Phase("stac", "write the STAC item", 2),
    Phase("publish", "point `latest` at the new version", 1),
)
# `--format icechunk` adds a last phase
ICECHUNK_PHASE = Phase("icechunk", "commit the version to the Icechunk repository, by reference", 1)


def build_phases(cube_format: str = "zarr") -> tuple[Phase, ...]:
    """The phases of a build writing `cube_format` ("zarr" or "icechunk")."""
    return (*PHASES, ICECHUNK_PHASE) if cube_format == "icechunk" else PHASES


def progress_text(percent: float, text: str) -> str:
    """`42 % · text`: how a progress artifact's description reads (its card shows it)."""
    return f"{percent:.0f} % · {text}"


@dataclass(frozen=True)
class ProgressSpan:
    """The share of the parent run's progress (`start` to `end` %) one part of it covers,
    e.g. the per-dataset cubes built by the `build-datasets` subflow, which reports into the
    parent's progress artifact `artifact_id`."""

    artifact_id: str
    start: float
    end: float
    label: str

    def at(self, fraction: float) -> float:
        """The parent's percentage with this part `fraction` (0..1) done."""
        return self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)

    def text(self, done: int, total: int, latest: str = "") -> str:
        """The description with `done` of `total` items of this part finished."""
        after = f" (latest: {latest})" if latest else ""
        return progress_text(
            self.at(done / total if total else 1.0), f"{self.label}: {done} of {total} done{after}"
        )


@dataclass
class PhaseTiming:
    key: str
    title: str
    seconds: float | None = None  # None: not run (or still running)
    note: str = ""  # "skipped: the cube is already current", ...


class BuildProgress:
    """Where a build is among `phases` and how long each took.

    `start(key)` ends the running phase (recording its time) and starts `key`; `advance`
    moves within it; `skip(key, why)` records a phase not needed; `finish()` ends the last
    one at 100 %. Every change calls `on_change(percent, description)`.
    """

    def __init__(
        self,
        phases: Sequence[Phase] = PHASES,
        on_change: Callable[[float, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phases = list(phases)
        self.on_change = on_change
        self.clock = clock
        self.timings = {p.key: PhaseTiming(p.key, p.title) for p in self.phases}
        self.started = clock()
        self.current: str | None = None
        self.current_since = self.started
        self.percent = 0.0
        self.finished: float | None = None  # total seconds, once finished
        self._description = progress_text(0, "starting")
        total = sum(p.weight for p in self.phases) or 1.0
        self._bounds, before = {}, 0.0
        for phase in self.phases:
            self._bounds[phase.key] = (100 * before / total, 100 * (before + phase.weight) / total)
            before += phase.weight

    def span(self, key: str) -> tuple[float, float]:
        """The percentages at which phase `key` starts and ends."""
        return self._bounds[key]

    def start(self, key: str, note: str = "") -> None:
        self._end_current()
        self.current, self.current_since = key, self.clock()
        self.timings[key].note = note
        self._set(self.span(key)[0], self._doing(key))

    def advance(self, fraction: float, text: str = "") -> None:
        """Within the running phase: `fraction` (0..1) of it done."""
        if self.current is None:
            return
        low, high = self.span(self.current)
        fraction = min(max(fraction, 0.0), 1.0)
        self._set(low + (high - low) * fraction, text or self._doing(self.current))

    def skip(self, key: str, why: str) -> None:
        """Phase `key` is not needed this run."""
        self.timings[key].note = f"skipped: {why}"

    def finish(self, text: str = "done") -> None:
        self._end_current()
        self.current = None
        self.finished = self.clock() - self.started
        self._set(100.0, f"{text} in {format_seconds(self.finished)}")

    def failed(self, error: BaseException) -> None:
        """Say where the build stopped (the percentage stays where it was)."""
        where = self.current or "start"
        self._end_current(note=f"failed: {type(error).__name__}")
        self.current = None
        self._set(self.percent, f"failed in {where}: {str(error)[:200]}")

    @property
    def description(self) -> str:
        return self._description

    def timing_rows(self) -> list[PhaseTiming]:
        return [self.timings[p.key] for p in self.phases]

    def _doing(self, key: str) -> str:
        index = [p.key for p in self.phases].index(key)
        title = self.timings[key].title
        return f"{key}: {title} (phase {index + 1} of {len(self.phases)})"

    def _end_current(self, note: str = "") -> None:
        if self.current is not None:
            timing = self.timings[self.current]
            timing.seconds = self.clock() - self.current_since
            if note:
                timing.note = note

    def _set(self, percent: float, text: str) -> None:
        self.percent = max(self.percent, percent) if percent < 100 else 100.0
        self._description = progress_text(self.percent, text)
        if self.on_change:
            self.on_change(self.percent, self._description)


def format_seconds(seconds: float | None) -> str:
    """`0.4 s`, `12.3 s`, `2 min 05 s`, `1 h 02 min`; `–` for None."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class DatasetOutcome:
    """One source's part in the run: did this run download it, build its cube?"""

    source_id: str
    downloaded: bool  # False: the download cache had it
    reused: bool  # True: its per-dataset cube was already current
    sha256: str = ""  # of the source used
    replaced_sha256: str | None = None  # the cached copy's, when the upstream file changed


@dataclass
class RunSummary:
    """Everything the run's summary says; `markdown()` and `description()` render it."""

    title: str  # the spec's title
    cube_name: str  # `<stem>.zarr`
    cube_url: str
    resolution: float
    grid_shape: tuple[int, int]  # (y, x) cells
    datasets: Sequence[DatasetOutcome]
    cube_reused: bool
    stats: Sequence[VariableStats]
    long_names: dict[str, str]  # variable -> long name
    timings: Sequence[PhaseTiming]
    total_seconds: float | None
    quicklooks_url: str = ""
    quicklooks: Sequence[str] = ()
    thumbnails: dict[str, str] = field(default_factory=dict)  # quicklook file name -> URI
    report_reused: bool = False
    levels_url: str = ""
    stac_url: str = ""
    viewer_url: str = ""
    viewer_command: str = ""
    metadata: MetadataReport | None = None  # the metadata gate's findings (None: reused)

    def description(self) -> str:
        """One line for the artifact's card."""
        built = sum(not d.reused for d in self.datasets)
        cube = "reused (already current)" if self.cube_reused else "merged and published"
        return (
            f"{self.cube_name} at {self.resolution:g} m: {built} of {len(self.datasets)} "
            f"per-dataset cubes built, cube {cube}, {len(self.stats)} layers checked, "
            f"in {format_seconds(self.total_seconds)}"
        )

    def markdown(self) -> str:
        lines = [
            f"# {self.cube_name}",
            "",
            f"**{self.title}** at {self.resolution:g} m "
            f"({self.grid_shape[1]} × {self.grid_shape[0]} cells), "
            f"{'reused' if self.cube_reused else 'published'} at `{self.cube_url}` "
            f"in {format_seconds(self.total_seconds)}.",
            "",
            "## Built and reused",
            "",
            *self._built_lines(),
            "",
            "## Where it is",
            "",
            *self._where_lines(),
            "",
            "## Time per phase",
            "",
            *timing_table(self.timings, self.total_seconds),
            "",
            *self._metadata_lines(),
            "## Variables",
            "",
            "Valid % is the share of grid cells with data; min, max and mean are over those "
            "cells. Thumbnails are drawn from the overview levels; the full-size quicklooks are "
            "in the quicklooks folder.",
            "",
            *variable_sections(self.stats, self.long_names, self.thumbnails),
        ]
        return "\n".join(lines).rstrip() + "\n"

    def _metadata_lines(self) -> list[str]:
        if self.metadata is None:
            return []
        return ["## Metadata checks", "", *self.metadata.markdown(), ""]

    def _built_lines(self) -> list[str]:
        total = len(self.datasets)
        fetched = [d.source_id for d in self.datasets if d.downloaded]
        built = [d.source_id for d in self.datasets if not d.reused]
        if self.cube_reused:
            cube = "already current: reused (nothing merged, patched or published)"
        else:
            cube = "merged, patched, verified and published"
        report = "reused (the cube is unchanged)" if self.report_reused else "drawn by this run"
        return [
            f"- **Source downloads**: {len(fetched)} fetched, reused {total - len(fetched)} "
            f"of {total} from the cache" + _named(fetched, "fetched"),
            f"- **Per-dataset cubes**: {len(built)} built, reused {total - len(built)} "
            f"of {total}" + _named(built, "built"),
            f"- **Cube**: {cube}",
            f"- **Statistics and quicklooks**: {report}",
            *(
                f"- **Changed upstream**: `{d.source_id}`, new bytes at the same URL: sha256 "
                f"`{d.replaced_sha256}` → `{d.sha256}`"
                for d in self.datasets
                if d.replaced_sha256
            ),
        ]

    def _where_lines(self) -> list[str]:
        lines = [f"- Cube: `{self.cube_url}`"]
        if self.levels_url:
            lines.append(f"- Overview levels: `{self.levels_url}/`")
        if self.quicklooks_url:
            lines.append(
                f"- Quicklooks, full size: `{self.quicklooks_url}/` ({len(self.quicklooks)} PNG, "
                "with stats.json and summary.md)"
            )
        if self.stac_url:
            lines.append(f"- STAC item: `{self.stac_url}`")
        if self.viewer_url:
            how = f" once `{self.viewer_command}` runs" if self.viewer_command else ""
            lines.append(f"- Viewer: [{self.viewer_url}]({self.viewer_url}){how}")
        return lines


def _named(ids: Sequence[str], verb: str) -> str:
    if not ids:
        return ""
    shown = ", ".join(f"`{i}`" for i in ids[:12])
    return f" ({verb}: {shown}{', …' if len(ids) > 12 else ''})"


def timing_table(timings: Iterable[PhaseTiming], total_seconds: float | None) -> list[str]:
    """A markdown table: phase, what it does, its time (or why it did not run)."""
    lines = ["| phase | what | time |", "|---|---|---:|"]
    for timing in timings:
        took = format_seconds(timing.seconds) if timing.seconds is not None else ""
        shown = "; ".join(part for part in (took, timing.note) if part) or "–"
        lines.append(f"| {timing.key} | {timing.title} | {shown} |")
    lines.append(f"| **total** | | **{format_seconds(total_seconds)}** |")
    return lines


def variable_sections(
    stats: Iterable[VariableStats], long_names: dict[str, str], thumbnails: dict[str, str]
) -> list[str]:
    """Per variable: a heading, its thumbnails (one per time step) and a table of valid %,
    min, max and mean (one row per time step)."""
    by_variable: dict[str, list[dict]] = {}
    for row in stats_table_rows(stats):
        by_variable.setdefault(row["variable"], []).append(row)
    lines: list[str] = []
    for name, rows in by_variable.items():
        units = rows[0]["units"]
        heading = long_names.get(name, name)
        lines += [f"### `{name}`: {heading}" + (f" [{units}]" if units not in ("", "1") else "")]
        images = []
        for row in rows:
            file_name = f"{name}_{row['time']}.png" if row["time"] else f"{name}.png"
            if file_name in thumbnails:
                alt = f"{name} {row['time']}".strip()
                images.append(f"![{alt}]({thumbnails[file_name]})")
        if images:
            lines += ["", " ".join(images)]
        lines += ["", "| time | valid % | min | max | mean |", "|---|---:|---:|---:|---:|"]
        for row in rows:
            cells = [row["time"] or "–", row["valid %"], row["min"], row["max"], row["mean"]]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


def _cell(value: object) -> str:
    if value is None or value == "":
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)
