"""The metadata gate: the IOOS compliance checker's CF-1.10 and ACDD-1.3 checks on a cube,
and whether a new version's findings are worse than the last published version's.

The checker reads netCDF, so a cube is checked through a small netCDF sample of it
(`cube/export.py`: every variable and attribute, a window of `SAMPLE_CELLS` × `SAMPLE_CELLS`
cells with the extent attributes of the whole cube); its findings are those of the full
export (tests/test_metadata.py shows it). A finding is (suite, level, section, message),
numbers in the message replaced by `#` so that a finding about a value compares across
grids. A new version fails the gate (`MetadataGateError`) when it has a CF error at all, or
a finding of the levels that count (`GATED`) more often than the last published version.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from polar_cube.cube.export import netcdf_dataset
from polar_cube.errors import PolarCubeError
from polar_cube.location import StoreLocation

SUITES = ("cf:1.10", "acdd:1.3")
# the checker's weights (3, 2, 1) as each suite's report names them
LEVELS = {
    "cf:1.10": {3: "error", 2: "warning", 1: "info"},
    "acdd:1.3": {3: "highly recommended", 2: "recommended", 1: "suggested"},
}
# the levels a new version must not have more of than the last published one
GATED = {
    ("cf:1.10", "error"),
    ("cf:1.10", "warning"),
    ("acdd:1.3", "highly recommended"),
    ("acdd:1.3", "recommended"),
}
SAMPLE_CELLS = 16
_VARIABLE = re.compile(r'^variable "([^"]+)"')
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")


class MetadataGateError(PolarCubeError, ValueError):
    """A new version's metadata is worse than the last published version's (or breaks CF)."""


class MetadataCheckError(PolarCubeError, RuntimeError):
    """The checker could not check a cube (a check crashed)."""


@dataclass(frozen=True, order=True)
class Finding:
    suite: str  # "cf:1.10", "acdd:1.3"
    level: str  # "error", "warning", "info"; "highly recommended", "recommended", "suggested"
    section: str  # the checker's group: "§5.6 Horizontal Coordinate …", "Global Attributes"
    message: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What compares across versions: numbers in the message as `#`."""
        return (self.suite, self.level, self.section, _NUMBER.sub("#", self.message))

    @property
    def variable(self) -> str | None:
        """The variable an ACDD finding is about (`variable "name" missing …`), if one."""
        found = _VARIABLE.search(self.section)
        return found.group(1) if found else None

    @property
    def gated(self) -> bool:
        return (self.suite, self.level) in GATED

    def line(self) -> str:
        return f"{self.suite} {self.level}: {self.section}: {self.message}"


@dataclass(frozen=True)
class MetadataReport:
    """The checker's findings on one cube."""

    cube: str  # its URL
    findings: tuple[Finding, ...]
    checker_version: str = ""
    baseline: str | None = None  # the published version compared with, if any
    new: tuple[Finding, ...] = field(default=())  # gated findings the baseline lacks
    variables: tuple[str, ...] = ()  # the variables checked

    def counts(self) -> dict[tuple[str, str], int]:
        """(suite, level) -> findings, every level of both suites (0s too)."""
        counted = Counter((f.suite, f.level) for f in self.findings)
        return {(s, level): counted[(s, level)] for s in SUITES for level in LEVELS[s].values()}

    def markdown(self) -> list[str]:
        """The section of the run's summary: counts, then the findings that count."""
        lines = [
            f"IOOS compliance checker {self.checker_version} on a netCDF sample of the cube "
            "(every variable and attribute)"
            + (f"; compared with `{self.baseline}`." if self.baseline else "."),
            "",
            "| suite | level | findings |",
            "|---|---|---:|",
            *(f"| {s} | {level} | {n} |" for (s, level), n in self.counts().items()),
            "",
        ]
        gated = [f for f in self.findings if f.gated]
        lines += [f"- {'**new** ' if f in self.new else ''}{f.line()}" for f in gated]
        return lines


def sample(cube: xr.Dataset, cells: int = SAMPLE_CELLS) -> xr.Dataset:
    """`cube` cut to its first `cells` × `cells` cells, every variable and attribute as they
    are (the extent attributes stay the whole cube's)."""
    return cube.isel(x=slice(0, cells), y=slice(0, cells))


