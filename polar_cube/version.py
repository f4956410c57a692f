"""What software made a cube: recorded in every cube's metadata and fingerprints."""

from __future__ import annotations

from importlib.metadata import version


def software_version() -> str:
    return f"polar-datacube {version('polar-datacube')}"
