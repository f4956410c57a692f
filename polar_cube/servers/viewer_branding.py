"""The web viewer's own face: polar-cube's titles and logo, no other organisation's privacy
dialog, and an offline context map drawn from the cube itself.

`xcube serve` gives the viewer two folders:

- **its configuration** (`Viewer.Configuration.Path`, served at `/viewer/config/`):
  `config.json` (which server; the branding: titles, logo, header colour; the base map),
  `about.en.md` and `images/logo.png` (drawn here);
- **the web app** (the folder in `XCUBE_VIEWER_PATH`, served at `/viewer/`): xcube's built
  viewer, linked file by file, except `index.html` (our title, and the consent recorded so
  the privacy dialog of xcube's own deployment never comes up), `manifest.json` and the
  privacy note and imprint under `docs/` (ours: they would name xcube's operator).

The **context layer** is the viewer's only base map (xcube's default ones are internet tile
services): tiles of the cube's ice thickness in greys, from the same `xcube serve`, so a
variable that covers part of the sector is seen on the ice sheet around it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from polar_cube.servers.viewer_config import (
    CubeSource,
    map_variables,
    tile_url,
    value_range,
    viewer_url,
)

if TYPE_CHECKING:
    import xarray as xr

BRAND = "polar-cube"
HEADER_COLOUR = "#1f4e79"
LOGO = "images/logo.png"
CONTEXT_ID = "cube-context"
CONTEXT_COLOR_BAR = "Greys"
CONTEXT_SHADES = (0.2, 0.55)  # the part of the colour bar the values span
CONTEXT_STANDARD_NAME = "land_ice_thickness"
VIEWER_PATH_ENV = "XCUBE_VIEWER_PATH"  # xcube serve's web app folder (xcube.webapi.viewer)
# our text instead of xcube's deployment's (docs/<name>.<locale>.md)
_OWN_DOCS = ("privacy-note", "imprint")
_PRIVACY_NOTE = """# Privacy

