"""The report on a published cube: statistics per variable and time step, quicklooks and a
markdown summary, saved next to the cube in `<stem>.quicklooks/`.

It never reads the cube's full-resolution data: the statistics are the ones the writing pass
stored in each variable's metadata (carried through upload, merge and publish), and the
quicklooks are drawn from the published overview levels (`<stem>.levels/`). A report records
which cube it describes (its inputs fingerprint and patch digest) and holds small thumbnails
of the quicklooks as `data:` URIs (for the Prefect UI, which cannot open `s3://`), so a
rerun that changed nothing reuses it whole.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field

from polar_cube.cube import target as steps
from polar_cube.cube.patching import PATCH_ATTR
from polar_cube.cube.verify import VariableStats, stats_markdown, stored_stats
from polar_cube.location import StoreLocation
from polar_cube.spec import CubeSpec
from polar_cube.zarr_store import FINGERPRINT_ATTR

RECORD = "report.json"


@dataclass(frozen=True)
class CubeReport:
    stats: list[VariableStats]
    quicklooks: list[str]  # URLs of the PNGs
    summary: str  # markdown
    folder: str  # URL of the folder holding them
    reused: bool = False
    # quicklook file name -> a small PNG of it as a `data:image/png;base64,...` URI
    thumbnails: dict[str, str] = field(default_factory=dict)


def published_identity(location: StoreLocation, spec: CubeSpec) -> dict:
    """What tells one published cube from another: its inputs fingerprint and patch."""
    attrs = steps.zarr_attrs(location, spec.data_id)
    return {"fingerprint": attrs.get(FINGERPRINT_ATTR), "patch": attrs.get(PATCH_ATTR)}


def current_report(location: StoreLocation, spec: CubeSpec) -> CubeReport:
    """The report of the cube published now: the saved one if it still describes it, else
    a new one (see `make_report`)."""
    return saved_report(location, spec) or make_report(location, spec)


def saved_report(location: StoreLocation, spec: CubeSpec) -> CubeReport | None:
    """The saved report, if it describes the cube published now."""
    folder = steps.quicklooks_key(spec)
    path = location.path(folder, RECORD)
    if not location.fs.exists(path):
        return None
    try:
        record = json.loads(location.fs.cat_file(path))
        stats = [VariableStats(**item) for item in record["stats"]]
        identity, quicklooks, summary = record["cube"], record["quicklooks"], record["summary"]
        thumbnails = dict(record["thumbnails"])
    except (ValueError, KeyError, TypeError):
        return None
    current = published_identity(location, spec)
    if identity != current or current["fingerprint"] is None:
        return None
    if not all(
        location.fs.exists(location.path(folder, url.rsplit("/", 1)[-1])) for url in quicklooks
    ):
        return None
    return CubeReport(
        stats, quicklooks, summary, location.url(folder), reused=True, thumbnails=thumbnails
    )


def make_report(location: StoreLocation, spec: CubeSpec) -> CubeReport:
    """Statistics from the published cube's metadata, quicklooks from its overview levels;
    save them with the record of which cube they describe (written last)."""
    # matplotlib only when drawing: an unchanged rerun never imports it (0.4 s)
    from polar_cube.cube.quicklook import quicklook_thumbnails, write_quicklooks

    cube = steps.open_cube(location, spec.data_id)  # lazily: metadata and coordinates
    stats = stored_stats(cube, spec, location.url(spec.data_id))
    overviews = steps.open_overviews(location, steps.levels_key(spec))
    folder_key = steps.quicklooks_key(spec)
    folder = location.url(folder_key)
    quicklooks = write_quicklooks(cube, spec, folder, location.storage_options, overviews=overviews)
    thumbnails = {
        name: png_data_uri(png) for name, png in quicklook_thumbnails(cube, spec, overviews).items()
    }
    summary = stats_markdown(
        stats,
        title=spec.title,
        cube_url=location.url(spec.data_id),
        extra_lines=[f"Quicklooks: `{folder}/` ({len(quicklooks)} PNG)"],
    )
    steps.save_report(location, spec, stats, summary)
    record = {
        "cube": published_identity(location, spec),
        "stats": [asdict(s) for s in stats],
        "quicklooks": quicklooks,
        "summary": summary,
        "thumbnails": thumbnails,
    }
    location.fs.pipe_file(location.path(folder_key, RECORD), json.dumps(record).encode())
    return CubeReport(stats, quicklooks, summary, folder, thumbnails=thumbnails)


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...`: an image a markdown page shows without fetching it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
