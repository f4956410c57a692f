"""Quicklook PNGs of a cube: one map per variable (per time step for time-stepped ones),
drawn from its overview levels (`polar_cube.levels`) when it has them; and small thumbnails
of the same maps, to embed where a link cannot be opened (the Prefect UI)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import colormaps, rc_context
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

from polar_cube.spec import CubeSpec

NAN_COLOUR = "#d9d9d9"  # light grey where there is no data
DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"
CATEGORICAL = "tab10"
ROBUST_PERCENTILES = (1, 99)
ZOOM_BELOW = 0.1  # zoom in when the valid cells' box is under 10 % of the map
PNG_COMPRESS_LEVEL = 4  # zlib: ~40 ms for a 900 × 800 map (the default 6: ~85 ms), 8 % larger
THUMBNAIL_PIXELS = 240  # per side, for the thumbnails embedded in the run's summary


def thinned(data: xr.DataArray, max_pixels: int = 1200) -> xr.DataArray:
    """Every n-th cell along y and x (still lazy) so neither axis exceeds `max_pixels`."""
    step = max(1, math.ceil(max(data.sizes["y"], data.sizes["x"]) / max_pixels))
    return data.isel(y=slice(None, None, step), x=slice(None, None, step))


Layers = xr.DataArray | Sequence[xr.DataArray]


def display_layer(data: Layers, max_pixels: int = 1200, zoom_to_data: bool = True) -> xr.DataArray:
    """The loaded, north-up (y, x) layer to draw.

    `data` is a layer, or the same layer at several resolutions, finest first (overview
    levels): the finest of at most `max_pixels` per side is read (else the coarsest,
    thinned). With `zoom_to_data`, a layer whose valid cells cover a small part of the grid
    (a lake mask) is read again over just that part (plus a margin), from the finest
    resolution that fits `max_pixels` there.
    """
    resolutions = [_two_dimensional(d) for d in _as_list(data)]
    layer = _north_up(thinned(_fitting(resolutions, max_pixels), max_pixels).load())
    window = _data_window(layer) if zoom_to_data else None
    if window is None:
        return layer
    parts = [
        d.isel(y=_inside(d["y"], window[0]), x=_inside(d["x"], window[1])) for d in resolutions
    ]
    return _north_up(thinned(_fitting(parts, max_pixels), max_pixels).load())


def quicklook_png(
    data: Layers,
    *,
    title: str,
    units: str,
    max_pixels: int = 1200,
    zoom_to_data: bool = True,
) -> bytes:
    """A north-up map of a (y, x) layer (or its overview levels, finest first) in
    polar-stereographic km, as PNG bytes."""
    return _map_png(data, title, units, max_pixels, zoom_to_data, thumbnail=False)


def thumbnail_png(
    data: Layers, *, title: str, units: str, max_pixels: int = THUMBNAIL_PIXELS
) -> bytes:
    """A small version of `quicklook_png` (about 300 px wide; map, title and colour bar, no
    axes), small enough to embed in a Prefect artifact."""
    return _map_png(data, title, units, max_pixels, True, thumbnail=True)


def _map_png(
    data: Layers, title: str, units: str, max_pixels: int, zoom_to_data: bool, thumbnail: bool
) -> bytes:
    attrs = _as_list(data)[0].attrs
    layer = display_layer(data, max_pixels, zoom_to_data)
    values = np.asarray(layer.values, dtype="float64")
    x_km, y_km = layer["x"].values / 1000, layer["y"].values / 1000
    with rc_context({"font.size": 7} if thumbnail else {}):
        margins = THUMBNAIL_MARGINS if thumbnail else MAP_MARGINS
        size = _thumbnail_size(values.shape) if thumbnail else _figure_size(values.shape)
        figure = Figure(figsize=size, dpi=100)
        axes, bar_axes = _placed_axes(figure, margins)
        axes.set_facecolor(NAN_COLOUR)
        cmap, norm, ticks, tick_labels = colour_scale(values, attrs)
        image = axes.imshow(
            values,
            origin="lower",
            extent=_extent(x_km, y_km),
            cmap=cmap,
            norm=norm,
            interpolation="nearest",
        )
        axes.set_aspect("equal")
        if thumbnail:
            axes.set_xticks([])
            axes.set_yticks([])
        else:
            axes.set_xlabel("x [km] (EPSG:3031)")
            axes.set_ylabel("y [km] (EPSG:3031)")
        axes.set_title(title)
        extend = _extend(values, norm, ticks)
        colorbar = figure.colorbar(image, cax=bar_axes, extend=extend)
        label = _colorbar_label(attrs, layer.name, units, categorical=ticks is not None)
        colorbar.set_label("" if thumbnail and ticks is not None else label)
        if ticks is not None:
            colorbar.set_ticks(ticks, labels=tick_labels)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return _few_colours(buffer.getvalue()) if thumbnail else buffer.getvalue()


def _few_colours(png: bytes, colours: int = 64) -> bytes:
    """The PNG with a palette of `colours` (a third of the bytes, for embedding)."""
    with Image.open(io.BytesIO(png)) as image:
        small = image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_quicklooks(
    cube: xr.Dataset,
    spec: CubeSpec,
    folder_url: str,
    storage_options: dict | None = None,
    max_pixels: int = 1200,
    overviews: Sequence[xr.Dataset] = (),
) -> list[str]:
    """Write `<variable>.png`, or `<variable>_<YYYY-MM-DD>.png` per time step; return URLs.

    With `overviews` (the cube's levels 1…, finest first) the maps are drawn from them and
    the cube's data is not read; titles and units still come from the cube's attributes.
    """
    folder_url = folder_url.rstrip("/")
    written = []
    for name, title, units, layers in _maps(cube, spec, overviews):
        png = quicklook_png(layers, title=title, units=units, max_pixels=max_pixels)
        _write_bytes(f"{folder_url}/{name}", png, storage_options or {})
        written.append(f"{folder_url}/{name}")
    return written


def quicklook_thumbnails(
    cube: xr.Dataset, spec: CubeSpec, overviews: Sequence[xr.Dataset] = ()
) -> dict[str, bytes]:
    """`thumbnail_png` of every layer `write_quicklooks` draws, by the quicklook's file name
    (`<variable>.png`, `<variable>_<YYYY-MM-DD>.png`); drawn from the coarsest levels that fit."""
    return {
        name: thumbnail_png(layers, title=title, units=units)
        for name, title, units, layers in _maps(cube, spec, overviews)
    }


def _maps(cube: xr.Dataset, spec: CubeSpec, overviews: Sequence[xr.Dataset]):
    """(file name, title, units, the 2-D layer at each resolution) of every map to draw: one
    per static variable, one per time step of the others, in spec order."""
    for variable in spec.variables:
        if variable.name not in cube.data_vars:
            continue
        data = cube[variable.name]
        units = str(data.attrs.get("units", variable.units))
        long_name = str(data.attrs.get("long_name", variable.long_name))
        resolutions = [level[variable.name] for level in overviews] or [data]
        for suffix, title, layers in _layers(data, resolutions, long_name):
            yield f"{variable.name}{suffix}.png", title, units, layers


def _layers(data: xr.DataArray, resolutions: list[xr.DataArray], long_name: str):
    """(file-name suffix, title, the 2-D layer at each resolution) for a static layer or each
    time step."""
    if "time" not in data.dims:
        yield "", long_name, resolutions
        return
    for index in range(data.sizes["time"]):
        day = pd.Timestamp(data["time"].values[index]).strftime("%Y-%m-%d")
        yield f"_{day}", f"{long_name}, {day}", [r.isel(time=index) for r in resolutions]


def _write_bytes(url: str, payload: bytes, storage_options: dict) -> None:
    if "://" not in url:
        fsspec.filesystem("file").makedirs(url.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(url, "wb", **storage_options) as stream:
        stream.write(payload)


def _two_dimensional(data: xr.DataArray) -> xr.DataArray:
    extra = [d for d in data.dims if d not in ("y", "x")]
    if any(data.sizes[d] != 1 for d in extra):
        raise ValueError(f"{data.name}: a quicklook needs one (y, x) layer, got dims {data.dims}")
    return data.squeeze(extra, drop=True).transpose("y", "x")


def _as_list(data: Layers) -> list[xr.DataArray]:
    return [data] if isinstance(data, xr.DataArray) else list(data)


def _fitting(resolutions: list[xr.DataArray], max_pixels: int) -> xr.DataArray:
    """The finest of `resolutions` (finest first) at most `max_pixels` per side, else the
    coarsest."""
    for data in resolutions:
        if max(data.sizes["y"], data.sizes["x"]) <= max_pixels:
            return data
    return resolutions[-1]


def _data_window(layer: xr.DataArray) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(y, x) coordinate ranges around the valid cells of `layer`, if they are few."""
    valid = np.isfinite(layer.values)
    if not valid.any():
        return None
    rows, columns = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if (rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1) > ZOOM_BELOW * valid.size:
        return None
    window = []
    for axis, kept in (("y", rows), ("x", columns)):
        centres = layer[axis].values
        step = abs(centres[1] - centres[0]) if centres.size > 1 else 0.0
        low, high = centres[kept[0]], centres[kept[-1]]
        margin = step + 0.1 * (high - low)
        window.append((low - margin, high + margin))
    return window[0], window[1]


def _inside(axis: xr.DataArray, bounds: tuple[float, float]) -> slice:
    """Index slice of the cells of `axis` within `bounds` (at least one cell)."""
    inside = np.flatnonzero((axis.values >= bounds[0]) & (axis.values <= bounds[1]))
    if not inside.size:
        nearest = int(np.argmin(np.abs(axis.values - (bounds[0] + bounds[1]) / 2)))
        return slice(nearest, nearest + 1)
    return slice(int(inside[0]), int(inside[-1]) + 1)


def _north_up(layer: xr.DataArray) -> xr.DataArray:
    """Ascending x and y, so `origin='lower'` puts north (larger y) at the top."""
    for axis in ("x", "y"):
        if layer.sizes[axis] > 1 and layer[axis].values[0] > layer[axis].values[-1]:
            layer = layer.isel({axis: slice(None, None, -1)})
    return layer


def _extent(x_km: np.ndarray, y_km: np.ndarray) -> tuple[float, float, float, float]:
    """Outer cell edges in km (half a step beyond the first and last centres)."""
    half_x = (x_km[-1] - x_km[0]) / (2 * (len(x_km) - 1)) if len(x_km) > 1 else 0.5
    half_y = (y_km[-1] - y_km[0]) / (2 * (len(y_km) - 1)) if len(y_km) > 1 else 0.5
    return x_km[0] - half_x, x_km[-1] + half_x, y_km[0] - half_y, y_km[-1] + half_y


@dataclass(frozen=True)
class Margins:
    """Room round the map, in inches: a fixed layout, drawn once (matplotlib's constrained
    layout measured every label first and took about a third of a report's time)."""

    left: float  # y label and tick labels
    bottom: float  # x label and tick labels
    top: float  # the title
    gap: float  # between the map and its colour bar
    bar: float  # the colour bar's width
    right: float  # the colour bar's tick labels and label

    @property
    def width(self) -> float:
        return self.left + self.gap + self.bar + self.right

    @property
    def height(self) -> float:
        return self.bottom + self.top


MAP_MARGINS = Margins(left=0.95, bottom=0.65, top=0.4, gap=0.2, bar=0.18, right=1.25)
THUMBNAIL_MARGINS = Margins(left=0.05, bottom=0.05, top=0.28, gap=0.08, bar=0.1, right=0.75)


def _placed_axes(figure: Figure, margins: Margins):
    """The map's axes and its colour bar's (85 % of the map's height, centred), placed by
    `margins` in a figure sized by `_figure_size` or `_thumbnail_size`."""
    width, height = figure.get_size_inches()
    map_width, map_height = width - margins.width, height - margins.height
    axes = figure.add_axes(
        (margins.left / width, margins.bottom / height, map_width / width, map_height / height)
    )
    bar_left = margins.left + map_width + margins.gap
    bar_bottom = margins.bottom + 0.075 * map_height
    bar_axes = figure.add_axes(
        (bar_left / width, bar_bottom / height, margins.bar / width, 0.85 * map_height / height)
    )
    return axes, bar_axes


def _figure_size(shape: tuple[int, int]) -> tuple[float, float]:
    """About 7 inches for the longer map side, plus room for labels and the colour bar."""
    rows, columns = shape
    scale = 7 / max(rows, columns)
    return (
        max(columns * scale, 3.5) + MAP_MARGINS.width,
        max(rows * scale, 3.5) + MAP_MARGINS.height,
    )


def _thumbnail_size(shape: tuple[int, int]) -> tuple[float, float]:
    """About 2.2 inches for the longer map side, plus room for the title and colour bar."""
    rows, columns = shape
    scale = 2.2 / max(rows, columns)
    return (
        max(columns * scale, 1.2) + THUMBNAIL_MARGINS.width,
        max(rows * scale, 1.2) + THUMBNAIL_MARGINS.height,
    )


def colour_scale(values: np.ndarray, attrs: dict):
    """(colormap, norm, colour-bar ticks or None, tick labels or None) for the data's kind.

    Flags (`flag_values`): one colour per class; both signs: diverging, centred on 0;
    otherwise sequential; limits at the 1st/99th percentile.
    """
    if "flag_values" in attrs:
        return _categorical_scale(attrs)
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, ROBUST_PERCENTILES) if finite.size else (0.0, 1.0)
    if finite.size and finite.min() < 0 < finite.max():
        limit = max(abs(low), abs(high)) or 1.0
        cmap = _named_cmap(attrs, DIVERGING)
        return cmap, Normalize(-limit, limit), None, None
    if low == high:
        low, high = low - 0.5, high + 0.5
    return _named_cmap(attrs, SEQUENTIAL), Normalize(low, high), None, None


