"""The errors that mean "bad input": shown to users as one clear line, not a traceback."""

from polar_cube.archives import ArchiveError
from polar_cube.download import DownloadError
from polar_cube.operate import OpsError
from polar_cube.readers import SourceFormatError
from polar_cube.s3server import S3ServerError
from polar_cube.spec import SpecError
from polar_cube.storage import StorageAccessError

USER_ERRORS: tuple[type[Exception], ...] = (
    SpecError,
    SourceFormatError,
    DownloadError,
    ArchiveError,
    S3ServerError,
    StorageAccessError,
    OpsError,
)
