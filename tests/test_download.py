"""download_file against a real local HTTP server that misbehaves on demand."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from polar_cube.sources.download import DownloadError, download_file
from polar_cube.sources.fetch import fetch_source, needed_files
from polar_cube.sources.mirror import parse_range, serving_mirror
from polar_cube.sources.readers import SourceFormatError
from polar_cube.sources.transport import ATTEMPTS_ENV, TIMEOUT_ENV, retry_policy
from polar_cube.spec import load_spec

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"attempts": 4, "backoff_seconds": 0.01, "timeout_seconds": 5.0}
LOGIN_PAGE = (
    b"\n  <!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>"
)
TEXT_BODY = b"Quota exceeded for this IP address. Please come back tomorrow or contact us."


class FlakyServer(ThreadingHTTPServer):
    """Serves `payload` (PAYLOAD) at any path; `mode` decides how it misbehaves. Records every
    request."""

    daemon_threads = True

    def __init__(
        self,
        mode: str = "ok",
        credentials: tuple[str, str] | None = None,
        payload: bytes = PAYLOAD,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.mode = mode
        self.payload = payload
        self.credentials = credentials
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/data/file.bin"


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(dict(self.headers))
            count = len(self.server.requests)
        mode = self.server.mode
        if mode == "404":
            self.send_error(404)
        elif mode == "500-once" and count == 1:
            self.send_error(500)
        elif mode == "503":
            self.send_error(503)
        elif mode == "503-twice-retry-after" and count <= 2:
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "reset-once" and count == 1:
            self._send(PAYLOAD, 200, total=len(PAYLOAD), body_limit=120_000)
            self.wfile.flush()
            # SO_LINGER 0: close with a TCP reset, not an orderly end
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            self.connection.close()
        elif mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            for byte in PAYLOAD[:60]:  # a byte every 0.1 s: never silent long enough to time out
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
        elif mode == "auth" and not self._authorised():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode in ("drop-once", "drop-then-ignore-range") and count == 1:
            self._send(PAYLOAD, 200, total=len(PAYLOAD), body_limit=100_000)
        elif mode == "drop-then-ignore-range":
            self._send(PAYLOAD, 200, total=len(PAYLOAD))
        elif mode in ("html", "html-as-binary", "text"):
            body = TEXT_BODY if mode == "text" else LOGIN_PAGE
            kind = "text/html; charset=utf-8" if mode == "html" else "application/octet-stream"
            self._send(body, 200, total=len(body), content_type=kind)
        else:
            self._send_with_range()

    def _authorised(self) -> bool:
        user, password = self.server.credentials or ("", "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return self.headers.get("Authorization") == f"Basic {token}"

    def _send_with_range(self) -> None:
        payload = self.server.payload
        byte_range = parse_range(self.headers.get("Range"), len(payload))
        if byte_range == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif byte_range:
            start, end = byte_range
            self._send(payload[start : end + 1], 206, total=len(payload), start=start)
        else:
            self._send(payload, 200, total=len(payload))

    def _send(
        self,
        body: bytes,
        status: int,
        total: int,
        start: int = 0,
        body_limit: int | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}")
        self.end_headers()
        self.wfile.write(body[:body_limit])  # with a limit: the connection then just closes


@pytest.fixture
def serve() -> Iterator:
    servers: list[FlakyServer] = []

    def start(
        mode: str = "ok", credentials: tuple[str, str] | None = None, payload: bytes = PAYLOAD
    ) -> FlakyServer:
        server = FlakyServer(mode, credentials, payload)
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_plain_download_writes_file_and_meta(serve, tmp_path):
    server = serve()
    dest = tmp_path / "sub" / "file.bin"
    result = download_file(server.url, dest, sha256=PAYLOAD_SHA, expected_size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert (result.size, result.sha256, result.reused) == (len(PAYLOAD), PAYLOAD_SHA, False)
    meta = json.loads(dest.with_name("file.bin.meta.json").read_text())
    assert meta["url"] == server.url and meta["size"] == len(PAYLOAD)
    assert meta["sha256"] == PAYLOAD_SHA and meta["completed_at"]
    assert _leftovers(dest) == ["file.bin", "file.bin.meta.json"]


def test_dropped_connection_is_resumed(serve, tmp_path):
    server = serve("drop-once")
    dest = tmp_path / "file.bin"
    result = download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST)
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    offset = int(server.requests[1]["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset < len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD
    assert result.sha256 == hashlib.sha256(dest.read_bytes()).hexdigest() == PAYLOAD_SHA


def test_resume_ignored_by_server_starts_over(serve, tmp_path):
    server = serve("drop-then-ignore-range")
    dest = tmp_path / "file.bin"
    result = download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST)
    assert "Range" in server.requests[1]
    assert dest.read_bytes() == PAYLOAD and result.size == len(PAYLOAD)


def test_existing_part_is_resumed(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD[:1234])
    download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST)
    assert server.requests[0]["Range"] == "bytes=1234-"
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_accepted_on_416(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)
    result = download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST)
    assert len(server.requests) == 1 and result.size == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD


def test_server_error_is_retried(serve, tmp_path):
    server = serve("500-once")
    dest = tmp_path / "file.bin"
    download_file(server.url, dest, **FAST)
    assert len(server.requests) == 2
    assert dest.read_bytes() == PAYLOAD


def test_persistent_server_error_gives_up(serve, tmp_path):
    server = serve("503")
    with pytest.raises(DownloadError, match=r"gave up after 4 attempts.*HTTP 503"):
        download_file(server.url, tmp_path / "file.bin", label="bed", **FAST)
    assert len(server.requests) == 4


def test_a_503_with_retry_after_is_waited_for_then_the_file_is_fetched(serve, tmp_path):
    server = serve("503-twice-retry-after")
    started = time.monotonic()
    result = download_file(server.url, tmp_path / "file.bin", sha256=PAYLOAD_SHA, **FAST)
    assert len(server.requests) == 3 and result.size == len(PAYLOAD)
    assert time.monotonic() - started >= 2  # 1 s each time, as asked (the backoff is 0.01 s)


def test_a_connection_reset_mid_body_is_resumed_with_range(serve, tmp_path):
    server = serve("reset-once")
    download_file(server.url, tmp_path / "file.bin", sha256=PAYLOAD_SHA, **FAST)
    assert len(server.requests) == 2
    assert server.requests[1]["Range"].startswith("bytes=") and "Range" not in server.requests[0]
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD


def test_a_trickling_server_is_given_up_at_the_deadline_naming_url_and_time(serve, tmp_path):
    server = serve("trickle")
    started = time.monotonic()
    with pytest.raises(DownloadError) as failed:
        download_file(server.url, tmp_path / "file.bin", label="bed", deadline_seconds=2, **FAST)
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert message.startswith(f"bed: {server.url}: gave up after 2 s, the deadline of 2 s ")
    assert "POLAR_CUBE_DOWNLOAD_DEADLINE_SECONDS" in message and "(a trickle)" in message
    assert failed.value.retryable
    assert list(tmp_path.iterdir()) == []  # no .part left


def test_not_found_is_not_retried(serve, tmp_path):
    server = serve("404")
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"stale")
    with pytest.raises(DownloadError) as info:
        download_file(server.url, dest, label="magnetic_anomaly", **FAST)
    message = str(info.value)
    assert "404" in message and server.url in message and "magnetic_anomaly" in message
    assert len(server.requests) == 1
    assert _leftovers(dest) == []


def test_sha256_mismatch_leaves_nothing(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"sha256 mismatch: expected 0+, got " + PAYLOAD_SHA):
        download_file(server.url, dest, sha256="0" * 64, **FAST)
    assert _leftovers(dest) == []


def test_expected_size_mismatch(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="size mismatch"):
        download_file(server.url, dest, expected_size=5, **FAST)
    assert _leftovers(dest) == []


def test_complete_cache_is_reused_without_request(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    download_file(server.url, dest, **FAST)
    again = download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST)
    assert again.reused and again.sha256 == PAYLOAD_SHA and again.size == len(PAYLOAD)
    assert len(server.requests) == 1


def test_dest_without_meta_is_downloaded_again(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"not the real thing")
    result = download_file(server.url, dest, **FAST)
    assert not result.reused and len(server.requests) == 1
    assert dest.read_bytes() == PAYLOAD


def test_cache_with_other_checksum_is_downloaded_again(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    download_file(server.url, dest, **FAST)
    meta = dest.with_name("file.bin.meta.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "ab" * 32}))
    assert not download_file(server.url, dest, sha256=PAYLOAD_SHA, **FAST).reused
    assert len(server.requests) == 2


def test_file_url_and_plain_path(tmp_path):
    source = tmp_path / "src dir" / "source.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    by_url = download_file(source.as_uri(), tmp_path / "out" / "a.bin", sha256=PAYLOAD_SHA)
    by_path = download_file(str(source), tmp_path / "out" / "b.bin", sha256=PAYLOAD_SHA)
    for result in (by_url, by_path):
        assert result.path.read_bytes() == PAYLOAD and not result.reused
        assert result.path.with_name(result.path.name + ".meta.json").exists()
    assert download_file(str(source), by_path.path).reused


def test_missing_local_file(tmp_path):
    with pytest.raises(DownloadError, match="no such file"):
        download_file(str(tmp_path / "nope.bin"), tmp_path / "out.bin", label="x")
    assert not (tmp_path / "out.bin.part").exists()


def test_basic_auth_and_no_credentials_in_logs(serve, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Pa55"
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    server = serve("auth", credentials=("alice", password))
    logger = logging.getLogger("test.download")

    with pytest.raises(DownloadError, match="401"):
        download_file(server.url, tmp_path / "denied.bin", logger=logger, **FAST)
    result = download_file(
        server.url, tmp_path / "a.bin", auth=("alice", password), logger=logger, **FAST
    )
    assert result.path.read_bytes() == PAYLOAD
    userinfo_url = server.url.replace("http://", f"http://alice:{password}@")
    result = download_file(userinfo_url, tmp_path / "b.bin", logger=logger, **FAST)
    assert result.url == server.url and result.path.read_bytes() == PAYLOAD

    assert any("a.bin" in r.getMessage() for r in caplog.records)  # progress was logged
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert password not in text and token not in text
    assert password not in (tmp_path / "b.bin.meta.json").read_text()


def test_logger_reports_start_progress_and_end(serve, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="test.download")
    server = serve()
    download_file(
        server.url, tmp_path / "f.bin", label="bed", logger=logging.getLogger("test.download")
    )
    messages = [r.getMessage() for r in caplog.records if r.name == "test.download"]
    assert any("resume from 0 bytes" in m for m in messages)
    assert any("MB/s" in m and "finished" in m for m in messages)


@pytest.fixture(autouse=True)
def _default_retry_policy(monkeypatch):
    """The tests choose their own attempts and timeouts, whatever the environment says."""
    monkeypatch.delenv(ATTEMPTS_ENV, raising=False)
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)


# --- wrong content -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["html", "html-as-binary"])
def test_html_page_with_status_200_is_refused(serve, tmp_path, mode):
    """Refused by its Content-Type, or by its first bytes when the server calls it binary."""
    server = serve(mode)
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(server.url, dest, label="bed", **FAST)
    assert str(info.value) == (
        f"bed: {server.url} returned an HTML page (a login or error page?) instead of data"
    )
    assert len(server.requests) == 1  # not retried
    assert _leftovers(dest) == []


def test_text_is_refused_only_where_binary_data_is_expected(serve, tmp_path):
    server = serve("text")
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(server.url, dest, label="bed", **FAST)
    expected = TEXT_BODY[:60].decode()
    assert str(info.value) == f"bed: {server.url} returned text instead of data: {expected!r}"
    assert _leftovers(dest) == []
    result = download_file(server.url, tmp_path / "lakes.geojson", binary=False, **FAST)
    assert result.path.read_bytes() == TEXT_BODY


def test_failed_validation_leaves_nothing(serve, tmp_path):
    server = serve()
    dest = tmp_path / "cache" / "file.bin"
    seen = []

    def refuse(path: Path, name: str) -> None:
        seen.append((path.name, name, path.stat().st_size))
        raise SourceFormatError(f"{name} is not what the spec says")

    with pytest.raises(DownloadError) as info:
        download_file(server.url, dest, label="bed", validate=refuse, **FAST)
    assert str(info.value) == f"bed: {server.url}: file.bin is not what the spec says"
    assert seen == [("file.bin.part", "file.bin", len(PAYLOAD))]  # checked before moving
    assert _leftovers(dest) == []


def test_cache_from_another_url_is_not_reused(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    download_file(server.url, dest, **FAST)
    other_url = server.url.replace("/data/", "/other/")
    result = download_file(other_url, dest, **FAST)
    assert not result.reused and len(server.requests) == 2
    assert json.loads(dest.with_name("file.bin.meta.json").read_text())["url"] == other_url
    assert download_file(other_url, dest, **FAST).reused


def test_cache_that_no_longer_validates_is_fetched_again(serve, tmp_path):
    server = serve()
    dest = tmp_path / "file.bin"
    download_file(server.url, dest, **FAST)
    with dest.open("r+b") as f:  # damaged in place: same size, same record
        f.write(b"XXXX")
    checked = []

    def check(path: Path, name: str) -> None:
        checked.append(path.name)
        if path.read_bytes()[:4] == b"XXXX":
            raise SourceFormatError(f"{name} is damaged")

    result = download_file(server.url, dest, validate=check, **FAST)
    assert not result.reused and dest.read_bytes() == PAYLOAD
    assert checked == ["file.bin", "file.bin.part"] and len(server.requests) == 2


# --- giving up ---------------------------------------------------------------------------------


def closed_port_url(name: str = "x.nc") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_default_policy_is_bounded():
    policy = retry_policy()
    assert (policy.attempts, policy.timeout_seconds, policy.connect_seconds) == (3, 30.0, 10.0)
    assert policy.pauses_seconds == 3.0 and policy.give_up_seconds() == 93.0


def test_refused_connection_gives_up_within_30_s(tmp_path, caplog):
    """With the default policy (no Prefect retries around it any more)."""
    url = closed_port_url()
    dest = tmp_path / "cache" / "x.nc"
    logger = logging.getLogger("test.download")
    caplog.set_level(logging.WARNING, logger="test.download")
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, label="bed", logger=logger)
    assert time.monotonic() - started < 30  # the bound (it takes ~3 s)
    assert str(info.value).startswith(f"bed: {url}: gave up after 3 attempts: cannot connect: ")
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2
    assert _leftovers(dest) == []


def test_attempts_and_timeout_come_from_the_environment(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ATTEMPTS_ENV, "1")
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert (retry_policy().attempts, retry_policy().connect_seconds) == (1, 2.5)
    caplog.set_level(logging.WARNING, logger="test.download")
    url = closed_port_url()
    with pytest.raises(DownloadError, match="gave up after 1 attempt: cannot connect"):
        download_file(url, tmp_path / "x.nc", logger=logging.getLogger("test.download"))
    assert not any("retrying in" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(ATTEMPTS_ENV, "many")
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "x.nc")
    assert str(info.value) == (
        f"environment variable {ATTEMPTS_ENV}='many': must be a whole number >= 1"
    )


class StallServer(ThreadingHTTPServer):
    """Sends the first half of what is asked for, then nothing until released."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StallHandler)
        self.release = threading.Event()
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/data/file.bin"


