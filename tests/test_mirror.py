"""The local source mirror: ranges, HEAD, 404s, traversal, and URL mapping."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from polar_cube.sources.download import download_file
from polar_cube.sources.mirror import mirror_url, parse_range, serving_mirror

BODY = bytes(range(256)) * 40  # 10 240 bytes


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "file.bin").write_bytes(BODY)
    (root / "sub" / "a b.txt").write_text("spaced")
    (tmp_path / "secret.txt").write_text("outside the root")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    with serving_mirror(root) as base:
        yield base


def _raw_get(base: str, raw_path: str) -> int:
    """GET a path exactly as written (httpx would normalise away the dot segments)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_full_get(mirror):
    response = httpx.get(f"{mirror}/file.bin")
    assert response.status_code == 200 and response.content == BODY
    assert response.headers["content-length"] == str(len(BODY))
    assert response.headers["accept-ranges"] == "bytes"
    assert httpx.get(f"{mirror}/sub/a%20b.txt").text == "spaced"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=100-", 100, 10239), ("bytes=100-199", 100, 199), ("bytes=-50", 10190, 10239)],
)
def test_ranged_get(mirror, header, start, end):
    response = httpx.get(f"{mirror}/file.bin", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == BODY[start : end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(BODY)}"
    assert response.headers["content-length"] == str(end - start + 1)


def test_unsatisfiable_range(mirror):
    response = httpx.get(f"{mirror}/file.bin", headers={"Range": f"bytes={len(BODY)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(BODY)}"


def test_head(mirror):
    response = httpx.head(f"{mirror}/file.bin")
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == str(len(BODY))
    assert response.headers["accept-ranges"] == "bytes"


def test_missing_file_and_directory_are_404(mirror):
    assert httpx.get(f"{mirror}/nope.bin").status_code == 404
    assert httpx.get(f"{mirror}/sub").status_code == 404


@pytest.mark.parametrize(
    "raw_path",
    [
        "/../etc/passwd",
        "/../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc/passwd",
        "/sub/..%5c..%5csecret.txt",
        "/../secret.txt",
        "/escape",  # a symlink inside the root pointing outside it
    ],
)
def test_traversal_is_refused(mirror, raw_path):
    assert _raw_get(mirror, raw_path) == 404
    assert _raw_get(mirror, "/file.bin") == 200  # the server is still fine


def test_download_file_resumes_against_mirror(mirror, tmp_path):
    dest = tmp_path / "out" / "file.bin"
    dest.parent.mkdir()
    dest.with_name("file.bin.part").write_bytes(BODY[:3000])
    result = download_file(
        mirror_url("https://origin.example/x/file.bin", mirror),
        dest,
        sha256=hashlib.sha256(BODY).hexdigest(),
        backoff_seconds=0.01,
    )
    assert dest.read_bytes() == BODY and result.size == len(BODY)


def test_parse_range_edge_cases():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-100", 10) == (0, 9)
    assert parse_range("bytes=-0", 10) == "unsatisfiable"
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("bytes=0-1,3-4", 10) is None
    assert parse_range("items=0-1", 10) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://data.example.org/a/b/Bed%20Machine.nc?x=1", "http://m:8000/Bed%20Machine.nc"),
        ("https://data.example.org/a/b/file.tif", "http://m:8000/file.tif"),
        ("file:///data/dir/x%2By.zip", "http://m:8000/x%2By.zip"),
        ("/data/dir/Malczyk 2020.tar", "http://m:8000/Malczyk%202020.tar"),
        ("C:\\data\\grid.nc", "http://m:8000/grid.nc"),
    ],
)
def test_mirror_url(url, expected):
    assert mirror_url(url, "http://m:8000/") == expected
    assert mirror_url(url, "http://m:8000") == expected


def test_mirror_url_without_file_name():
    with pytest.raises(ValueError, match="no file name"):
        mirror_url("https://example.org", "http://m:8000")
