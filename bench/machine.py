"""What the benchmark ran on: CPU, cores, RAM, OS, Python, GDAL and package versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("polar-datacube", "prefect", "xarray", "dask", "zarr", "rioxarray", "numpy", "scipy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _output(command: list[str]) -> str | None:
    """First line of a command's output, or None if it cannot run."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def _package_versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def git_revision() -> str:
    commit = _output(["git", "rev-parse", "--short=12", "HEAD"])
    if commit is None:
        return "unknown"
    try:  # read-only: --no-optional-locks keeps git from refreshing the index
        unchanged = subprocess.run(
            ["git", "--no-optional-locks", "diff", "--quiet", "HEAD"], cwd=REPO, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return commit
    return commit + ("" if unchanged.returncode == 0 else " with uncommitted changes")


def describe_machine() -> dict[str, str]:
    """Name -> description, in the order the report shows them."""
    import psutil
    import rasterio

    weed = Path(sys.executable).parent / "weed"
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    gdalwarp = _output(["gdalwarp", "--version"]) or "gdalwarp not found"
    return {
        "CPU": cpu_model(),
        "cores": f"{usable} usable ({logical} logical, {psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{os_name()}, Linux {platform.release()}",
        "Python": platform.python_version(),
        "GDAL": f"{gdalwarp.split(',')[0]} (gdalwarp); GDAL {rasterio.__gdal_version__} "
        "(rasterio: ours and the original method)",
        "SeaweedFS": _output([str(weed), "version"]) or "unknown",
        "packages": _package_versions(),
        "code": f"git {git_revision()}",
    }