class _StallHandler(BaseHTTPRequestHandler):
    server: StallServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.ranges.append(self.headers.get("Range"))
        byte_range = parse_range(self.headers.get("Range"), len(PAYLOAD))
        start = byte_range[0] if isinstance(byte_range, tuple) else 0
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.server.release.wait(60)


@pytest.fixture
def stall_server() -> Iterator[StallServer]:
    server = StallServer()
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def test_server_stalling_mid_body_gives_up(stall_server, tmp_path, monkeypatch):
    monkeypatch.setenv(ATTEMPTS_ENV, "2")
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(stall_server.url, dest, label="bed", backoff_seconds=0.01)
    assert str(info.value) == (
        f"bed: {stall_server.url}: gave up after 2 attempts: the server sent no data for 0.5 s"
    )
    assert stall_server.ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]  # resumed once
    assert _leftovers(dest) == []


# --- fetch_source: real source files through a local mirror ------------------------------------

MAG = "ASE_MagneticCompilation_Dziadeketal_250m.tif"
THW = "Malczyk_etal_2020_data_v2.tar"
WAIS = "WAIS_Max_Extent.zip"
SHP = "WAIS_Max_Extent/WAIS_Jan_2017_Polygons.shp"


@pytest.fixture(scope="module")
def spec(repo_spec_path):
    return load_spec(repo_spec_path)


