"""Where things are kept in a target (a bucket prefix or a folder), and what kind of object a
key names: the one place that spells object keys."""

from __future__ import annotations

from dataclasses import dataclass

from polar_cube.levels import ZLEVELS, levels_name

INPUTS_PREFIX = "inputs"
CHUNKS_SUFFIX = ".chunks.json"
METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json", ZLEVELS)


def icechunk_key(series: str) -> str:
    """The series' Icechunk repository (`--format icechunk`): `<series>.icechunk`."""
    return f"{series}.icechunk"


def input_key(source_id: str) -> str:
    """Where a source's per-dataset cube is kept in the target: `inputs/<id>.zarr`."""
    return f"{INPUTS_PREFIX}/{source_id}.zarr"


def input_levels_key(source_id: str) -> str:
    """The overview levels of a source's per-dataset cube: `inputs/<id>.levels`."""
    return f"{INPUTS_PREFIX}/{levels_name(f'{source_id}.zarr')}"


def chunks_part_name(zarr_name: str) -> str:
    """The digests of the chunks a per-dataset cube `<id>.zarr` wrote: `<id>.chunks.json`
    next to it (combined into the version's `<stem>.chunks.json` before publishing)."""
    return f"{zarr_name.removesuffix('.zarr')}{CHUNKS_SUFFIX}"


def is_metadata(key: str) -> bool:
    """Zarr metadata, a levels record, or a level link (`0.link`): everything but chunks."""
    name = key.rsplit("/", 1)[-1]
    return name in METADATA_NAMES or name.endswith(".link")


def metadata_order(key: str) -> tuple[int, int, str]:
    """Write order of metadata: arrays' before their group's (deepest first), then
    consolidated metadata, the levels record `.zlevels` very last; deleting goes in reverse."""
    name = key.rsplit("/", 1)[-1]
    rank = {".zmetadata": 1, ZLEVELS: 2}.get(name, 0)
    return rank, -key.count("/"), key


@dataclass(frozen=True)
class VersionKeys:
    """Every key of one cube version, named by its cube `<series>-v<version>.zarr`:

    <stem>.zarr            the cube; each build writes its chunks here, once
    <stem>.levels/         its overview levels (chunks written in the same pass)
    <stem>.inputs/<id>.zarr, <id>.levels/
                           each source's per-dataset metadata (attributes, statistics,
                           fingerprint; no chunks: those are in the cube and its levels)
    <stem>.inputs/<id>.chunks.json
                           sha256 and size of each chunk object the source's build wrote
    <stem>.chunks.json     the manifest: sha256 and size of every chunk object of the cube
                           and its levels, by key (written before the version is published)
    <stem>.quicklooks/     PNGs, stats.json, summary.md
    <stem>.stac-item.json  the STAC item
    """

    cube: str

    @property
    def stem(self) -> str:
        return self.cube.removesuffix(".zarr")

    @property
    def levels(self) -> str:
        return levels_name(self.cube)

    @property
    def inputs(self) -> str:
        return f"{self.stem}.inputs"

    @property
    def quicklooks(self) -> str:
        return f"{self.stem}.quicklooks"

    @property
    def stac_item(self) -> str:
        return f"{self.stem}.stac-item.json"

    @property
    def manifest(self) -> str:
        return f"{self.stem}{CHUNKS_SUFFIX}"

    def input_chunks_key(self, source_id: str) -> str:
        """The digests of the chunks a source's build wrote into this version."""
        return f"{self.inputs}/{chunks_part_name(f'{source_id}.zarr')}"

    def input_key(self, source_id: str) -> str:
        """The per-dataset metadata of a source in this version."""
        return f"{self.inputs}/{source_id}.zarr"

    def input_levels_key(self, source_id: str) -> str:
        return f"{self.inputs}/{levels_name(f'{source_id}.zarr')}"

    def all_keys(self) -> tuple[str, ...]:
        """Everything of this version, for removing it whole."""
        return (self.cube, self.levels, self.inputs, self.quicklooks, self.stac_item, self.manifest)
