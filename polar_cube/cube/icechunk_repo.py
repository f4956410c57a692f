"""A cube published as an Icechunk repository: one commit per build, a tag per version.

`polar-cube build --format icechunk` publishes each new version of a zarr 3 series twice
over, without moving a chunk: the version's prefix `<series>-vX.Y.Z.zarr` as every build
writes it, and a commit of the repository `<series>.icechunk` whose chunks are *virtual
references* to that prefix's chunk objects (`commit_by_reference`: the metadata documents are
copied, a few kB; each chunk is a reference with its object's size and ETag, which Icechunk
checks on every read, so a chunk changed in place is refused, not served). The commit is
tagged `v<version>`. The references point into the location root, which the repository's
configuration names as its one virtual chunk container (`container_prefix`); readers
authorize it with the same credentials (`open_version`). Pruning a version deletes its tag
first (`delete_version_tags`); rolling back resets `main` to the version's tag
(`reset_to_version`).

Icechunk (https://icechunk.io) keeps a Zarr v3 hierarchy as immutable chunk objects plus
snapshots that list them. A build writes the cube through a writable session on the `main`
branch and commits it (`commit_version`); the commit becomes visible in one step (the branch
reference is replaced with a conditional write), so a reader, or a build killed half-way,
sees the whole previous version or the whole new one, never a mix. Each commit is tagged
with the cube's version (`v1.0.1`); tags are immutable. Readers open a tag, or the newest
commit on `main` (`open_version`). Chunks that a build does not rewrite stay shared by
reference between versions; chunks it rewrites are stored again even if their bytes did
not change (Icechunk does not deduplicate by content).

Layout of a repository at `<location root>/<key>`: `chunks/`, `manifests/`, `snapshots/`,
`transactions/` (all written once, never changed) and `refs/branch.main/ref.json`,
`refs/tag.<version>/ref.json`. Objects of an interrupted build are left unreferenced
(`Repository.garbage_collect` removes them); they never show in any version.

Settings for the project's S3 server (SeaweedFS, `polar_cube.servers.s3server`):
- `endpoint_url` from the storage options, `allow_http` for an http:// endpoint, path-style
  addressing (`force_path_style`: the bucket is not a host name) and a region (SeaweedFS
  ignores it; `us-east-1` unless the options name one, which also spares the AWS SDK a
  search for one in instance metadata).
- Nothing unsafe: SeaweedFS 4.x honours S3 conditional writes (`If-None-Match: *` and
  `If-Match: <etag>` answer 412 Precondition Failed), so Icechunk's default, safe storage
  settings work and are pinned here (`SAFE_STORAGE_SETTINGS`). Measured against it with
  eight concurrent commits on one parent: with these settings exactly one wins and the
  others get ConflictError; with `unsafe_use_conditional_update=False` and
  `unsafe_use_conditional_create=False` up to all eight "succeed" and all but one of them
  are silently lost. Never turn them off for SeaweedFS.

A local folder works too (`icechunk.local_filesystem_storage`) with Icechunk's own settings
for it: conditional updates and object metadata are off there (its file backend has neither;
asking for them makes every commit fail), so commits are not atomic against each other
(Icechunk warns so on stderr): one writer at a time. A writer killed mid-commit is still
safe, as every file is written whole and renamed into place.

Icechunk 2.x needs Python >= 3.12; this project (3.11) uses icechunk 1.1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import icechunk

from polar_cube.errors import PolarCubeError
from polar_cube.location import StoreLocation

if TYPE_CHECKING:
    import xarray as xr
    from icechunk import IcechunkStore

MAIN = "main"
if "ICECHUNK_LOG" not in os.environ:
    # Icechunk's (and its AWS SDK's) warnings go to stdout, into the commands' output: e.g.
    # that folders are unsafe for concurrent commits (the target's lock already keeps
    # writers apart), or a missing AWS config file. Errors still show; ICECHUNK_LOG=warn
    # brings them back.
    icechunk.set_logs_filter("error")
DEFAULT_REGION = "us-east-1"
# Icechunk's defaults on S3, pinned: conditional create (tags, new objects) and conditional
# update (the branch reference on commit) keep concurrent or killed commits consistent.
SAFE_STORAGE_SETTINGS = dict(
    unsafe_use_conditional_create=True,
    unsafe_use_conditional_update=True,
    unsafe_use_metadata=True,
)


class IcechunkError(PolarCubeError, RuntimeError):
    """An Icechunk repository cannot be opened, read or committed to; the message names it."""


def repository_url(location: StoreLocation, key: str) -> str:
    """The URL (or folder) of the repository `key` under `location`."""
    return location.url(key)


def icechunk_storage(location: StoreLocation, key: str) -> icechunk.Storage:
    """Icechunk storage for `<location root>/<key>`: an S3 prefix, reached with the
    location's fsspec storage options (`key`, `secret`, `token`, `anon`,
    `client_kwargs.endpoint_url` or `endpoint_url`, `client_kwargs.region_name`), or a
    local folder."""
    url = repository_url(location, key)
    if location.is_local:
        return icechunk.local_filesystem_storage(str(Path(location.path(key))))
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "s3a"):
        raise IcechunkError(
            f"{parts.scheme}:// is not supported for Icechunk repositories",
            culprit=url,
            hint="use an s3:// prefix or a local folder",
        )
    if not parts.netloc:
        raise IcechunkError("no bucket in the URL", culprit=url)
    return icechunk.s3_storage(
        bucket=parts.netloc, prefix=parts.path.strip("/") or None, **_s3_options(location)
    )


def _s3_options(location: StoreLocation) -> dict:
    """Keyword arguments of `icechunk.s3_storage` from fsspec/s3fs storage options."""
    options = location.storage_options
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = client_kwargs.get("endpoint_url") or options.get("endpoint_url")
    region = client_kwargs.get("region_name") or options.get("region_name")
    found: dict = {
        "region": region or (DEFAULT_REGION if endpoint else None),
        "endpoint_url": endpoint,
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "force_path_style": bool(endpoint),
    }
    if options.get("anon"):
        return found | {"anonymous": True}
    if options.get("key"):
        return found | {
            "access_key_id": options["key"],
            "secret_access_key": options.get("secret"),
            "session_token": options.get("token"),
        }
    if options.get("profile"):
        raise IcechunkError(
            "an AWS profile in the storage options is not supported for Icechunk",
            culprit=location.root,
            hint="give `key` and `secret`, or set the AWS_* environment variables",
        )
    return found | {"from_env": True}  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...


def repository_config(location: StoreLocation) -> icechunk.RepositoryConfig:
    """The configuration repositories under `location` are opened with: on S3 the safe
    settings, pinned (see the module docstring); in a local folder Icechunk's own defaults
    for it (it cannot do conditional updates nor object metadata there: asking for them makes
    every commit fail). Either way the location root is the one virtual chunk container."""
    if location.is_local:
        config = icechunk.RepositoryConfig.default()
        store = icechunk.local_filesystem_store(str(Path(location.path())))
    else:
        config = icechunk.RepositoryConfig(
            storage=icechunk.StorageSettings(**SAFE_STORAGE_SETTINGS)
        )
        options = _s3_options(location)
        store = icechunk.s3_store(
            region=options["region"],
            endpoint_url=options["endpoint_url"],
            allow_http=options["allow_http"],
            force_path_style=options["force_path_style"],
            s3_compatible=bool(options["endpoint_url"]),
        )
    config.set_virtual_chunk_container(
        icechunk.VirtualChunkContainer(container_prefix(location), store)
    )
    return config


def container_prefix(location: StoreLocation) -> str:
    """The URL prefix of the chunks a repository under `location` may reference: its root
    (`s3://bucket/prefix/`, or `file:///folder/`)."""
    if location.is_local:
        return Path(location.path()).as_uri().rstrip("/") + "/"
    return location.root.rstrip("/") + "/"


def _container_credentials(location: StoreLocation) -> dict:
    """Authorization to read the virtual chunks under `location`, with its own credentials."""
    if location.is_local:
        return {container_prefix(location): None}
    options = _s3_options(location)
    if options.get("anonymous"):
        credentials = icechunk.s3_credentials(anonymous=True)
    elif options.get("access_key_id"):
        credentials = icechunk.s3_credentials(
            access_key_id=options["access_key_id"],
            secret_access_key=options["secret_access_key"],
            session_token=options.get("session_token"),
        )
    else:
        credentials = icechunk.s3_credentials(from_env=True)
    return icechunk.containers_credentials({container_prefix(location): credentials})


def open_repository(location: StoreLocation, key: str, create: bool = True) -> icechunk.Repository:
    """The repository at `<location root>/<key>`, created (empty, with a `main` branch) if
    there is none and `create` is true; otherwise a missing one raises IcechunkError. Its
    virtual chunks under the location root are readable with the location's credentials."""
    url = repository_url(location, key)
    storage = icechunk_storage(location, key)
    config = repository_config(location)
    authorized = _container_credentials(location)
    with _reaching(url):
        if create:
            return icechunk.Repository.open_or_create(
                storage, config=config, authorize_virtual_chunk_access=authorized
            )
        if not icechunk.Repository.exists(storage):
            raise IcechunkError("no Icechunk repository here", culprit=url)
        return icechunk.Repository.open(
            storage, config=config, authorize_virtual_chunk_access=authorized
        )


