"""A tiny local HTTP mirror for source files (GET/HEAD with byte ranges), and URL mapping."""

from __future__ import annotations

import email.utils
import mimetypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

CHUNK_SIZE = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class MirrorServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its root folder and verbosity."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, verbose: bool = False) -> None:
        self.root = Path(root).resolve()
        self.verbose = verbose
        self.answered: list[tuple[str, str, int]] = []  # (method, path, status), in order
        super().__init__(address, _MirrorHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


class _MirrorHandler(BaseHTTPRequestHandler):
    """Serves regular files under the server root; never anything outside it."""

    server: MirrorServer
    server_version = "polar-cube-mirror"

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        answered = getattr(self.server, "answered", None)
        if answered is not None:
            answered.append((self.command, urlsplit(self.path).path, int(code)))
        super().send_response(code, message)

    def _serve(self, send_body: bool) -> None:
        path = self._resolve(urlsplit(self.path).path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'  # changes with the bytes written
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        if self._not_modified(etag, stat.st_mtime):
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
            self.end_headers()
            return
        byte_range = parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = byte_range or (0, size - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if byte_range else HTTPStatus.OK)
        if byte_range:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header(
            "Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        self.end_headers()
        if send_body:
            self._send_file(path, start, end - start + 1)

    def _not_modified(self, etag: str, mtime: float) -> bool:
        """RFC 9110: If-None-Match decides when given; else If-Modified-Since (whole seconds)."""
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None:
            tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
            return "*" in tags or etag in tags
        since = self.headers.get("If-Modified-Since")
        if since:
            try:
                when = email.utils.parsedate_to_datetime(since)
            except (TypeError, ValueError):
                return False
            return int(mtime) <= when.timestamp()
        return False

    def _resolve(self, url_path: str) -> Path | None:
        """Map a URL path onto a regular file under the root, or None (missing or outside)."""
        parts = unquote(url_path).split("/")
        if any(p == ".." or "\\" in p or "\0" in p for p in parts):
            return None
        candidate = self.server.root.joinpath(*[p for p in parts if p not in ("", ".")])
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(self.server.root) or not resolved.is_file():
            return None
        return resolved

    def _send_file(self, path: Path, start: int, length: int) -> None:
        try:
            with path.open("rb") as f:
                f.seek(start)
                while length > 0:
                    chunk = f.read(min(CHUNK_SIZE, length))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    length -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing more to do


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """Parse a single `bytes=` range: (start, end) inclusive, "unsatisfiable", or None (ignore).

    Multiple or malformed ranges are ignored (the whole file is served), as RFC 9110 allows.
    """
    match = _RANGE.fullmatch((header or "").strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last n bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


def make_mirror_server(
    root: Path, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False
) -> MirrorServer:
    """Create (but do not start) a server for the files under `root`."""
    return MirrorServer((host, port), Path(root), verbose=verbose)


@contextmanager
def serving_mirror(
    root: Path, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False
) -> Iterator[str]:
    """Serve `root` from a daemon thread; yield the base URL; shut down on exit."""
    server = make_mirror_server(root, host, port, verbose=verbose)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="polar-cube-mirror", daemon=True
    )
    thread.start()
    try:
        yield server.base_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve_mirror_forever(
    root: Path, port: int, host: str = "127.0.0.1", *, verbose: bool = False
) -> None:
    """Serve `root` until interrupted (for `polar-cube sources serve`); print the base URL once."""
    server = make_mirror_server(root, host, port, verbose=verbose)
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def mirror_url(url: str, mirror: str) -> str:
    """Map a source URL (http(s), file:// or a plain path) onto the mirror by its file name."""
    name = served_file_name(str(url))
    if not name:
        raise ValueError(f"cannot map {url!r} onto a mirror: it has no file name")
    return mirror.rstrip("/") + "/" + quote(name, safe="")


def served_file_name(url: str) -> str:
    """The file a mirror serves for `url`: its last path segment, percent-decoded for URLs,
    literal for plain paths."""
    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https", "file"):
        return unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
    return re.split(r"[/\\]", url.rstrip("/\\"))[-1]  # a plain (possibly Windows) path