def _categorical_scale(attrs: dict):
    flags = [float(v) for v in np.atleast_1d(attrs["flag_values"])]
    meanings = str(attrs.get("flag_meanings", "")).split()
    labels = meanings if len(meanings) == len(flags) else [f"{f:g}" for f in flags]
    base = _named_cmap(attrs, CATEGORICAL)
    if isinstance(base, ListedColormap) and base.N >= len(flags):
        colours = base.colors[: len(flags)]
    else:
        colours = base(np.linspace(0.15, 0.9, len(flags)))
    cmap = ListedColormap(colours).with_extremes(bad=(0, 0, 0, 0))
    edges = _class_edges(flags)
    return cmap, BoundaryNorm(edges, len(flags)), flags, labels


def _class_edges(flags: list[float]) -> list[float]:
    """Boundaries half-way between sorted flag values (and half a step outside them)."""
    ordered = sorted(flags)
    if len(ordered) == 1:
        return [ordered[0] - 0.5, ordered[0] + 0.5]
    middles = [(a + b) / 2 for a, b in zip(ordered, ordered[1:], strict=False)]
    first = ordered[0] - (ordered[1] - ordered[0]) / 2
    last = ordered[-1] + (ordered[-1] - ordered[-2]) / 2
    return [first, *middles, last]


def _named_cmap(attrs: dict, default: str) -> Colormap:
    """The variable's `color_bar_name` if matplotlib knows it, else `default`; NaN clear."""
    name = attrs.get("color_bar_name")
    cmap = colormaps[name] if isinstance(name, str) and name in colormaps else colormaps[default]
    return cmap.with_extremes(bad=(0, 0, 0, 0))


def _extend(values: np.ndarray, norm: Normalize, ticks) -> str:
    """Colour-bar arrows where robust limits clip the data."""
    finite = values[np.isfinite(values)]
    if ticks is not None or not finite.size:
        return "neither"
    below, above = finite.min() < norm.vmin, finite.max() > norm.vmax
    return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (below, above), "both"
    )


def _colorbar_label(attrs: dict, name: object, units: str, categorical: bool) -> str:
    name = str(attrs.get("long_name") or name or "")
    if categorical or units in ("", "1"):
        return name
    return f"{name} [{units}]"
