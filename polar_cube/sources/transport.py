"""Getting a file's bytes into a partial file: HTTP(S) streamed with retries and Range resume,
each attempt bounded by a stall timeout; file:// URLs and plain paths copied.

This is the only retry layer: a failed attempt is resumed with a Range request.

Hand-written on httpx rather than fsspec's HTTP filesystem or pooch: neither resumes a
broken transfer with Range requests (checking the server's Content-Range against the
resume offset) nor bounds each attempt by a stall timeout. What makes a transfer a usable
download (size, sha256, content, the cache record) is `polar_cube.sources.download`'s job.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx
from tqdm import tqdm

from polar_cube.errors import PolarCubeError

CHUNK_SIZE = 1024 * 1024
LOG_EVERY_FRACTION = 0.10
LOG_EVERY_SECONDS = 5.0
RETRY_STATUSES = frozenset({429})
ATTEMPTS_ENV = "POLAR_CUBE_DOWNLOAD_ATTEMPTS"
TIMEOUT_ENV = "POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS"
DEADLINE_ENV = "POLAR_CUBE_DOWNLOAD_DEADLINE_SECONDS"
DEFAULT_ATTEMPTS = 3
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_DEADLINE_SECONDS = 3600.0  # a whole download, every attempt and pause included
MAX_RETRY_AFTER_SECONDS = 300.0  # a server's Retry-After is honoured up to this
CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_BACKOFF_SECONDS = 1.0
HTML_PAGE = "an HTML page (a login or error page?) instead of data"


class DownloadError(PolarCubeError, RuntimeError):
    """A download failed; the message names the URL (and label) and what went wrong.

    `retryable` says whether trying again later may help (the server was unreachable or
    kept failing), as opposed to a 4xx answer or wrong content.
    """


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (connection, timeout, 5xx, 429); `wait`:
    the pause the server asked for (Retry-After), if any."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class _PastDeadline(Exception):
    """The download's deadline passed while bytes were still coming (a trickle)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one download tries: `attempts` requests in all (each resuming the last), each
    given up after `timeout_seconds` without data (`connect_seconds` to connect), with
    `backoff_seconds * 2**k` pauses between them (or the server's Retry-After, up to
    `MAX_RETRY_AFTER_SECONDS`), all within `deadline_seconds`."""

    attempts: int
    timeout_seconds: float
    backoff_seconds: float
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS

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
    deadline_seconds: float | None = None,
) -> RetryPolicy:
    """The policy from the arguments, else from POLAR_CUBE_DOWNLOAD_ATTEMPTS,
    POLAR_CUBE_DOWNLOAD_TIMEOUT_SECONDS and POLAR_CUBE_DOWNLOAD_DEADLINE_SECONDS (read now,
    so they also reach Prefect task runs), else the defaults: 3 attempts, 30 s, 1 h."""
    if attempts is None:
        attempts = _from_env(ATTEMPTS_ENV, int, DEFAULT_ATTEMPTS, "a whole number >= 1")
    if timeout_seconds is None:
        timeout_seconds = _from_env(TIMEOUT_ENV, float, DEFAULT_TIMEOUT_SECONDS, "a number > 0")
    if deadline_seconds is None:
        deadline_seconds = _from_env(
            DEADLINE_ENV, float, DEFAULT_DEADLINE_SECONDS, "a number of seconds > 0"
        )
    if attempts < 1 or not timeout_seconds > 0 or not deadline_seconds > 0:
        raise ValueError(
            f"bad retry policy: {attempts} attempts, {timeout_seconds} s timeout, "
            f"{deadline_seconds} s deadline"
        )
    return RetryPolicy(attempts, float(timeout_seconds), backoff_seconds, float(deadline_seconds))


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


def redact_url(url: str) -> str:
    """Return `url` without any `user:pass@` userinfo."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@dataclass
class Transfer:
    """One file to fetch, with credentials kept out of anything printable."""

    url: str  # without userinfo; safe to log and to hand to httpx
    where: str  # "label: url" prefix for messages
    dest: Path  # where the file will be (for messages and the progress bar)
    part: Path  # where the bytes go meanwhile
    expected_size: int | None
    logger: logging.Logger | None
    verb: str  # how the message says what the URL gave: "returned" (http) or "holds" (a file)
    validators: dict[str, str] = field(default_factory=dict, kw_only=True)  # ETag, Last-Modified

    def fail(self, what: str, *, retryable: bool = False) -> DownloadError:
        return DownloadError(f"{self.where}: {what}", retryable=retryable)

    def html_page(self) -> DownloadError:
        return DownloadError(f"{self.where} {self.verb} {HTML_PAGE}")

    def log(self, msg: str, *args: object, level: int = logging.INFO) -> None:
        if self.logger is not None:
            self.logger.log(level, msg, *args)

    def discard_part(self) -> None:
        self.part.unlink(missing_ok=True)