def commit_version(
    repo: icechunk.Repository,
    write: Callable[[IcechunkStore], None],
    message: str,
    tag: str,
) -> str:
    """Write one version: open a writable session on `main`, let `write` fill its Zarr
    store (e.g. `ds.to_zarr(store, zarr_format=3, consolidated=False, mode="w")`), commit it
    with `message` and tag the commit `tag`. Returns the new snapshot id.

    A tag that exists already raises IcechunkError before anything is written (tags are
    immutable). A commit that lost the race against another one on `main` raises a
    retryable IcechunkError; nothing of it is visible then. If `write` raises, nothing is
    committed. If the process dies between the commit and the tag, `main` holds the new
    version untagged; committing it again under the tag is safe.
    """
    name = _name(repo)
    if tag in _tags(repo, name):
        raise _tag_exists(name, tag)
    with _reaching(name):
        session = repo.writable_session(MAIN)
    write(session.store)
    try:
        snapshot_id = session.commit(message)
    except icechunk.ConflictError as error:
        raise IcechunkError(
            f"another commit reached `{MAIN}` first ({_cause(error)}); version {tag} was "
            "not committed",
            culprit=name,
            hint="build it again",
            retryable=True,
        ) from None
    except icechunk.IcechunkError as error:
        if "no changes made" in str(error):
            raise IcechunkError(
                f"version {tag}: nothing was written, so there is nothing to commit",
                culprit=name,
            ) from None
        raise _wrapped(name, error) from None
    try:
        repo.create_tag(tag, snapshot_id)
    except icechunk.IcechunkError as error:
        if "tag already exists" in str(error):  # created meanwhile by someone else
            raise _tag_exists(name, tag) from None
        raise _wrapped(name, error) from None
    return snapshot_id


