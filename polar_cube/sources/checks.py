"""Is a source file complete and of its declared format? Cheap checks, one per format.

Each check raises `SourceFormatError` naming the file (`name`, default: the path) when the file
is cut short, damaged, or a web page instead of data. They read headers and at most one block
of data, so they also run every time a reader opens a file:

- netCDF classic (CDF-1/2/5): the header is parsed and every variable's declared data must lie
  inside the file (libnetcdf reads missing bytes of a truncated file as zeros);
- netCDF-4/HDF5: the superblock's end-of-file address must lie inside the file, and the last
  element of every variable must be readable;
- GeoTIFF: every strip/tile of every band must lie inside the file, and the last one in the
  file must decode;
- polygons: a shapefile's .shp/.shx/.dbf must be as long as their headers say (GDAL reads the
  features of a cut .shp as empty geometries), and every feature must be readable.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import netCDF4
import pyogrio
import rasterio
from rasterio.windows import Window
from xarray.backends.netCDF4_ import NETCDF4_PYTHON_LOCK

from polar_cube.errors import PolarCubeError, size_text
from polar_cube.sources.sniff import body_kind, body_start, read_head

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NC_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}
_NC_DIMENSION, _NC_VARIABLE, _NC_ATTRIBUTE = 0x0A, 0x0B, 0x0C
_STREAMING = {4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class SourceFormatError(PolarCubeError, ValueError):
    """A source file is not what its spec says; the message names the file."""


# The netCDF-C and HDF5 libraries are not thread-safe: downloads are checked on several threads
# at once, and xarray reads with this same lock.
NETCDF_LOCK = NETCDF4_PYTHON_LOCK


# A reader that must hold a whole grid in memory (GMT grids are small window-centre results)
# refuses one whose header declares more than this: a quarter of the machine's memory.
MAX_SOURCE_MEMORY_ENV = "POLAR_CUBE_MAX_SOURCE_MEMORY_BYTES"


def source_memory_limit() -> int:
    """Bytes a reader may hold at once (`POLAR_CUBE_MAX_SOURCE_MEMORY_BYTES`, default ¼ RAM)."""
    if os.environ.get(MAX_SOURCE_MEMORY_ENV):
        return int(os.environ[MAX_SOURCE_MEMORY_ENV])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def check_fits_in_memory(path: Path, what: str, needed: int) -> None:
    """Refuse, with the estimate, a read of `needed` bytes that would not fit the limit."""
    limit = source_memory_limit()
    if needed > limit:
        raise SourceFormatError(
            f"{path}: {what} would need {size_text(needed)} of memory to read, more than "
            f"the {size_text(limit)} allowed ({MAX_SOURCE_MEMORY_ENV})"
        )


def check_file(path: Path, source_format: str, name: str | None = None) -> None:
    """Check `path` as a complete file of `source_format` (a spec `source_format`)."""
    checks: dict[str, Callable[[Path, str | None], None]] = {
        "gmt_netcdf": check_netcdf,
        "latlon_netcdf": check_netcdf,
        "geotiff": check_geotiff,
        "polygons": check_polygons,
    }
    if source_format not in checks:
        raise ValueError(f"no check for source format {source_format!r}")
    checks[source_format](Path(path), name)


def _truncated(name: str, declared: int, size: int) -> SourceFormatError:
    return SourceFormatError(
        f"{name} is truncated: its header declares {declared} bytes of data, the file has {size}"
    )


def _library_error(error: Exception, path: Path, name: str) -> str:
    """A library's message with the file's path (perhaps a .part) given as `name`."""
    return str(error).replace(str(path), name)


def _refuse_non_data(path: Path, name: str, what: str, *, text_ok: bool = False) -> None:
    """An HTML page, an empty file or (unless `text_ok`) text saved under a data file's name."""
    head = read_head(path)
    kind = body_kind(head)
    if kind == "html":
        why = "it is an HTML page (a login or error page?), not data"
    elif kind == "text" and not text_ok:
        why = f"it is text, not data: {body_start(head)!r}"
    elif kind == "empty":
        why = "it is empty"
    else:
        return
    raise SourceFormatError(f"{name}: cannot open as {what}: {why}")


# --- netCDF -------------------------------------------------------------------------------------


def check_netcdf(path: Path, name: str | None = None) -> None:
    """A netCDF classic (CDF-1/2/5) or netCDF-4/HDF5 file, complete."""
    path = Path(path)
    name = name or str(path)
    _refuse_non_data(path, name, "netCDF")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic in (b"CDF\x01", b"CDF\x02", b"CDF\x05"):
        _check_classic_sizes(path, name)
        try:
            with NETCDF_LOCK:
                netCDF4.Dataset(path).close()
        except OSError as error:
            raise SourceFormatError(
                f"{name}: cannot open as netCDF: {_library_error(error, path, name)}"
            ) from None
        return
    with NETCDF_LOCK:
        _check_hdf5(path, name)