def cache_leftovers(cache: Path) -> list[str]:
    """Everything in the cache but the (empty) per-source folders."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if not (p.is_dir() and p.parent == cache and not any(p.iterdir()))
    )


def fetch(spec, source_id: str, cache: Path, mirror: str, **kwargs):
    source = spec.source(source_id)
    return fetch_source(source, cache, mirror=mirror, files=needed_files(spec, source_id), **kwargs)


@pytest.mark.parametrize(
    ("source_id", "file_name", "why"),
    [
        ("geothermal_heat_flow_200km", "200km_GHF_windowCenters.nc", "is truncated: its header"),
        ("ice_thickness_cryosmos", "SMOS_IceThickness_2015_300.nc", "is truncated: its header"),
        ("magnetic_anomaly", MAG, "is truncated: its header declares"),
        ("subglacial_lakes_thwaites", THW, "as a tar archive (truncated"),
        ("supraglacial_lakes_wais", WAIS, "cannot read as a zip archive (truncated"),
    ],
)
def test_truncated_source_is_refused_and_not_cached(
    spec, small_standins, tmp_path, source_id, file_name, why
):
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    shutil.copyfile(small_standins / file_name, served / file_name)
    os.truncate(served / file_name, (served / file_name).stat().st_size // 2)
    with serving_mirror(served) as mirror, pytest.raises(DownloadError) as info:
        fetch(spec, source_id, cache, mirror)
    message = str(info.value)
    assert message.startswith(f"{source_id}: {mirror}/{file_name}: {file_name}")
    assert why in message
    assert cache_leftovers(cache) == []


def test_html_page_served_as_a_source_file(spec, tmp_path):
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    (served / "200km_GHF_windowCenters.nc").write_bytes(LOGIN_PAGE)
    with serving_mirror(served) as mirror, pytest.raises(DownloadError) as info:
        fetch(spec, "geothermal_heat_flow_200km", cache, mirror)
    assert str(info.value) == (
        f"geothermal_heat_flow_200km: {mirror}/200km_GHF_windowCenters.nc returned an HTML "
        "page (a login or error page?) instead of data"
    )
    assert cache_leftovers(cache) == []


def test_missing_source_file_is_a_404(spec, tmp_path):
    (tmp_path / "served").mkdir()
    cache = tmp_path / "cache"
    with serving_mirror(tmp_path / "served") as mirror, pytest.raises(DownloadError) as info:
        fetch(spec, "magnetic_anomaly", cache, mirror)
    assert str(info.value) == (
        f"magnetic_anomaly: {mirror}/{MAG}: HTTP 404 Not Found (not retried)"
    )
    assert cache_leftovers(cache) == []


def test_refused_connection_when_fetching(spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ATTEMPTS_ENV, "2")
    caplog.set_level(logging.WARNING, logger="test.fetch")
    mirror = closed_port_url("").rstrip("/")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        fetch(spec, "curie_depth_200km", cache, mirror, logger=logging.getLogger("test.fetch"))
    url = f"{mirror}/200km_Dziadek_etal_CurieDepth_Results.nc"
    assert str(info.value).startswith(
        f"curie_depth_200km: {url}: gave up after 2 attempts: cannot connect: "
    )
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 1
    assert cache_leftovers(cache) == []


def _archive_with_a_cut_member(small_standins: Path, served: Path, name: str, member: str):
    """The stand-in archive `name`, rebuilt in `served` with `member` cut in half."""
    unpacked = served / "unpacked"
    if name.endswith(".tar"):
        with tarfile.open(small_standins / name) as tar:
            tar.extractall(unpacked, filter="data")
    else:
        with zipfile.ZipFile(small_standins / name) as archive:
            archive.extractall(unpacked)
    os.truncate(unpacked / member, (unpacked / member).stat().st_size // 2)
    files = sorted(p for p in unpacked.rglob("*") if p.is_file())
    if name.endswith(".tar"):
        with tarfile.open(served / name, "w") as tar:
            for path in files:
                tar.add(path, path.relative_to(unpacked).as_posix())
    else:
        with zipfile.ZipFile(served / name, "w") as archive:
            for path in files:
                archive.write(path, path.relative_to(unpacked).as_posix())
    shutil.rmtree(unpacked)


@pytest.mark.parametrize(
    ("source_id", "name", "member"),
    [
        ("subglacial_lakes_thwaites", THW, "Thw142_2017_mask.tif"),
        ("supraglacial_lakes_wais", WAIS, SHP),
    ],
)
def test_archive_with_a_truncated_member(spec, small_standins, tmp_path, source_id, name, member):
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    _archive_with_a_cut_member(small_standins, served, name, member)
    with serving_mirror(served) as mirror, pytest.raises(SourceFormatError) as info:
        fetch(spec, source_id, cache, mirror)
    assert str(info.value).startswith(
        f"{source_id}: {mirror}/{name}: member {member} is truncated: its header declares "
    )
    assert cache_leftovers(cache) == []  # no archive, no record, no extraction


def test_archive_without_a_needed_member_is_kept(spec, small_standins, tmp_path):
    """A complete archive lacking a file the spec names: the spec is wrong, not the download."""
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    shutil.copyfile(small_standins / THW, served / THW)
    source = spec.source("subglacial_lakes_thwaites")
    with serving_mirror(served) as mirror, pytest.raises(SourceFormatError) as info:
        fetch_source(source, cache, mirror=mirror, files=["Thw999_2013_mask.tif"])
    assert str(info.value).startswith(
        f"subglacial_lakes_thwaites: {mirror}/{THW}: the archive has no member "
        "'Thw999_2013_mask.tif' (it has: Thw124_2013_mask.tif, "
    )
    assert (cache / source.id / THW).is_file()


def test_file_cached_as_complete_by_an_earlier_version_is_fetched_again(
    spec, small_standins, tmp_path, caplog
):
    """Issue 7: a truncated download recorded as complete is no longer reused."""
    name = "200km_GHF_windowCenters.nc"
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    shutil.copyfile(small_standins / name, served / name)
    cached = cache / "geothermal_heat_flow_200km" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes((served / name).read_bytes()[:20_000])
    caplog.set_level(logging.INFO, logger="test.fetch")
    logger = logging.getLogger("test.fetch")
    with serving_mirror(served) as mirror:
        url = f"{mirror}/{name}"
        identity = spec.source("geothermal_heat_flow_200km").download_url
        record = {"identity": identity, "url": url, "size": 20_000}
        record["sha256"] = hashlib.sha256(cached.read_bytes())
        record["sha256"] = record["sha256"].hexdigest()
        cached.with_name(name + ".meta.json").write_text(json.dumps(record))
        fetched = fetch(spec, "geothermal_heat_flow_200km", cache, mirror, logger=logger)
        assert (fetched.folder / name).read_bytes() == (served / name).read_bytes()
        again = fetch(spec, "geothermal_heat_flow_200km", cache, mirror, logger=logger)
    messages = [r.getMessage() for r in caplog.records]
    assert any("is truncated" in m and "fetching again" in m for m in messages)
    assert sum(m.startswith("reusing") for m in messages) == 1
    assert again.sha256 == hashlib.sha256((served / name).read_bytes()).hexdigest()


def test_a_mirror_on_another_address_reuses_every_cached_file(spec, small_standins, tmp_path):
    """Issue 18: the cache is keyed by what a source is, not by the mirror's host:port."""
    cache = tmp_path / "cache"
    ids = ["geothermal_heat_flow_200km", "subglacial_lakes_thwaites", "magnetic_anomaly"]
    with serving_mirror(small_standins) as first:
        fetched = {i: fetch(spec, i, cache, first) for i in ids}
    assert all(f.downloaded for f in fetched.values())
    with serving_mirror(small_standins) as second:
        assert second != first
        again = {i: fetch(spec, i, cache, second) for i in ids}
    assert not any(f.downloaded for f in again.values())
    assert {i: f.sha256 for i, f in again.items()} == {i: f.sha256 for i, f in fetched.items()}
    # the spec's own URL is the key: the same file name at another source URL is fetched
    magnetic = spec.source("magnetic_anomaly")
    moved = magnetic.model_copy(
        update={"download_url": f"https://example.org/elsewhere/{magnetic.file_name}"}
    )
    with serving_mirror(small_standins) as third:
        assert fetch_source(moved, cache, mirror=third).downloaded


