"""The errors that mean "bad input or a broken environment": shown to users as one clear line
(`polar-cube: error: …`, exit code 2), not a traceback."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OptionError(ValueError):
    """A command-line option is invalid; the message names the option."""


class TargetError(RuntimeError):
    """A target (folder or bucket prefix) cannot be written: full, read-only, not permitted."""


# errno -> what the user is told; anything else is not the user's to fix and keeps its traceback
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for this file system",
}


def environment_problem(error: BaseException) -> str | None:
    """What a full disk, read-only or forbidden target looks like to the user, else None."""
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        return _ENVIRONMENT_ERRNOS[error.errno]
    return None


@contextmanager
def writing_to(where: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only target or missing permissions met inside into a
    TargetError naming `where` (libraries often raise them without a file name)."""
    try:
        yield
    except OSError as error:
        problem = environment_problem(error)
        if problem is None:
            raise
        detail = (
            f" ({error.filename})" if error.filename and str(error.filename) != str(where) else ""
        )
        raise TargetError(f"{where}: cannot write: {problem}{detail}") from None


def read_input_file(path: Path, what: str, error: type[Exception]) -> str:
    """The text of a file the user named (`what`: "spec file", …); one that is missing or
    cannot be read raises `error` naming it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as problem:
        detail = problem.strerror if isinstance(problem, OSError) else "not a text file"
        raise error(f"{path}: cannot read the {what}: {detail}") from None


def describe_os_error(error: OSError) -> str:
    """One line for an OSError that reached the command line."""
    what = environment_problem(error) or error.strerror or str(error)
    return f"{error.filename}: {what}" if error.filename else what


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error class that is reported as one line (imported here, lazily, to keep this
    module free of the heavy ones)."""
    from polar_cube.cube.merge import MergeError
    from polar_cube.cube.patching import PatchError
    from polar_cube.cube.upload import UploadError
    from polar_cube.cube.verify import CubeCheckError
    from polar_cube.servers.mirror_service import MirrorServiceError
    from polar_cube.servers.s3server import S3ServerError
    from polar_cube.servers.viewer import ViewError
    from polar_cube.sources.archives import ArchiveError
    from polar_cube.sources.download import DownloadError
    from polar_cube.sources.readers import SourceFormatError
    from polar_cube.sources.staging import StagingError
    from polar_cube.spec import SpecError
    from polar_cube.storage import StorageAccessError
    from polar_cube.target_lock import TargetBusyError

    return (
        SpecError,
        OptionError,
        PatchError,
        SourceFormatError,
        DownloadError,
        ArchiveError,
        S3ServerError,
        StorageAccessError,
        TargetError,
        TargetBusyError,
        MergeError,
        UploadError,
        StagingError,
        CubeCheckError,
        ViewError,
        MirrorServiceError,
    )