def fetch_part(
    transfer: Transfer, url: str, auth: tuple[str, str] | None, policy: RetryPolicy
) -> tuple[int, str]:
    """Fetch `url` (which may carry `user:pass@`, used when `auth` is None) into
    `transfer.part`: over http(s) per `policy`, resuming a .part left by an earlier try, or
    copied from a file:// URL or a path. Return (size, sha256) of the complete .part."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(transfer, auth or _userinfo_auth(url), policy)
    if scheme == "file" or len(scheme) <= 1:  # "" or a Windows drive letter
        return _copy_local(transfer, _local_source(url, scheme))
    raise transfer.fail(f"unsupported URL scheme {scheme!r}")


# --- local files -------------------------------------------------------------------------------


def _local_source(url: str, scheme: str) -> Path:
    if scheme != "file":
        return Path(url)
    parts = urlsplit(url)
    path = url2pathname(parts.path)
    if parts.netloc not in ("", "localhost"):
        path = f"//{parts.netloc}{path}"  # UNC-style share
    return Path(path)


def _copy_local(job: Transfer, source: Path) -> tuple[int, str]:
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
        job.discard_part()
        raise job.fail(f"copied {size} bytes but the source has {total}")
    progress.log_end()
    return size, hasher.hexdigest()


# --- http --------------------------------------------------------------------------------------

REVALIDATE_TIMEOUT_SECONDS = 10.0


def unchanged_upstream(
    url: str, validators: dict[str, str], auth: tuple[str, str] | None = None
) -> bool | None:
    """Ask the server whether the file at `url` is still the one with `validators` (its
    ETag and Last-Modified as recorded): one conditional GET (`If-None-Match`,
    `If-Modified-Since`), no body read. True: 304 Not Modified. False: the server has other
    bytes (200). None: no answer to go by (no validators recorded, not http(s), the server
    unreachable or failing) — the caller keeps what it has."""
    headers = {"Accept-Encoding": "identity"}
    if validators.get("etag"):
        headers["If-None-Match"] = validators["etag"]
    if validators.get("last_modified"):
        headers["If-Modified-Since"] = validators["last_modified"]
    if len(headers) == 1 or urlsplit(url).scheme.lower() not in ("http", "https"):
        return None
    timeout = httpx.Timeout(REVALIDATE_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
    try:
        with httpx.Client(
            auth=auth or _userinfo_auth(url), follow_redirects=True, timeout=timeout
        ) as client:
            with client.stream("GET", redact_url(url), headers=headers) as response:
                status = response.status_code
    except httpx.HTTPError:
        return None
    if status == 304:
        return True
    if status in (200, 206):
        return False
    return None


def _userinfo_auth(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def _fetch_http(
    job: Transfer, auth: tuple[str, str] | None, policy: RetryPolicy
) -> tuple[int, str]:
    """Fetch into the .part, retrying with exponential backoff; return (size, sha256)."""
    headers = {"Accept-Encoding": "identity"}
    timeout = httpx.Timeout(policy.timeout_seconds, connect=policy.connect_seconds)
    started = time.monotonic()
    deadline = started + policy.deadline_seconds
    with httpx.Client(auth=auth, headers=headers, follow_redirects=True, timeout=timeout) as client:
        for attempt in range(policy.attempts):
            try:
                return _attempt(job, client, policy, deadline)
            except _PastDeadline as exc:
                raise _deadline_failure(job, policy, started, str(exc)) from None
            except _Retryable as exc:
                if attempt + 1 >= policy.attempts:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise job.fail(f"gave up after {tries}: {exc}", retryable=True) from None
                delay = policy.backoff_seconds * 2**attempt
                if exc.wait is not None:  # the server said when to come back
                    delay = max(delay, min(exc.wait, MAX_RETRY_AFTER_SECONDS))
                if time.monotonic() + delay > deadline:
                    raise _deadline_failure(job, policy, started, str(exc)) from None
                job.log("%s: %s; retrying in %.2f s", job.where, exc, delay, level=logging.WARNING)
                time.sleep(delay)
    raise AssertionError("unreachable")


def _deadline_failure(
    job: Transfer, policy: RetryPolicy, started: float, problem: str
) -> DownloadError:
    spent = time.monotonic() - started
    return job.fail(
        f"gave up after {spent:.0f} s, the deadline of {policy.deadline_seconds:g} s "
        f"({DEADLINE_ENV}): {problem}",
        retryable=True,
    )


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a Retry-After header asks for (a number or an HTTP date), else None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _attempt(
    job: Transfer, client: httpx.Client, policy: RetryPolicy, deadline: float
) -> tuple[int, str]:
    """One request: resume from the .part when there is one; return (size, sha256)."""
    offset = job.part.stat().st_size if job.part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    job.log("downloading %s -> %s (resume from %d bytes)", job.url, job.dest, offset)
    try:
        with client.stream("GET", job.url, headers=headers) as response:
            return _receive(job, response, offset, deadline)
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


def _receive(
    job: Transfer, response: httpx.Response, offset: int, deadline: float
) -> tuple[int, str]:
    """Handle one response's status and stream its body into the .part."""
    status = response.status_code
    if status == 416 and offset:
        return _range_not_satisfiable(job, response, offset)
    if status >= 500 or status in RETRY_STATUSES:
        wait = _retry_after(response)
        after = f" (Retry-After: {wait:.0f} s)" if wait is not None else ""
        raise _Retryable(f"HTTP {status} {response.reason_phrase}{after}", wait=wait)
    if status not in (200, 206):
        job.discard_part()
        raise job.fail(f"HTTP {status} {response.reason_phrase} (not retried)")
    if response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/html":
        job.discard_part()
        raise job.html_page()
    job.validators = {
        name: response.headers[header]
        for name, header in (("etag", "etag"), ("last_modified", "last-modified"))
        if response.headers.get(header)
    }
    if status == 206 and offset:
        total = _content_range_total(job, response, offset)
    else:
        if offset:
            job.log("%s: server ignored the Range request; starting over", job.where)
        offset = 0
        total = _int_or_none(response.headers.get("content-length"))
    _check_total(job, total)
    return _stream_body(job, response, offset, total, deadline)


