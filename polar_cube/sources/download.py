"""Robust, resumable, checked file downloads (http, https, file:// and plain paths).

This is the only retry layer: a failed attempt is resumed with a Range request.

Hand-written on httpx rather than fsspec's HTTP filesystem or pooch: neither resumes a
broken transfer with Range requests (checking the server's Content-Range against the
resume offset) nor bounds each attempt by a stall timeout. A file counts as downloaded only
with the expected size and sha256: that is what keeps bad bytes out of the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx
from tqdm import tqdm

from polar_cube.errors import TargetError, environment_problem

CHUNK_SIZE = 1024 * 1024
LOG_EVERY_FRACTION = 0.10
LOG_EVERY_SECONDS = 5.0
RETRY_STATUSES = frozenset({429})
SNIFF_BYTES = 4096
ATTEMPTS_ENV = "POLAR_CUBE_DOWNLOAD_ATTEMPTS"
TIMEOUT_ENV = "POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS"
DEFAULT_ATTEMPTS = 3
DEFAULT_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_BACKOFF_SECONDS = 1.0

Validator = Callable[[Path, str], None]


class DownloadError(RuntimeError):
    """A download failed; the message names the URL (and label) and what went wrong.

    `retryable` says whether trying again later may help (the server was unreachable or
    kept failing), as opposed to a 4xx answer or wrong content.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (connection, timeout, 5xx, 429)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one download tries: `attempts` requests in all (each resuming the last), each
    given up after `timeout_seconds` without data (`connect_seconds` to connect), with
    `backoff_seconds * 2**k` pauses between them."""

    attempts: int
    timeout_seconds: float
    backoff_seconds: float

    @property
    def connect_seconds(self) -> float:
        return min(self.timeout_seconds, CONNECT_TIMEOUT_SECONDS)

    @property
    def pauses_seconds(self) -> float:
        return self.backoff_seconds * (2 ** (self.attempts - 1) - 1)

    def give_up_seconds(self) -> float:
        """The longest a download can spend failing without ever receiving data: every
        attempt stalls for the full timeout, plus the pauses."""
        return self.attempts * self.timeout_seconds + self.pauses_seconds


def retry_policy(
    attempts: int | None = None,
    timeout_seconds: float | None = None,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
) -> RetryPolicy:
    """The policy from the arguments, else from POLAR_CUBE_DOWNLOAD_ATTEMPTS and
    POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS (read now, so they also reach Prefect task runs),
    else the defaults: 3 attempts, 30 s."""
    if attempts is None:
        attempts = _from_env(ATTEMPTS_ENV, int, DEFAULT_ATTEMPTS, "a whole number >= 1")
    if timeout_seconds is None:
        timeout_seconds = _from_env(TIMEOUT_ENV, float, DEFAULT_TIMEOUT_SECONDS, "a number > 0")
    if attempts < 1 or not timeout_seconds > 0:
        raise ValueError(f"bad retry policy: {attempts} attempts, {timeout_seconds} s timeout")
    return RetryPolicy(attempts, float(timeout_seconds), backoff_seconds)


def _from_env(variable: str, kind: type, default: float, what: str):
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or not math.isfinite(value):
        raise DownloadError(f"environment variable {variable}={text!r}: must be {what}")
    return value


@dataclass(frozen=True)
class DownloadResult:
    """Where a download landed and what it contained."""

    path: Path
    url: str
    size: int
    sha256: str
    reused: bool  # already complete in the cache; nothing was fetched


@dataclass
class _Job:
    """Everything one download needs, with credentials kept out of anything printable."""

    url: str  # without userinfo; safe to log and to hand to httpx
    identity: str  # what the file is (the source's own URL), whichever mirror serves it
    where: str  # "label: url" prefix for messages
    dest: Path
    part: Path
    meta: Path
    expected_size: int | None
    sha256: str | None
    logger: logging.Logger | None
    validate: Validator | None
    binary: bool
    verb: str  # how the message says what the URL gave: "returned" (http) or "holds" (a file)

    def fail(self, what: str, *, retryable: bool = False) -> DownloadError:
        return DownloadError(f"{self.where}: {what}", retryable=retryable)

    def log(self, msg: str, *args: object, level: int = logging.INFO) -> None:
        if self.logger is not None:
            self.logger.log(level, msg, *args)


def redact_url(url: str) -> str:
    """Return `url` without any `user:pass@` userinfo."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def download_file(
    url: str,
    dest: Path,
    *,
    label: str = "",
    expected_size: int | None = None,
    sha256: str | None = None,
    auth: tuple[str, str] | None = None,
    validate: Validator | None = None,
    binary: bool = True,
    identity: str | None = None,
    attempts: int | None = None,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    timeout_seconds: float | None = None,
    logger: logging.Logger | None = None,
) -> DownloadResult:
    """Download `url` to `dest` (resuming, retrying and checking); reuse a complete cached copy.

    A download is complete when it has the expected size and sha256 (when given), is not an
    HTML page (nor text or empty, when `binary`), and passes `validate(path, name)`, which
    raises ValueError (e.g. SourceFormatError, ArchiveError) for a file that is not usable.
    Only then is it moved to `dest` and its record `<dest>.meta.json` written; anything that
    fails is deleted. A cached `dest` is reused only if its record names the same `identity`
    (what the file is: the source's own URL, whichever mirror serves it; default `url`) and
    it still passes these checks; otherwise it is deleted and fetched again.

    Retrying (see `retry_policy`): `attempts` requests in all, each resuming from where the
    last stopped, pausing 1, 2, 4 ... s (x `backoff_seconds`) between them. A refused
    connection gives up after the pauses alone (3 s with the defaults), an unreachable host
    after `attempts` x 10 s connect timeouts plus the pauses (33 s), and a server that stops
    sending data after `attempts` x `timeout_seconds` plus the pauses (93 s). A 4xx answer or
    wrong content fails at once.
    """
    url = str(url)
    dest = Path(dest)
    safe_url = redact_url(url)
    scheme = urlsplit(url).scheme.lower()
    job = _Job(
        url=safe_url,
        identity=redact_url(identity) if identity else safe_url,
        where=f"{label}: {safe_url}" if label else safe_url,
        dest=dest,
        part=dest.with_name(dest.name + ".part"),
        meta=dest.with_name(dest.name + ".meta.json"),
        expected_size=expected_size,
        sha256=sha256.lower() if sha256 else None,
        logger=logger,
        validate=validate,
        binary=binary,
        verb="returned" if scheme in ("http", "https") else "holds",
    )
    policy = retry_policy(attempts, timeout_seconds, backoff_seconds)
    cached = _reuse_cached(job)
    if cached is not None:
        return cached
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if scheme in ("http", "https"):
            auth = auth or _userinfo_auth(url)
            size, digest = _fetch_http(job, auth, policy)
        elif scheme == "file" or len(scheme) <= 1:  # "" or a Windows drive letter
            size, digest = _copy_local(job, _local_source(url, scheme))
        else:
            raise job.fail(f"unsupported URL scheme {scheme!r}")
    except OSError as exc:
        _discard(job.part)
        problem = environment_problem(exc)
        if problem:  # the cache's disk, not the source, is at fault
            raise TargetError(
                f"{job.dest.parent}: cannot write {job.dest.name}: {problem}"
            ) from None
        raise job.fail(f"I/O error: {exc}") from exc
    except DownloadError:
        _discard(job.part)
        raise
    return _finish(job, size, digest)