def _check_classic_sizes(path: Path, name: str) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            declared = _ClassicHeader(f, size).data_end()
        except _ShortHeader:
            raise SourceFormatError(
                f"{name} is truncated: its netCDF header goes past the end of the file "
                f"({size} bytes)"
            ) from None
        except _BadHeader as error:
            raise SourceFormatError(f"{name}: damaged netCDF header ({error})") from None
    if declared > size:
        raise _truncated(name, declared, size)


class _ShortHeader(Exception):
    pass


class _BadHeader(Exception):
    pass


class _ClassicHeader:
    """The netCDF classic header (big-endian; CDF-5 has 64-bit counts), parsed as far as
    needed to know where each variable's data ends."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size, self.pos = f, size, 0
        self.version = self.take(4)[3]
        self.count_bytes = 8 if self.version == 5 else 4
        self.offset_bytes = 4 if self.version == 1 else 8

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise _ShortHeader
        data = self.f.read(n)
        if len(data) != n:
            raise _ShortHeader
        self.pos += n
        return data

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "big")

    def count(self) -> int:
        return self.uint(self.count_bytes)

    def name(self) -> str:
        length = self.count()
        return self.take(_pad4(length))[:length].decode("utf-8", "replace")

    def list_header(self, tag: int) -> int:
        found, n = self.uint(4), self.count()
        if found == 0 and n == 0:
            return 0
        if found != tag:
            raise _BadHeader(f"expected list tag {tag:#x} at byte {self.pos}, found {found:#x}")
        return n

    def skip_attributes(self) -> None:
        for _ in range(self.list_header(_NC_ATTRIBUTE)):
            self.name()
            type_size = self.type_size(self.uint(4))
            self.take(_pad4(self.count() * type_size))

    def type_size(self, nc_type: int) -> int:
        if nc_type not in _NC_TYPE_SIZES or (nc_type > 6 and self.version != 5):
            raise _BadHeader(f"unknown type {nc_type} at byte {self.pos}")
        return _NC_TYPE_SIZES[nc_type]

    def data_end(self) -> int:
        """The byte where the last variable's data ends (the file must be at least this long)."""
        numrecs = self.count()
        dims = [(self.name(), self.count()) for _ in range(self.list_header(_NC_DIMENSION))]
        self.skip_attributes()
        fixed_end, record_vars = self.pos, []
        for _ in range(self.list_header(_NC_VARIABLE)):
            self.name()
            dim_ids = [self.count() for _ in range(self.count())]
            if any(i >= len(dims) for i in dim_ids):
                raise _BadHeader(f"a variable refers to dimension {max(dim_ids)} of {len(dims)}")
            self.skip_attributes()
            type_size = self.type_size(self.uint(4))
            self.count()  # vsize: clipped for large variables, so computed from the shape
            begin = self.uint(self.offset_bytes)
            lengths = [dims[i][1] for i in dim_ids]
            if lengths and lengths[0] == 0:  # the record dimension
                record_vars.append((begin, math.prod(lengths[1:]) * type_size))
            else:
                fixed_end = max(fixed_end, begin + math.prod(lengths) * type_size)
        if not record_vars or numrecs in (0, _STREAMING[self.count_bytes]):
            return fixed_end
        # One record variable is stored unpadded; several are padded to 4 bytes each.
        sizes = [s for _, s in record_vars]
        record_size = sizes[0] if len(sizes) == 1 else sum(_pad4(s) for s in sizes)
        record_end = max(b + (numrecs - 1) * record_size + s for b, s in record_vars)
        return max(fixed_end, record_end)


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


def _hdf5_declared_size(path: Path) -> int | None:
    """Base address + end-of-file address from the HDF5 superblock, or None if unknown."""
    size = path.stat().st_size
    with path.open("rb") as f:
        at = 0
        while at < min(size, 1 << 20):  # the superblock is at 0, 512, 1024, 2048, ...
            f.seek(at)
            block = f.read(96)
            if block.startswith(_HDF5_SIGNATURE):
                return _superblock_end(block)
            at = 512 if at == 0 else at * 2
    return None


def _superblock_end(block: bytes) -> int | None:
    version = block[8]
    if version in (0, 1):
        offset_size, fields_at = block[13], 24 if version == 0 else 28
    elif version in (2, 3):
        offset_size, fields_at = block[9], 12
    else:
        return None
    if offset_size not in (2, 4, 8) or len(block) < fields_at + 3 * offset_size:
        return None
    fields = [
        int.from_bytes(block[i : i + offset_size], "little")
        for i in range(fields_at, fields_at + 3 * offset_size, offset_size)
    ]
    base, eof = fields[0], fields[2]  # base, (free space | extension), end of file
    if eof == (1 << (8 * offset_size)) - 1:  # "undefined address"
        return None
    return base + eof