def commit_by_reference(
    location: StoreLocation, repo_key: str, cube_key: str, tag: str, message: str
) -> str | None:
    """Commit the zarr 3 cube at `<root>/<cube_key>` to the repository `repo_key` by
    reference, tagged `tag`: its metadata documents copied, each chunk object a virtual
    reference (size and ETag). The commit replaces the whole hierarchy on `main`.
    Returns the snapshot id, or None if `tag` exists already (committed by an earlier run:
    a rerun after a kill between commit and catalog, or an unchanged rebuild)."""
    repo = open_repository(location, repo_key)
    name = _name(repo)
    if tag in _tags(repo, name):
        return None
    objects = _cube_objects(location, cube_key)
    if "zarr.json" not in objects:
        raise IcechunkError(
            "not a zarr 3 cube (no zarr.json): Icechunk holds zarr 3 only",
            culprit=location.url(cube_key),
            hint="build with --format icechunk (zarr 3) or --zarr-format 3",
        )

    def write(store: IcechunkStore) -> None:
        from zarr.core.buffer import cpu
        from zarr.core.sync import sync

        async def replace_hierarchy() -> None:
            async for child in store.list_dir(""):  # the previous version's nodes
                if child != "zarr.json":
                    await store.delete_dir(child)
            documents = sorted(
                (k for k in objects if k.rsplit("/", 1)[-1] == "zarr.json"), key=_depth
            )
            for key in documents:  # groups before their arrays, arrays before chunks
                data = location.fs.cat_file(location.path(cube_key, key))
                await store.set(key, cpu.Buffer.from_bytes(data))
            for key, (size, etag) in objects.items():
                if key.rsplit("/", 1)[-1] != "zarr.json":
                    await store.set_virtual_ref_async(
                        key,
                        _object_url(location, cube_key, key),
                        offset=0,
                        length=size,
                        checksum=etag,
                    )

        sync(replace_hierarchy())

    return commit_version(repo, write, message, tag)


def _depth(key: str) -> tuple[int, str]:
    return key.count("/"), key


def _cube_objects(location: StoreLocation, cube_key: str) -> dict[str, tuple[int, str | None]]:
    """{key under the cube: (size, ETag or None)} of every object of the cube."""
    root = location.path(cube_key).rstrip("/")
    found = location.fs.find(root, detail=True)
    objects = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        etag = info.get("ETag")
        objects[path[len(root) + 1 :]] = (int(info["size"]), etag.strip('"') if etag else None)
    return objects


def _object_url(location: StoreLocation, cube_key: str, key: str) -> str:
    return container_prefix(location) + f"{cube_key.strip('/')}/{key}"


