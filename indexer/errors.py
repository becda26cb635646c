"""Typed errors of Sleuth. Library code raises these; batch jobs record them; the API maps them to 4xx."""

from __future__ import annotations


class SleuthError(Exception):
    """Base class of every error Sleuth raises on purpose."""


# --- decoding -----------------------------------------------------------------------------------
class DecodeError(SleuthError):
    """The bytes are not an image Sleuth accepts. ``reason`` is a short machine-readable code."""

    reason = "decode_error"


class EmptyImageError(DecodeError):
    reason = "empty"


class ImageTooLargeError(DecodeError):
    reason = "too_large"


class DecompressionBombError(DecodeError):
    reason = "decompression_bomb"


class UnsupportedFormatError(DecodeError):
    reason = "unsupported_format"


class CorruptImageError(DecodeError):
    reason = "corrupt"


# --- sources and ingest ---------------------------------------------------------------------------
class SourceError(SleuthError):
    """A source (folder, manifest, shard) cannot be read or has an invalid row."""

    reason = "source_error"


class NotRegularFileError(SourceError):
    """A source path is a FIFO, socket, device or folder where a file was expected: never read."""

    reason = "not_regular"


class ReadTimeoutError(SourceError):
    """Reading a source file took longer than its deadline (``Limits.read_timeout_s``)."""

    reason = "read_timeout"


class IndexBusyError(SleuthError):
    """Another process holds the write lock of this data directory."""


class IndexMismatchError(SleuthError):
    """The SQL store and a vector index disagree."""


# --- models ------------------------------------------------------------------------------------
class ModelUnavailableError(SleuthError):
    """A configured model cannot be loaded (missing file, offline hub, bad id)."""


class UnsupportedQueryError(SleuthError):
    """The configured models cannot answer this kind of query (a text query without a CLIP text tower)."""


class UnsafeCheckpointError(SleuthError):
    """A checkpoint tried to execute code or reference a non-allowed global while being loaded."""


# --- API -----------------------------------------------------------------------------------------
class InvalidApiKeyError(SleuthError):
    """An API key is missing, malformed, unknown or revoked (HTTP 401)."""


class ForbiddenError(SleuthError):
    """The API key lacks the scope an action needs, or a path is outside the allowed roots (HTTP 403)."""


class OutsideRootsError(ForbiddenError, SourceError):
    """The file actually opened (after every symlink) lies outside the ingest roots (HTTP 403; an ingest item
    records it as a failure)."""

    reason = "outside_roots"


class ServerBusyError(SleuthError):
    """Every work slot (decode and inference in flight) is taken (HTTP 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFoundError(SleuthError):
    """A job, report, image or collection does not exist (HTTP 404)."""


class InsecureConfigError(SleuthError):
    """The server refuses to start: default or missing secrets outside development."""


class JobQueueError(SleuthError):
    """The job queue cannot be reached or a job cannot be run."""


class RateLimitedError(SleuthError):
    """A key sent more requests than its rate limit allows (HTTP 429); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
