"""Where cubes live: a local folder or an s3:// prefix, reached through fsspec."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs
from fsspec.mapping import FSMap

# s3fs reads each file whole (a chunk: ≤ 17 MB): bounds the memory a transfer takes
FILES_IN_FLIGHT = 16


@dataclass(frozen=True)
class StoreLocation:
    """A root URL (local path or s3://bucket/prefix) and the options to reach it.

    `storage_options` may hold secrets: it is kept out of repr and never logged.
    """

    root: str
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def local(cls, folder: str | Path) -> StoreLocation:
        return cls(str(Path(folder).resolve()))

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:  # writes into new folders, as object stores allow
            return fsspec.filesystem("file", auto_mkdir=True)
        return url_to_fs(self.root, **self.storage_options)[0]

    def child(self, *parts: str) -> StoreLocation:
        """The location of `parts` under this one, reached with the same options."""
        return StoreLocation(self.url(*parts), self.storage_options)

    def path(self, *parts: str) -> str:
        """The filesystem's own path (no protocol) of `parts` under the root."""
        return url_to_fs(self.url(*parts), **self.storage_options)[1]

    def mapper(self, *parts: str) -> FSMap:
        return self.fs.get_mapper(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))


def remote_files(location: StoreLocation, *parts: str) -> dict[str, int]:
    """{relative key: size} of every object under `parts` (empty if there is none)."""
    base = location.path(*parts).rstrip("/")
    location.fs.invalidate_cache()  # s3fs caches listings; other processes may have written
    if not location.fs.exists(base):
        return {}
    found = location.fs.find(base, detail=True)
    return {key[len(base) + 1 :]: int(info["size"]) for key, info in found.items()}
