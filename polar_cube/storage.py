"""S3 storage from plain fsspec `storage_options`: access checks and clear errors.

The options come from anywhere (the Prefect blocks in `polar_cube.tasks.blocks`, a profile,
the environment). No message ever includes a secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from polar_cube.errors import PolarCubeError

_ACCESS_DENIED = frozenset(
    {"AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
)
_NO_BUCKET = frozenset({"NoSuchBucket"})


class StorageAccessError(PolarCubeError, RuntimeError):
    """S3 storage cannot be used: the message names the URL or block and the likely cause."""


def endpoint_of(storage_options: dict) -> str:
    """The endpoint the options point at, for messages."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    return client_kwargs.get("endpoint_url") or storage_options.get("endpoint_url") or "AWS S3"


def check_bucket_access(url: str, storage_options: dict, *, write: bool = True) -> None:
    """Check with one tiny request that `url` is usable: write+delete a probe (or just list).

    Raises StorageAccessError saying whether the keys were refused, the bucket is missing
    or the endpoint cannot be reached.
    """
    import s3fs

    path = url.removeprefix("s3://").strip("/")
    bucket = path.split("/", 1)[0]
    options = _bounded(storage_options)
    # fsspec's instance cache keeps it alive: s3fs closing a collected instance's session from
    # whatever event loop runs at that moment logs "attached to a different loop" errors.
    fs = s3fs.S3FileSystem(**options)
    fs.retries = 1  # botocore's own retries (config_kwargs) are enough for a check
    try:
        if write:
            probe = f"{path}/.polar-cube-access-probe-{secrets.token_hex(4)}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        else:
            fs.ls(bucket, refresh=True)
    except Exception as error:
        raise _access_error(url, bucket, storage_options, error) from None


@contextmanager
def reaching_storage(url: str, storage_options: dict) -> Iterator[None]:
    """Turn an S3 endpoint that cannot be reached, or keys or a bucket it refuses, met inside
    into a StorageAccessError naming `url` (local folders pass through untouched)."""
    try:
        yield
    except StorageAccessError:
        raise  # already says what and where
    except Exception as error:
        recognised = (
            _is_connection_error(error) or _error_code(error) in _ACCESS_DENIED | _NO_BUCKET
        )
        if not (url.startswith("s3://") and recognised):
            raise
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        raise _access_error(url, bucket, storage_options, error) from None


def _bounded(storage_options: dict) -> dict:
    """The options with short timeouts and few retries, so a check fails fast."""
    config = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}
    return storage_options | {
        "config_kwargs": config | (storage_options.get("config_kwargs") or {})
    }


def _access_error(
    url: str, bucket: str, storage_options: dict, error: Exception
) -> StorageAccessError:
    """Turn an s3fs/botocore failure into a clear message (never with a secret in it)."""
    endpoint = endpoint_of(storage_options)
    code = _error_code(error)
    if isinstance(error, PermissionError) or code in _ACCESS_DENIED:
        who = (
            "anonymous requests were refused"
            if storage_options.get("anon")
            else "the AwsCredentials block's keys were refused"
        )
        return StorageAccessError(f"{url}: access denied: {who} by {endpoint}")
    if code in _NO_BUCKET or isinstance(error, FileNotFoundError):
        return StorageAccessError(f"{url}: bucket {bucket} does not exist at {endpoint}")
    if _is_connection_error(error):
        return StorageAccessError(
            f"{url}: cannot reach S3 endpoint {endpoint} "
            "(is the server running? `polar-cube s3 start`)"
        )
    detail = f"{code}" if code else type(error).__name__
    return StorageAccessError(f"{url}: S3 request to {endpoint} failed ({detail})")


def _error_code(error: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (also when s3fs wrapped it)."""
    for candidate in (error, error.__cause__, error.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code") or "") or None
    return None


def _is_connection_error(error: BaseException) -> bool:
    """Refused, timed out, or cut off before an answer (a server that died mid-request:
    botocore's ConnectionClosedError), anywhere in the chain of causes."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, HTTPClientError

    connection_errors = (
        EndpointConnectionError,
        ConnectTimeoutError,
        HTTPClientError,
        ConnectionError,
    )
    seen: list[BaseException] = []
    candidate: BaseException | None = error
    while candidate is not None and candidate not in seen:
        if isinstance(candidate, connection_errors):
            return True
        seen.append(candidate)
        candidate = candidate.__cause__ or candidate.__context__
    return False