def check_netcdf(path: str | Path, name: str | None = None) -> MetadataReport:
    """Run `SUITES` on the netCDF file at `path`; every finding, each message its own."""
    from compliance_checker import __version__ as checker_version
    from compliance_checker.runner import CheckSuite

    # its import warns about its deprecated SOS checker; it prints which name table it uses
    # (the packaged one: `standard_name_vocabulary` names its version, v93; another would be
    # downloaded)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        CheckSuite.load_all_available_checkers()
        suite = CheckSuite()
        dataset = suite.load_dataset(str(path))
        variables = tuple(dataset.variables)
        try:
            results = suite.run_all(dataset, list(SUITES), skip_checks=[])
        finally:
            dataset.close()
    findings = []
    for suite_name, (groups, crashed) in results.items():
        if crashed:
            raise MetadataCheckError(
                f"{name or path}: the {suite_name} checks "
                f"{', '.join(sorted(crashed))} crashed: {next(iter(crashed.values()))[0]!r}"
            )
        for result in groups:
            if result.value[0] >= result.value[1]:
                continue
            level = LEVELS[_suite_key(suite_name)][result.weight]
            for message in result.msgs or ["(no message)"]:
                section = result.name.rstrip(":")
                findings.append(Finding(_suite_key(suite_name), level, section, message))
    return MetadataReport(
        str(name or path), tuple(sorted(findings)), checker_version, variables=variables
    )


def _suite_key(name: str) -> str:
    return next(s for s in SUITES if name.replace("_", ":").startswith(s.split(":")[0]))


def check_cube(cube: xr.Dataset, name: str, cells: int | None = SAMPLE_CELLS) -> MetadataReport:
    """Run `SUITES` on `cube` (a sample of `cells` × `cells`, or all of it with None)
    written as netCDF to a temporary file, as `export` writes it."""
    dataset, encoding = netcdf_dataset(sample(cube, cells) if cells else cube)
    with tempfile.TemporaryDirectory(prefix="polar-cube-check-") as folder:
        path = Path(folder) / f"{Path(name).stem}.nc"
        dataset.to_netcdf(path, format="NETCDF4", engine="netcdf4", encoding=encoding)
        return check_netcdf(path, name)


def compare(report: MetadataReport, baseline: MetadataReport | None) -> MetadataReport:
    """`report` with the gated findings it has more often than `baseline` (all of its CF
    errors when there is no baseline). An ACDD finding about a variable the baseline does not
    have is no regression: a variable added without a CF standard name (the table may have
    none) does not stop the build; CF findings about it do."""
    before = Counter(f.key for f in baseline.findings) if baseline else Counter()
    added = set(report.variables) - set(baseline.variables) if baseline else set()
    new = []
    for finding in report.findings:
        if not finding.gated or (finding.suite == "acdd:1.3" and finding.variable in added):
            continue
        if before[finding.key] > 0:
            before[finding.key] -= 1
        elif baseline is not None or finding.level == "error":
            new.append(finding)
    return MetadataReport(
        report.cube,
        report.findings,
        report.checker_version,
        baseline.cube if baseline else None,
        tuple(new),
        report.variables,
    )


def gate(report: MetadataReport) -> None:
    """MetadataGateError listing the new findings, and every CF error, if there are any."""
    errors = [f for f in report.findings if f.suite == "cf:1.10" and f.level == "error"]
    failing = list(dict.fromkeys([*report.new, *errors]))
    if not failing:
        return
    than = f"than {report.baseline}" if report.baseline else "(no version published before)"
    raise MetadataGateError(
        f"{report.cube}: its metadata is worse {than}: {len(failing)} finding(s): "
        + "; ".join(f.line() for f in failing),
        hint="fix the spec or patch.yaml; nothing was published",
    )


def lines(report: MetadataReport) -> Iterable[str]:
    """The report as text for a terminal: counts, then every finding."""
    yield f"{report.cube} (compliance-checker {report.checker_version})"
    for (suite, level), n in report.counts().items():
        yield f"  {suite:<9} {level:<19} {n}"
    for finding in report.findings:
        yield f"  - {finding.line()}"


def check_version(
    location: StoreLocation, key: str, baseline_key: str | None = None
) -> MetadataReport:
    """The findings on the cube at `key` (a version staged or published), compared with
    those on the published cube at `baseline_key`, if any (`compare`); `gate` decides."""
    from polar_cube.cube.target import open_cube

    report = check_cube(open_cube(location, key), location.url(key))
    baseline = None
    if baseline_key:
        baseline = check_cube(open_cube(location, baseline_key), location.url(baseline_key))
    return compare(report, baseline)
