"""The project's base error, and the errors that mean "bad input or a broken environment":
shown to users as one clear line (`polar-cube: error: …`, exit code 2), not a traceback.

Every module declares its own errors on `PolarCubeError`, where it raises them; the command
line and the flows catch the base. This module imports nothing from the project.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PolarCubeError(Exception):
    """Bad input or a broken environment, reported as one line (not a traceback).

    `culprit`: what the error is about (a file, URL, spec field, option or object key), put
    in front of the message unless the message already starts with it. `hint`: what to do
    about it, appended. `retryable`: whether trying again later may help (a server that was
    unreachable), as opposed to bad input that no retry will fix.
    """

    def __init__(
        self,
        message: str,
        *,
        culprit: str | None = None,
        hint: str | None = None,
        retryable: bool = False,
    ) -> None:
        if culprit and not message.startswith(culprit):
            message = f"{culprit}: {message}"
        if hint:
            message = f"{message}; {hint}"
        super().__init__(message)
        self.culprit = culprit
        self.hint = hint
        self.retryable = retryable


class OptionError(PolarCubeError, ValueError):
    """A command-line option is invalid; the message names the option."""


class TargetError(PolarCubeError, RuntimeError):
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


def size_text(count: float) -> str:
    """A byte count as people read it: `785 bytes`, `1.1 GB`."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} TB"
