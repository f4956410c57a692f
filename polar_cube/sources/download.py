"""Checked, cached file downloads (http, https, file:// and plain paths).

A file counts as downloaded only with the expected size and sha256, not an HTML page, and
passing the caller's check: that is what keeps bad bytes out of the cache. Its record
`<dest>.meta.json` says what it is (`identity`), so a later call reuses it whichever mirror
serves it. Getting the bytes (retries, Range resume, stall timeouts) is
`polar_cube.sources.transport`'s job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from polar_cube.errors import TargetError, environment_problem
from polar_cube.sources.sniff import body_kind, body_start, read_head
from polar_cube.sources.transport import (
    DEFAULT_BACKOFF_SECONDS,
    DownloadError,
    Transfer,
    fetch_part,
    redact_url,
    retry_policy,
    unchanged_upstream,
)

# The public face: `download_file` raises `DownloadError` (the transport's, where most are
# raised); `redact_url` is what callers use to name a URL in messages.
__all__ = [
    "DownloadError",
    "DownloadResult",
    "Validator",
    "discard_download",
    "download_file",
    "redact_url",
]

Validator = Callable[[Path, str], None]


@dataclass(frozen=True)
class DownloadResult:
    """Where a download landed and what it contained."""

    path: Path
    url: str
    size: int
    sha256: str
    reused: bool  # already complete in the cache; nothing was fetched
    replaced_sha256: str | None = None  # the cached copy's, when the upstream file changed


@dataclass
class _Job(Transfer):
    """A transfer plus what the cache checks and records."""

    identity: str  # what the file is (the source's own URL), whichever mirror serves it
    meta: Path
    sha256: str | None
    validate: Validator | None
    binary: bool


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
    deadline_seconds: float | None = None,
    revalidate: bool = False,
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
    sending data after `attempts` x `timeout_seconds` plus the pauses (93 s). A 503 or 429
    with Retry-After waits as long as asked (up to 5 min). Whatever happens, the download
    gives up at `deadline_seconds` (default 1 h; POLAR_CUBE_DOWNLOAD_DEADLINE_SECONDS), a
    server trickling bytes included, naming the URL and the time spent. A 4xx answer or
    wrong content fails at once.

    `revalidate`: a cached copy is first checked against the server with one conditional
    request (its recorded ETag / Last-Modified): 304 reuses it; new bytes at the same URL are
    downloaded (the result names the cached copy's sha256 in `replaced_sha256`). A server
    that cannot be asked (unreachable, no validators) leaves the cached copy in use.
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
    policy = retry_policy(attempts, timeout_seconds, backoff_seconds, deadline_seconds)
    cached = _reuse_cached(job)
    replaced = None
    if cached is not None:
        if not revalidate or _still_upstream(job, url, auth):
            return cached
        replaced = cached.sha256
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        size, digest = fetch_part(job, url, auth, policy)
    except OSError as exc:
        job.discard_part()
        problem = environment_problem(exc)
        if problem:  # the cache's disk, not the source, is at fault
            raise TargetError(
                f"{job.dest.parent}: cannot write {job.dest.name}: {problem}"
            ) from None
        raise job.fail(f"I/O error: {exc}") from exc
    except DownloadError:
        job.discard_part()
        raise
    result = _finish(job, size, digest)
    return replace(result, replaced_sha256=replaced) if replaced else result


def _still_upstream(job: _Job, url: str, auth: tuple[str, str] | None) -> bool:
    """Whether the cached copy is still what the server has (see `unchanged_upstream`)."""
    try:
        validators = json.loads(job.meta.read_text()).get("validators") or {}
    except (OSError, ValueError):
        validators = {}
    unchanged = unchanged_upstream(url, validators, auth)
    if unchanged is False:
        job.log(
            "%s: the server has new bytes at this URL (not %s); downloading them",
            job.where,
            ", ".join(f"{k} {v}" for k, v in validators.items()),
            level=logging.WARNING,
        )
        return False
    if unchanged:
        job.log("%s: unchanged upstream (304 Not Modified)", job.where)
    return True


def discard_download(dest: Path) -> None:
    """Forget a download: its file, partial file and completion record."""
    dest = Path(dest)
    for path in (
        dest,
        dest.with_name(dest.name + ".part"),
        dest.with_name(dest.name + ".meta.json"),
    ):
        path.unlink(missing_ok=True)


# --- checks ------------------------------------------------------------------------------------


def _check_body(job: _Job, path: Path) -> None:
    """Refuse an HTML page, an empty body and (when binary data is expected) text."""
    head = read_head(path)
    kind = body_kind(head)
    if kind == "html":
        raise job.html_page()
    if kind == "empty":
        raise DownloadError(f"{job.where} {job.verb} an empty body instead of data")
    if kind == "text" and job.binary:
        raise DownloadError(f"{job.where} {job.verb} text instead of data: {body_start(head)!r}")


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
        job.discard_part()
        raise
    os.replace(job.part, job.dest)
    record = {
        "identity": job.identity,
        "url": job.url,
        "size": size,
        "sha256": digest,
        "validators": job.validators,  # what to revalidate it with
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = job.meta.with_name(job.meta.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, job.meta)
    return DownloadResult(path=job.dest, url=job.url, size=size, sha256=digest, reused=False)