def discard_download(dest: Path) -> None:
    """Forget a download: its file, partial file and completion record."""
    dest = Path(dest)
    for path in (
        dest,
        dest.with_name(dest.name + ".part"),
        dest.with_name(dest.name + ".meta.json"),
    ):
        path.unlink(missing_ok=True)


# --- what a body holds -------------------------------------------------------------------------


def body_kind(head: bytes) -> Literal["html", "text", "empty"] | None:
    """What the first bytes of a body are when they are not binary data: an HTML page,
    other text, or nothing; None for binary data."""
    if not head:
        return "empty"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n\f\v").lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text" if _is_text(head) else None


def body_start(head: bytes, length: int = 60) -> str:
    """The first `length` characters of a text body, for messages."""
    return head.decode("utf-8", "replace")[:length]


def _is_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: error.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _check_body(job: _Job, path: Path) -> None:
    """Refuse an HTML page, an empty body and (when binary data is expected) text."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    kind = body_kind(head)
    if kind == "html":
        raise _html_page(job)
    if kind == "empty":
        raise DownloadError(f"{job.where} {job.verb} an empty body instead of data")
    if kind == "text" and job.binary:
        raise DownloadError(f"{job.where} {job.verb} text instead of data: {body_start(head)!r}")


def _html_page(job: _Job) -> DownloadError:
    return DownloadError(
        f"{job.where} {job.verb} an HTML page (a login or error page?) instead of data"
    )


def _validate(job: _Job, path: Path) -> None:
    """The caller's `validate`; its ValueError becomes a DownloadError naming the URL."""
    if job.validate is None:
        return
    try:
        job.validate(path, job.dest.name)
    except ValueError as exc:
        raise job.fail(str(exc)) from exc


# --- cache -------------------------------------------------------------------------------------


