"""One domain exception hierarchy; the service maps each class to an HTTP status in one place."""

from __future__ import annotations


class UniAdapterError(Exception):
    """Base class of every error this project raises on purpose."""


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