This viewer is served by `polar-cube view` from this computer (xcube's server on 127.0.0.1).

* Its data come from that local server only; no third-party map service is used.
* No user data is collected or shared.
* Settings are kept in the browser's local storage.
"""
_IMPRINT = """# polar-cube

A published polar-cube data cube, served by `polar-cube view` on this computer with the
open-source xcube server and viewer (MIT licence).
"""


def viewer_title(cube_title: str) -> str:
    """The viewer's window and app bar title: `polar-cube: <cube title>`."""
    return f"{BRAND}: {cube_title}"


def context_variable(cube: xr.Dataset) -> str | None:
    """The variable drawn as the base map: the ice thickness (standard_name
    land_ice_thickness), else the first map variable without a time dimension; None if
    there is none."""
    static = [name for name in map_variables(cube) if "time" not in cube[name].dims]
    for name in static:
        if cube[name].attrs.get("standard_name") == CONTEXT_STANDARD_NAME:
            return name
    return static[0] if static else None


def context_range(low: float, high: float) -> tuple[float, float]:
    """(vmin, vmax) that put the values low..high on the light part of the greys
    (`CONTEXT_SHADES` of the colour bar), so the variable on top stays the eye-catcher."""
    first, last = CONTEXT_SHADES
    span = (high - low) / (last - first)
    return low - first * span, low + (1 - first) * span


def context_layer(cube: xr.Dataset, server_url: str, dataset_id: str) -> dict | None:
    """The viewer's base map (an XYZ layer of the branding's `layers`): the context variable's
    tiles in light greys (`context_range`), from the same server."""
    name = context_variable(cube)
    if name is None:
        return None
    vmin, vmax = context_range(*value_range(cube[name].attrs))
    style = {"cmap": CONTEXT_COLOR_BAR, "vmin": f"{vmin:.6g}", "vmax": f"{vmax:.6g}"}
    long_name = cube[name].attrs.get("long_name") or name
    return {
        "id": CONTEXT_ID,
        "title": f"{long_name} (greys, from the cube)",
        "url": tile_url(server_url, dataset_id, name, ("{z}", "{x}", "{y}"), **style),
        "attribution": f"{cube.attrs.get('title') or dataset_id}: {name}",
    }


def viewer_app_config(
    server_url: str, title: str, dataset_id: str, context: dict | None = None
) -> dict:
    """The web viewer's `config.json`: which server, polar-cube's branding and (with `context`)
    the context layer as the only base map, shown by default."""
    branding = {
        "appBarTitle": viewer_title(title),
        "windowTitle": viewer_title(title),
        "windowIcon": f"{server_url}/viewer/config/{LOGO}",
        "logoImage": LOGO,  # relative to the configuration folder
        "logoWidth": 32,
        "organisationUrl": viewer_url(server_url, dataset_id),
        "headerBackgroundColor": HEADER_COLOUR,
        "themeMode": "light",
        "allowSharing": False,  # needs a state store the server does not have
    }
    if context is not None:
        branding["layers"] = {"baseMaps": [context]}
        branding["layerVisibilities"] = {f"baseMaps.{context['id']}": True}
    return {
        "name": BRAND,
        "server": {"id": BRAND, "name": title, "url": server_url},
        "branding": branding,
    }


def about_page(cube: xr.Dataset, source: CubeSource, context: dict | None) -> str:
    """The viewer's About page (markdown)."""
    title = str(cube.attrs.get("title") or source.stem)
    summary = " ".join(str(cube.attrs.get("summary") or "").split())
    lines = [f"# {title}", "", summary, "", f"Served by `polar-cube view` from `{source.cube_url}`"]
    lines += ["(map tiles from its overview levels).", ""]
    if context is not None:
        lines += [f"Base map: {context['title']}, drawn by the same server (no internet).", ""]
    return "\n".join(lines)


def logo_png(size: int = 64) -> bytes:
    """polar-cube's logo: a white polar circle with a grid cell on dark blue, as PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 6, fill=HEADER_COLOUR)
    margin, width = size // 8, max(size // 16, 1)
    draw.ellipse((margin, margin, size - margin, size - margin), outline="white", width=width)
    centre, half = size // 2, size // 6
    draw.rectangle((centre - half, centre - half, centre + half, centre + half), fill="white")
    draw.line((centre, centre - half, centre, centre + half), fill=HEADER_COLOUR, width=width)
    draw.line((centre - half, centre, centre + half, centre), fill=HEADER_COLOUR, width=width)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_viewer_config(viewer_dir: Path, app_config: dict, about: str) -> None:
    """The viewer's configuration folder: config.json, About page, logo."""
    (viewer_dir / "images").mkdir(parents=True, exist_ok=True)
    (viewer_dir / "config.json").write_text(json.dumps(app_config, indent=2))
    (viewer_dir / "about.en.md").write_text(about)
    (viewer_dir / LOGO).write_bytes(logo_png())


def viewer_index(xcube_index: str, app_name: str = BRAND) -> str:
    """xcube's `index.html` with polar-cube's title and, before the app starts, the privacy
    notice recorded as accepted (unless the user revoked it in the settings): the viewer
    keeps it in local storage as `xcube.<app name>.privacyNoticeAccepted`."""
    key = json.dumps(f"xcube.{app_name}.privacyNoticeAccepted")
    script = (
        f"<script>try{{if(localStorage.getItem({key})===null)"
        f"{{localStorage.setItem({key},'true')}}}}catch(e){{}}</script>\n"
    )
    html, count = re.subn(
        r"<title>.*?</title>", f"<title>{escape(app_name)}</title>", xcube_index, count=1
    )
    head = f"<title>{escape(app_name)}</title>\n" if count == 0 else ""
    if "</head>" not in html:
        raise ValueError("xcube's viewer index.html has no </head>")
    return html.replace("</head>", f"{head}{script}</head>", 1)


def xcube_viewer_dist() -> Path:
    """The folder of xcube's built web viewer (the installed xcube package)."""
    from importlib.resources import files

    dist = Path(str(files("xcube.webapi.viewer") / "dist"))
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"{dist}: xcube's viewer is not installed (no index.html)")
    return dist


def write_viewer_app(app_dir: Path, dist: Path | None = None) -> Path:
    """The web app folder for `XCUBE_VIEWER_PATH`: links to xcube's built viewer, with our
    index.html, manifest.json, privacy note and imprint. Rewritten on each start."""
    dist = dist or xcube_viewer_dist()
    app_dir.mkdir(parents=True, exist_ok=True)
    for old in app_dir.iterdir():
        _remove(old)
    for entry in dist.iterdir():
        if entry.name in ("index.html", "manifest.json", "docs"):
            continue
        (app_dir / entry.name).symlink_to(entry)
    (app_dir / "index.html").write_text(viewer_index((dist / "index.html").read_text()))
    (app_dir / "manifest.json").write_text(json.dumps(_manifest(), indent=2))
    docs = app_dir / "docs"
    docs.mkdir()
    for entry in sorted((dist / "docs").iterdir()):
        own = entry.name.split(".")[0]
        if own in _OWN_DOCS:
            (docs / entry.name).write_text(_PRIVACY_NOTE if own == "privacy-note" else _IMPRINT)
        else:
            (docs / entry.name).symlink_to(entry)
    return app_dir


def _manifest() -> dict:
    icon = {"src": f"config/{LOGO}", "type": "image/png", "sizes": "64x64"}
    return {
        "short_name": BRAND,
        "name": BRAND,
        "icons": [icon],
        "start_url": "index.html",
        "display": "standalone",
        "background_color": "#ffffff",
    }


def _remove(path: Path) -> None:
    """A link or file unlinked, a folder removed (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def viewer_environment(env: dict[str, str], app_dir: Path) -> dict[str, str]:
    """`env` with xcube serve pointed at our web app folder."""
    return {**env, VIEWER_PATH_ENV: str(app_dir)}
