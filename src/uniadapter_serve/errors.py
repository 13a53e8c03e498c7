"""One domain exception hierarchy; the service maps each class to an HTTP status in one place."""

from __future__ import annotations


class UniAdapterError(Exception):
    """Base class of every error this project raises on purpose."""


class BackboneMismatchError(UniAdapterError):
    """The backbone does not reproduce its golden record on this device and dtype: the server stays unready."""


class ConfigError(UniAdapterError):
    """A configuration value is invalid; the message names the value and the accepted range."""


class CheckpointError(UniAdapterError):
    """A backbone source (folder, file, hub id) cannot be read or does not match its config."""


class AdapterError(UniAdapterError):
    """Base class of adapter-set errors."""


class AdapterFormatError(AdapterError):
    """An adapter-set folder is malformed: missing files, bad JSON, corrupt safetensors."""


class AdapterIncompatibleError(AdapterError):
    """An adapter set does not fit the backbone (fingerprint or tensor shape mismatch)."""


class GoldenMismatchError(AdapterError):
    """A set (or the backbone) does not reproduce its golden record on this device and dtype."""


class GoldenRecordError(AdapterFormatError):
    """A golden.json that cannot be read (malformed, too large, wrong shapes)."""


class AdapterNotFoundError(AdapterError):
    """No adapter set of that name exists."""


class AdapterVersionNotFoundError(AdapterError):
    """The adapter set exists but not at the requested version."""


class AdapterCapacityError(AdapterError):
    """A load needs room but every resident set is pinned or in use (or the set exceeds the budget)."""


class AdapterInUseError(AdapterError):
    """The set cannot be unloaded now: it is pinned or a running batch uses it."""


class InputError(UniAdapterError):
    """A request carries input the model cannot take (bad shape, unsupported task for a set)."""


class MediaError(InputError):
    """Uploaded media cannot be used."""


class EmptyMediaError(MediaError):
    """A 0-byte upload."""


class UnsupportedMediaTypeError(MediaError):
    """Not a media type this route takes (declared or sniffed)."""


class MediaTooLargeError(MediaError):
    """Over a limit: bytes, pixels (decompression bombs), duration or frames."""


class CorruptMediaError(MediaError):
    """Looks like a supported type but does not decode (truncated, damaged)."""


class MalformedUploadError(InputError):
    """An uploaded file that is not media is malformed (e.g. an adapter set's config or weights)."""


class TextTooLongError(InputError):
    """A question or query over the configured length."""


class NotFoundError(UniAdapterError):
    """A named resource (collection, item) does not exist."""


class ConflictError(UniAdapterError):
    """The request conflicts with the current state (duplicate id, wrong kind of adapter set)."""


class OverloadedError(UniAdapterError):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusyError(UniAdapterError):
    """A shared resource (e.g. the decode memory budget) stayed busy; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceededError(UniAdapterError):
    """The request's deadline passed before its work finished."""


class AuthError(UniAdapterError):
    """Missing (401) or wrong (403) API key."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
