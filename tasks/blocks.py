"""The S3 bucket of the build, from prefect-aws blocks: an `S3Bucket` block referencing an
`AwsCredentials` block (secret as a SecretStr) -> s3fs options, URLs and a `StoreLocation`.
Saving the two blocks. The rest of the project only sees plain `storage_options`."""

from __future__ import annotations

from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters

from polar_cube.location import StoreLocation
from polar_cube.storage import StorageAccessError, check_bucket_access

# botocore signs a PUT's body (SHA-256) when the endpoint is plain http, as a local SeaweedFS
# is: about 1 CPU-second per GB uploaded. The body is covered by the CRC32 checksum botocore
# sends with every PUT all the same, and over https botocore leaves it unsigned anyway.
UNSIGNED_PAYLOAD = {"payload_signing_enabled": False}


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
    config = dict(params.config or {})
    config["s3"] = UNSIGNED_PAYLOAD | dict(config.get("s3") or {})  # the block's own wins
    options["config_kwargs"] = config
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
    try:
        return S3Bucket.load(bucket_block)
    except ValueError as error:
        if "Unable to find" not in str(error):
            raise
        raise StorageAccessError(
            f"no S3Bucket block named {bucket_block!r}; create it with `polar-cube blocks create`"
        ) from None