def reset_to_version(location: StoreLocation, repo_key: str, tag: str) -> bool:
    """Point `main` of the repository `repo_key` at version `tag` (a rollback); False if
    there is no such repository or tag (nothing to do)."""
    if not location.exists(repo_key):  # most series have none: Icechunk is not even asked
        return False
    storage = icechunk_storage(location, repo_key)
    if not icechunk.Repository.exists(storage):
        return False
    repo = open_repository(location, repo_key, create=False)
    name = _name(repo)
    if tag not in _tags(repo, name):
        return False
    with _reaching(name):
        repo.reset_branch(MAIN, repo.lookup_tag(tag))
    return True


def delete_version_tags(location: StoreLocation, repo_key: str, tags: list[str]) -> list[str]:
    """Delete the tags `tags` (the versions `prune` removes) where they exist; those deleted."""
    if not tags or not location.exists(repo_key):
        return []
    storage = icechunk_storage(location, repo_key)
    if not icechunk.Repository.exists(storage):
        return []
    repo = open_repository(location, repo_key, create=False)
    name = _name(repo)
    deleted = [tag for tag in tags if tag in _tags(repo, name)]
    with _reaching(name):
        for tag in deleted:
            repo.delete_tag(tag)
    return deleted


def list_versions(repo: icechunk.Repository) -> list[tuple[str, str]]:
    """(tag, snapshot id) of every version, oldest commit on `main` first (then by name)."""
    name = _name(repo)
    with _reaching(name):
        tagged = {tag: repo.lookup_tag(tag) for tag in repo.list_tags()}
        history = [snapshot.id for snapshot in repo.ancestry(branch=MAIN)]
    order = {snapshot_id: age for age, snapshot_id in enumerate(reversed(history))}
    return sorted(tagged.items(), key=lambda item: (order.get(item[1], len(order)), item[0]))


def open_version(location: StoreLocation, key: str, tag: str | None = None) -> xr.Dataset:
    """The cube of version `tag` (or the newest commit on `main` if None), opened lazily
    with xarray from a read-only session."""
    import xarray as xr

    repo = open_repository(location, key, create=False)
    name = _name(repo)
    if tag is not None and tag not in _tags(repo, name):
        known = ", ".join(t for t, _ in list_versions(repo)) or "none"
        raise IcechunkError(f"no version {tag} (versions: {known})", culprit=name)
    with _reaching(name):
        session = repo.readonly_session(MAIN) if tag is None else repo.readonly_session(tag=tag)
    return xr.open_zarr(session.store, consolidated=False, zarr_format=3)


# --- helpers -----------------------------------------------------------------------------------


def _name(repo: icechunk.Repository) -> str:
    """Where the repository is, for messages: s3://bucket/prefix or its folder (read from the
    storage's description, which holds no credentials; that whole description otherwise)."""
    described = str(repo.storage)
    s3 = re.search(r"bucket=([^,\s)]+), prefix=([^,\s)]*)", described)
    if s3:
        return "/".join(["s3:/", s3.group(1), *([s3.group(2)] if s3.group(2) else [])])
    folder = re.search(r"path=([^)]+)\)", described)
    return folder.group(1) if folder else described


def _tags(repo: icechunk.Repository, name: str) -> set[str]:
    with _reaching(name):
        return set(repo.list_tags())


def _tag_exists(name: str, tag: str) -> IcechunkError:
    return IcechunkError(
        f"version tag {tag!r} exists already",
        culprit=name,
        hint="tags are immutable: publish under a new version",
    )


@contextmanager
def _reaching(name: str) -> Iterator[None]:
    """Turn an Icechunk error met inside into an IcechunkError naming `name`."""
    try:
        yield
    except icechunk.IcechunkError as error:
        raise _wrapped(name, error) from None


def _wrapped(name: str, error: Exception) -> IcechunkError:
    cause = _cause(error)
    retryable = any(word in cause for word in ("dispatch failure", "timeout", "timed out"))
    return IcechunkError(cause, culprit=name, retryable=retryable)


_S3_ERROR = re.compile(r'code: "(\w+)", message: "([^"]*)"')


def _cause(error: Exception) -> str:
    """One line from Icechunk's multi-line error report: the object store's error code and
    message if there is one, else the innermost cause, else the first line."""
    text = str(error)
    flat = " ".join(text.split())
    found = _S3_ERROR.search(flat)
    if found:
        return f"{found.group(1)}: {found.group(2)}"
    causes = [line.split("->", 1)[1].strip() for line in text.splitlines() if "-> " in line]
    first = text.strip().splitlines()[0].strip() if text.strip() else type(error).__name__
    return causes[-1] if causes else first.removeprefix("x ").strip()