def _reuse_cached(job: _Job) -> DownloadResult | None:
    """Return a result for an already complete download, or None when it must be fetched."""
    if not (job.dest.is_file() and job.meta.is_file()):
        return None
    try:
        meta = json.loads(job.meta.read_text())
        size, digest = int(meta["size"]), str(meta["sha256"]).lower()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if job.dest.stat().st_size != size:
        return None
    if job.expected_size is not None and job.expected_size != size:
        return None
    if job.sha256 is not None and job.sha256 != digest:
        return None
    cached_identity = meta.get("identity", meta.get("url"))
    if cached_identity != job.identity:
        job.log("%s: the cached copy is of %s; fetching again", job.where, cached_identity)
        discard_download(job.dest)
        return None
    try:
        _check_body(job, job.dest)
        _validate(job, job.dest)
    except DownloadError as exc:
        job.log("cached copy is not usable (%s); fetching again", exc, level=logging.WARNING)
        discard_download(job.dest)
        return None
    job.log(
        "reusing %s (%d bytes, sha256 %s…, downloaded from %s)",
        job.dest,
        size,
        digest[:12],
        meta.get("url"),
    )
    return DownloadResult(path=job.dest, url=job.url, size=size, sha256=digest, reused=True)


def _finish(job: _Job, size: int, digest: str) -> DownloadResult:
    """Check the complete .part, move it into place and write the completion record."""
    try:
        _check_body(job, job.part)
        if job.expected_size is not None and size != job.expected_size:
            raise job.fail(f"size mismatch: expected {job.expected_size} bytes, got {size}")
        if job.sha256 is not None and digest != job.sha256:
            raise job.fail(f"sha256 mismatch: expected {job.sha256}, got {digest}")
        _validate(job, job.part)
    except Exception:
        _discard(job.part)
        raise
    os.replace(job.part, job.dest)
    record = {
        "identity": job.identity,
        "url": job.url,
        "size": size,
        "sha256": digest,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = job.meta.with_name(job.meta.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, job.meta)
    return DownloadResult(path=job.dest, url=job.url, size=size, sha256=digest, reused=False)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


# --- local files -------------------------------------------------------------------------------


def _local_source(url: str, scheme: str) -> Path:
    if scheme != "file":
        return Path(url)
    parts = urlsplit(url)
    path = url2pathname(parts.path)
    if parts.netloc not in ("", "localhost"):
        path = f"//{parts.netloc}{path}"  # UNC-style share
    return Path(path)


def _copy_local(job: _Job, source: Path) -> tuple[int, str]:
    """Copy a local file into the .part in chunks, hashing as it goes."""
    if not source.is_file():
        raise job.fail(f"no such file: {source}")
    total = source.stat().st_size
    _check_total(job, total)
    job.log("copying %s -> %s (%d bytes)", source, job.dest, total)
    hasher = hashlib.sha256()
    progress = _Progress(job, total=total, offset=0)
    with source.open("rb") as src:
        _write_chunks(iter(lambda: src.read(CHUNK_SIZE), b""), job.part, "wb", hasher, progress)
    size = job.part.stat().st_size
    if size != total:
        _discard(job.part)
        raise job.fail(f"copied {size} bytes but the source has {total}")
    progress.log_end()
    return size, hasher.hexdigest()


# --- http --------------------------------------------------------------------------------------


def _userinfo_auth(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def _fetch_http(job: _Job, auth: tuple[str, str] | None, policy: RetryPolicy) -> tuple[int, str]:
    """Fetch into the .part, retrying with exponential backoff; return (size, sha256)."""
    headers = {"Accept-Encoding": "identity"}
    timeout = httpx.Timeout(policy.timeout_seconds, connect=policy.connect_seconds)
    with httpx.Client(auth=auth, headers=headers, follow_redirects=True, timeout=timeout) as client:
        for attempt in range(policy.attempts):
            try:
                return _attempt(job, client, policy)
            except _Retryable as exc:
                if attempt + 1 >= policy.attempts:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise job.fail(f"gave up after {tries}: {exc}", retryable=True) from None
                delay = policy.backoff_seconds * 2**attempt
                job.log("%s: %s; retrying in %.2f s", job.where, exc, delay, level=logging.WARNING)
                time.sleep(delay)
    raise AssertionError("unreachable")


def _attempt(job: _Job, client: httpx.Client, policy: RetryPolicy) -> tuple[int, str]:
    """One request: resume from the .part when there is one; return (size, sha256)."""
    offset = job.part.stat().st_size if job.part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    job.log("downloading %s -> %s (resume from %d bytes)", job.url, job.dest, offset)
    try:
        with client.stream("GET", job.url, headers=headers) as response:
            return _receive(job, response, offset)
    except httpx.UnsupportedProtocol as exc:
        raise job.fail(f"unsupported URL: {exc}") from None
    except httpx.ConnectTimeout:
        raise _Retryable(f"no connection within {policy.connect_seconds:g} s") from None
    except httpx.ReadTimeout:
        raise _Retryable(f"the server sent no data for {policy.timeout_seconds:g} s") from None
    except httpx.ConnectError as exc:
        raise _Retryable(f"cannot connect: {exc}") from None
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc


def _receive(job: _Job, response: httpx.Response, offset: int) -> tuple[int, str]:
    """Handle one response's status and stream its body into the .part."""
    status = response.status_code
    if status == 416 and offset:
        return _range_not_satisfiable(job, response, offset)
    if status >= 500 or status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {status} {response.reason_phrase}")
    if status not in (200, 206):
        _discard(job.part)
        raise job.fail(f"HTTP {status} {response.reason_phrase} (not retried)")
    if response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/html":
        _discard(job.part)
        raise _html_page(job)
    if status == 206 and offset:
        total = _content_range_total(job, response, offset)
    else:
        if offset:
            job.log("%s: server ignored the Range request; starting over", job.where)
        offset = 0
        total = _int_or_none(response.headers.get("content-length"))
    _check_total(job, total)
    return _stream_body(job, response, offset, total)


def _range_not_satisfiable(job: _Job, response: httpx.Response, offset: int) -> tuple[int, str]:
    """A 416 on resume: the .part is either already complete or stale."""
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("content-range", "").strip())
    if match and int(match.group(1)) == offset:
        return offset, _hash_file(job.part)
    _discard(job.part)
    raise _Retryable(f"HTTP 416 for a resume from byte {offset}; the partial file was discarded")


def _content_range_total(job: _Job, response: httpx.Response, offset: int) -> int | None:
    """Validate a 206 Content-Range against the resume offset; return the full size if given."""
    header = response.headers.get("content-range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    if not match or int(match.group(1)) != offset:
        _discard(job.part)
        raise _Retryable(f"bad Content-Range {header!r} for a resume from byte {offset}")
    return None if match.group(3) == "*" else int(match.group(3))


def _check_total(job: _Job, total: int | None) -> None:
    if total is not None and job.expected_size is not None and total != job.expected_size:
        _discard(job.part)
        raise job.fail(f"size mismatch: expected {job.expected_size} bytes, server has {total}")


def _stream_body(
    job: _Job, response: httpx.Response, offset: int, total: int | None
) -> tuple[int, str]:
    """Append (or write) the body to the .part in chunks, hashing everything on disk."""
    hasher = _hash_prefix(job.part) if offset else hashlib.sha256()
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    # No chunk_size: httpx would buffer up to it and lose that buffer if the connection drops.
    chunks = response.iter_bytes() if encoded else response.iter_raw()
    progress = _Progress(job, total=None if encoded else total, offset=offset)
    _write_chunks(chunks, job.part, "ab" if offset else "wb", hasher, progress)
    size = job.part.stat().st_size
    if total is not None and not encoded:
        if size < total:
            raise _Retryable(f"connection closed after {size} of {total} bytes")
        if size > total:
            _discard(job.part)
            raise job.fail(f"size mismatch: server announced {total} bytes, got {size}")
    progress.log_end()
    return size, hasher.hexdigest()


def _write_chunks(chunks, path: Path, mode: str, hasher, progress: _Progress) -> None:
    """Append/write `chunks` to `path` as they come, hashing and reporting progress."""
    try:
        with path.open(mode) as out:
            for chunk in chunks:
                out.write(chunk)
                hasher.update(chunk)
                progress.update(len(chunk))
            _sync(out)
    finally:
        progress.close()


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


# --- hashing, syncing, progress ----------------------------------------------------------------


def _hash_prefix(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher


def _hash_file(path: Path) -> str:
    return _hash_prefix(path).hexdigest()


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


class _Progress:
    """A tqdm bar on a terminal, plus periodic INFO log lines when a logger is given."""

    def __init__(self, job: _Job, total: int | None, offset: int) -> None:
        self.job = job
        self.total = total
        self.offset = offset
        self.done = offset
        self.started = self.last_log = time.monotonic()
        self.next_fraction = LOG_EVERY_FRACTION
        if total:
            while self.next_fraction <= offset / total:
                self.next_fraction += LOG_EVERY_FRACTION
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=job.dest.name,
                leave=False,
            )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if self.total:
            if self.done / self.total < self.next_fraction:
                return
            while self.next_fraction <= self.done / self.total:
                self.next_fraction += LOG_EVERY_FRACTION
        elif now - self.last_log < LOG_EVERY_SECONDS:
            return
        self.last_log = now
        total = "?" if self.total is None else str(self.total)
        self.job.log(
            "%s: %d/%s bytes (%.1f MB/s)", self.job.where, self.done, total, self._rate(now)
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_end(self) -> None:
        now = time.monotonic()
        self.job.log(
            "%s: finished %d bytes in %.1f s (%.1f MB/s)",
            self.job.where,
            self.done,
            now - self.started,
            self._rate(now),
        )

    def _rate(self, now: float) -> float:
        return (self.done - self.offset) / max(now - self.started, 1e-6) / 1e6