def _check_hdf5(path: Path, name: str) -> None:
    size = path.stat().st_size
    declared = _hdf5_declared_size(path)
    if declared is not None and declared > size:
        raise _truncated(name, declared, size)
    try:
        dataset = netCDF4.Dataset(path)
    except OSError as error:
        raise SourceFormatError(
            f"{name}: cannot open as netCDF (truncated or damaged?): "
            f"{_library_error(error, path, name)}"
        ) from None
    with dataset:
        for variable in _variables(dataset):
            if variable.size == 0:
                continue
            try:
                variable.set_auto_maskandscale(False)
                _ = variable[(-1,) * variable.ndim] if variable.ndim else variable.getValue()
            except (OSError, RuntimeError, IndexError) as error:
                raise SourceFormatError(
                    f"{name}: cannot read the end of variable {variable.name!r} "
                    f"(truncated or damaged?): {_library_error(error, path, name)}"
                ) from None


def _variables(group: netCDF4.Dataset) -> Iterator[netCDF4.Variable]:
    yield from group.variables.values()
    for child in group.groups.values():
        yield from _variables(child)


# --- GeoTIFF ------------------------------------------------------------------------------------


def check_geotiff(path: Path, name: str | None = None) -> None:
    """A GeoTIFF whose every strip/tile lies inside the file, the last one decoding."""
    path = Path(path)
    name = name or str(path)
    _refuse_non_data(path, name, "GeoTIFF")
    size = path.stat().st_size
    try:
        with rasterio.open(path) as src:
            if src.driver != "GTiff":
                raise SourceFormatError(
                    f"{name}: cannot open as GeoTIFF: GDAL reads it as {src.driver}"
                )
            last = _last_block(src)
            if last is not None and last[0] > size:
                raise _truncated(name, last[0], size)
            if last is not None:
                _, band, window = last
                try:
                    src.read(band, window=window)
                except rasterio.errors.RasterioError as error:
                    raise SourceFormatError(
                        f"{name}: cannot decode its last block (damaged?): "
                        f"{_library_error(error, path, name)}"
                    ) from None
    except rasterio.errors.RasterioIOError as error:
        raise SourceFormatError(
            f"{name}: cannot open as GeoTIFF (truncated or damaged?): "
            f"{_library_error(error, path, name)}"
        ) from None


def _last_block(src: rasterio.io.DatasetReader) -> tuple[int, int, Window] | None:
    """(end byte, band, window) of the block that ends last in the file; sparse blocks
    (offset 0) hold no bytes. None when GDAL does not expose block offsets."""
    last = None
    for band, (block_rows, block_cols) in zip(src.indexes, src.block_shapes, strict=True):
        for row in range(math.ceil(src.height / block_rows)):
            for col in range(math.ceil(src.width / block_cols)):
                offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                length = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
                if not offset or not length or int(offset) == 0:
                    continue
                end = int(offset) + int(length)
                if last is None or end > last[0]:
                    window = Window(
                        col * block_cols,
                        row * block_rows,
                        min(block_cols, src.width - col * block_cols),
                        min(block_rows, src.height - row * block_rows),
                    )
                    last = (end, band, window)
    return last


# --- polygons -----------------------------------------------------------------------------------


def check_polygons(path: Path, name: str | None = None, *, read_features: bool = True) -> None:
    """A vector file whose features are all readable; for a shapefile, its .shp, .shx and
    .dbf as long as their headers say."""
    path = Path(path)
    name = name or str(path)
    if path.suffix.lower() == ".shp":
        _check_shapefile_parts(path, name)
    else:  # GeoJSON, KML, ... are text
        _refuse_non_data(path, name, "polygons", text_ok=True)
    try:
        declared = pyogrio.read_info(path).get("features")
        if read_features:
            frame = pyogrio.read_dataframe(path)
    except Exception as error:  # pyogrio raises several types for unreadable files
        raise SourceFormatError(
            f"{name}: cannot read polygons: {_library_error(error, path, name)}"
        ) from None
    if read_features and declared is not None and declared >= 0 and len(frame) != declared:
        raise SourceFormatError(
            f"{name}: only {len(frame)} of its {declared} features could be read (truncated?)"
        )


def _check_shapefile_parts(shp: Path, name: str) -> None:
    stem = name[:-4] if name.lower().endswith(".shp") else name
    for suffix in (".shp", ".shx", ".dbf"):
        part = _sidecar(shp, suffix)
        part_name = stem + suffix
        if part is None:
            raise SourceFormatError(f"{part_name}: missing (a shapefile needs .shp, .shx, .dbf)")
        size = part.stat().st_size
        with part.open("rb") as f:
            header = f.read(32)
        if suffix == ".dbf":
            if len(header) < 12:
                raise SourceFormatError(f"{part_name} is truncated: no complete dBASE header")
            records, header_length, record_length = struct.unpack("<IHH", header[4:12])
            declared = header_length + records * record_length
        else:
            if len(header) < 28 or struct.unpack(">i", header[:4])[0] != 9994:
                kind = "an HTML page" if body_kind(header) == "html" else "not a shapefile"
                raise SourceFormatError(f"{part_name}: cannot open as polygons: {kind}")
            declared = 2 * struct.unpack(">i", header[24:28])[0]  # in 16-bit words
        if declared > size:
            raise _truncated(part_name, declared, size)


def _sidecar(shp: Path, suffix: str) -> Path | None:
    for candidate in (shp.with_suffix(suffix), shp.with_suffix(suffix.upper())):
        if candidate.is_file():
            return candidate
    return None