def _range_not_satisfiable(job: Transfer, response: httpx.Response, offset: int) -> tuple[int, str]:
    """A 416 on resume: the .part is either already complete or stale."""
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("content-range", "").strip())
    if match and int(match.group(1)) == offset:
        return offset, _hash_file(job.part)
    job.discard_part()
    raise _Retryable(f"HTTP 416 for a resume from byte {offset}; the partial file was discarded")


def _content_range_total(job: Transfer, response: httpx.Response, offset: int) -> int | None:
    """Validate a 206 Content-Range against the resume offset; return the full size if given."""
    header = response.headers.get("content-range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    if not match or int(match.group(1)) != offset:
        job.discard_part()
        raise _Retryable(f"bad Content-Range {header!r} for a resume from byte {offset}")
    return None if match.group(3) == "*" else int(match.group(3))


def _check_total(job: Transfer, total: int | None) -> None:
    if total is not None and job.expected_size is not None and total != job.expected_size:
        job.discard_part()
        raise job.fail(f"size mismatch: expected {job.expected_size} bytes, server has {total}")


def _stream_body(
    job: Transfer, response: httpx.Response, offset: int, total: int | None, deadline: float
) -> tuple[int, str]:
    """Append (or write) the body to the .part in chunks, hashing everything on disk."""
    hasher = _hash_prefix(job.part) if offset else hashlib.sha256()
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    # No chunk_size: httpx would buffer up to it and lose that buffer if the connection drops.
    chunks = response.iter_bytes() if encoded else response.iter_raw()
    progress = _Progress(job, total=None if encoded else total, offset=offset)
    _write_chunks(chunks, job.part, "ab" if offset else "wb", hasher, progress, deadline)
    size = job.part.stat().st_size
    if total is not None and not encoded:
        if size < total:
            raise _Retryable(f"connection closed after {size} of {total} bytes")
        if size > total:
            job.discard_part()
            raise job.fail(f"size mismatch: server announced {total} bytes, got {size}")
    progress.log_end()
    return size, hasher.hexdigest()


def _write_chunks(
    chunks, path: Path, mode: str, hasher, progress: _Progress, deadline: float | None = None
) -> None:
    """Append/write `chunks` to `path` as they come, hashing and reporting progress; raise
    _PastDeadline once `deadline` (monotonic) passes with bytes still coming."""
    try:
        with path.open(mode) as out:
            for chunk in chunks:
                out.write(chunk)
                hasher.update(chunk)
                progress.update(len(chunk))
                if deadline is not None and time.monotonic() > deadline:
                    raise _PastDeadline(
                        f"still receiving, {progress.done - progress.offset} bytes in "
                        f"{time.monotonic() - progress.started:.0f} s (a trickle)"
                    )
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

    def __init__(self, job: Transfer, total: int | None, offset: int) -> None:
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