def test_damaged_extraction_of_a_cached_archive_is_fetched_again(
    spec, small_standins, tmp_path, caplog
):
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    shutil.copyfile(small_standins / WAIS, served / WAIS)
    caplog.set_level(logging.WARNING, logger="test.fetch")
    with serving_mirror(served) as mirror:
        fetched = fetch(spec, "supraglacial_lakes_wais", cache, mirror)
        shp = fetched.folder / SHP
        size = shp.stat().st_size
        os.truncate(shp, size // 2)
        fetched = fetch(
            spec, "supraglacial_lakes_wais", cache, mirror, logger=logging.getLogger("test.fetch")
        )
    assert (fetched.folder / SHP).stat().st_size == size
    assert any(f"member {SHP} is truncated" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_prefect_task_takes_credentials_from_a_secret_block(serve, small_standins, tmp_path):
    """The download task reads `user:password` from a Secret block; it never reaches the
    logs stored by the Prefect API (what the UI shows)."""
    import asyncio

    from prefect import flow, get_client
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from polar_cube.spec import SourceSpec
    from polar_cube.tasks.download import download_source

    password = "pa55-Secret-9"
    geotiff = (small_standins / MAG).read_bytes()
    server = serve("auth", credentials=("alice", password), payload=geotiff)
    Secret(value=f"alice:{password}").save("test-source-credentials", overwrite=True)
    source = SourceSpec(
        id="private_source",
        name="a source behind basic auth",
        download_url=server.url,
        source_format="geotiff",
        source_crs="EPSG:3031",
        credentials_block="test-source-credentials",
    )

    @flow
    def fetch_private():
        return download_source(source, tmp_path, None)

    state = fetch_private(return_state=True)
    fetched = state.result()
    assert (fetched.folder / "file.bin").read_bytes() == geotiff

    async def stored_logs():
        async with get_client() as client:
            flow_run_id = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
            return [
                log.message for log in await client.read_logs(LogFilter(flow_run_id=flow_run_id))
            ]

    APILogWorker.drain_all(timeout=30)
    logs = "\n".join(asyncio.run(stored_logs()))
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    assert "private_source: http://127.0.0.1" in logs  # the task's lines are there...
    assert password not in logs and token not in logs  # ...and hold no secret


# --- upstream changes at the same URL (issue 21, item 1) ---------------------------------------


@pytest.fixture
def mirror_server(tmp_path) -> Iterator:
    from polar_cube.sources.mirror import make_mirror_server

    root = tmp_path / "served"
    root.mkdir()
    server = make_mirror_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_unchanged_upstream_costs_one_304(mirror_server, tmp_path):
    (mirror_server.root / "layer.bin").write_bytes(PAYLOAD)
    url, dest = f"{mirror_server.base_url}/layer.bin", tmp_path / "cache" / "layer.bin"
    first = download_file(url, dest, revalidate=True, **FAST)
    meta = json.loads(dest.with_name("layer.bin.meta.json").read_text())
    assert meta["validators"]["etag"].startswith('"') and meta["validators"]["last_modified"]
    again = download_file(url, dest, revalidate=True, **FAST)
    assert (first.reused, again.reused) == (False, True)
    assert again.sha256 == first.sha256 == PAYLOAD_SHA and again.replaced_sha256 is None
    assert mirror_server.answered == [("GET", "/layer.bin", 200), ("GET", "/layer.bin", 304)]


def test_new_bytes_at_the_same_url_are_downloaded_naming_the_old_checksum(mirror_server, tmp_path):
    served = mirror_server.root / "layer.bin"
    served.write_bytes(PAYLOAD)
    url, dest = f"{mirror_server.base_url}/layer.bin", tmp_path / "cache" / "layer.bin"
    download_file(url, dest, revalidate=True, **FAST)
    changed = PAYLOAD[::-1]
    served.write_bytes(changed)
    os.utime(served, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    result = download_file(url, dest, revalidate=True, **FAST)
    assert not result.reused and result.replaced_sha256 == PAYLOAD_SHA
    assert result.sha256 == hashlib.sha256(changed).hexdigest() and dest.read_bytes() == changed
    statuses = [status for _, _, status in mirror_server.answered]
    assert statuses == [200, 200, 200]  # the download, the conditional GET, the new download
    assert download_file(url, dest, revalidate=True, **FAST).reused  # and then a 304
    assert mirror_server.answered[-1][2] == 304


def test_an_unreachable_server_leaves_the_cached_copy_in_use(mirror_server, tmp_path):
    (mirror_server.root / "layer.bin").write_bytes(PAYLOAD)
    url, dest = f"{mirror_server.base_url}/layer.bin", tmp_path / "cache" / "layer.bin"
    download_file(url, dest, revalidate=True, **FAST)
    mirror_server.shutdown()
    mirror_server.server_close()
    again = download_file(url, dest, revalidate=True, **FAST)  # offline: one refused request
    assert again.reused and again.sha256 == PAYLOAD_SHA
