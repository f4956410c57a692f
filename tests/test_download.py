"""download_file against a real local HTTP server that misbehaves on demand."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from polar_cube.download import DownloadError, download_file
from polar_cube.mirror import parse_range

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 3, "backoff_seconds": 0.01, "timeout_seconds": 5.0}


class FlakyServer(ThreadingHTTPServer):
    """Serves PAYLOAD at any path; `mode` decides how it misbehaves. Records every request."""

    daemon_threads = True

    def __init__(self, mode: str = "ok", credentials: tuple[str, str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.mode = mode
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
        elif mode == "auth" and not self._authorised():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode in ("drop-once", "drop-then-ignore-range") and count == 1:
            self._send(PAYLOAD, 200, total=len(PAYLOAD), body_limit=100_000)
        elif mode == "drop-then-ignore-range":
            self._send(PAYLOAD, 200, total=len(PAYLOAD))
        else:
            self._send_with_range()

    def _authorised(self) -> bool:
        user, password = self.server.credentials or ("", "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return self.headers.get("Authorization") == f"Basic {token}"

    def _send_with_range(self) -> None:
        byte_range = parse_range(self.headers.get("Range"), len(PAYLOAD))
        if byte_range == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif byte_range:
            start, end = byte_range
            self._send(PAYLOAD[start : end + 1], 206, total=len(PAYLOAD), start=start)
        else:
            self._send(PAYLOAD, 200, total=len(PAYLOAD))

    def _send(
        self, body: bytes, status: int, total: int, start: int = 0, body_limit: int | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}")
        self.end_headers()
        self.wfile.write(body[:body_limit])  # with a limit: the connection then just closes


@pytest.fixture
def serve() -> Iterator:
    servers: list[FlakyServer] = []

    def start(mode: str = "ok", credentials: tuple[str, str] | None = None) -> FlakyServer:
        server = FlakyServer(mode, credentials)
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


@pytest.mark.slow
def test_prefect_task_takes_credentials_from_a_secret_block(serve, tmp_path):
    """The download task reads `user:password` from a Secret block; it never reaches the
    logs stored by the Prefect API (what the UI shows)."""
    import asyncio

    from prefect import flow, get_client
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from polar_cube.spec import SourceSpec
    from tasks.download import download_source

    password = "pa55-Secret-9"
    server = serve("auth", credentials=("alice", password))
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
    assert (fetched.folder / "file.bin").read_bytes() == PAYLOAD

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
