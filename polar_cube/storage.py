"""S3 storage through Prefect blocks: blocks -> s3fs options and URLs, access checks, saving.

The keys live in an `AwsCredentials` block (secret as a SecretStr) referenced by an
`S3Bucket` block; everything else here takes plain fsspec `storage_options`. No message
ever includes a secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from polar_cube.location import StoreLocation

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

_ACCESS_DENIED = frozenset(
    {"AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
)
_NO_BUCKET = frozenset({"NoSuchBucket"})


class StorageAccessError(RuntimeError):
    """S3 storage cannot be used: the message names the URL or block and the likely cause."""


def storage_options_from_blocks(bucket: S3Bucket) -> dict:
    """s3fs keyword arguments from an S3Bucket block and its credentials block."""
    credentials = bucket.credentials
    key, secret, token = _keys(credentials)
    params = credentials.aws_client_parameters
    client_kwargs = {"endpoint_url": params.endpoint_url, "region_name": credentials.region_name}
    client_kwargs = {k: v for k, v in client_kwargs.items() if v is not None}
    if params.api_version:
        client_kwargs["api_version"] = params.api_version
    verify = params.verify_cert_path or params.verify
    if verify is not None:
        client_kwargs["verify"] = verify if isinstance(verify, bool) else str(verify)
    options: dict = {"client_kwargs": client_kwargs}
    if key is not None:
        options |= {"key": key, "secret": secret}
    if token:
        options["token"] = token
    profile = getattr(credentials, "profile_name", None)
    if key is None and profile:
        options["profile"] = profile
    if not params.use_ssl:
        options["use_ssl"] = False
    if params.config:
        options["config_kwargs"] = dict(params.config)
    return options


def _keys(credentials) -> tuple[str | None, str | None, str | None]:
    """(access key, secret, session token) from AwsCredentials or MinIOCredentials."""
    if hasattr(credentials, "minio_root_user"):
        return (
            credentials.minio_root_user,
            credentials.minio_root_password.get_secret_value(),
            None,
        )
    secret = credentials.aws_secret_access_key
    return (
        credentials.aws_access_key_id,
        secret.get_secret_value() if secret is not None else None,
        credentials.aws_session_token,
    )


def bucket_url(bucket: S3Bucket, *parts: str) -> str:
    """`s3://<bucket>/<folder>/<parts...>`, without empty parts or doubled slashes."""
    pieces = [bucket.bucket_name, bucket.bucket_folder or "", *parts]
    return "s3://" + "/".join(p.strip("/") for p in pieces if p and p.strip("/"))


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
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    connection_errors = (EndpointConnectionError, ConnectTimeoutError, ConnectionError)
    return any(
        isinstance(candidate, connection_errors)
        for candidate in (error, error.__cause__, error.__context__)
    )


def save_blocks(
    *,
    bucket_block: str,
    credentials_block: str,
    bucket_name: str,
    endpoint_url: str | None,
    access_key: str,
    secret_key: str,
    region_name: str = "us-east-1",
    bucket_folder: str = "",
) -> None:
    """Save an AwsCredentials block and an S3Bucket block referencing it (overwriting both)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region_name,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url),
    )
    _save(credentials, credentials_block)
    bucket = S3Bucket(bucket_name=bucket_name, credentials=credentials, bucket_folder=bucket_folder)
    _save(bucket, bucket_block)


def _save(block, name: str) -> None:
    try:
        block.save(name, overwrite=True)
    except ValueError as error:  # e.g. a name that is not a lowercase slug
        raise StorageAccessError(f"cannot save block {name!r}: {error}") from None


def bucket_location(bucket_block: str) -> StoreLocation:
    """The bucket (and folder) of an S3Bucket block, with its credentials; access checked."""
    bucket = load_bucket(bucket_block)
    location = StoreLocation(bucket_url(bucket), storage_options_from_blocks(bucket))
    check_bucket_access(location.root, location.storage_options)
    return location


def load_bucket(bucket_block: str) -> S3Bucket:
    """Load the named S3Bucket block (with its credentials)."""
    from prefect_aws import S3Bucket

    try:
        return S3Bucket.load(bucket_block)
    except ValueError as error:
        if "Unable to find" not in str(error):
            raise
        raise StorageAccessError(
            f"no S3Bucket block named {bucket_block!r}; create it with `polar-cube blocks create`"
        ) from None
