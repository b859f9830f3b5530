"""Exceptions raised for bad stores and bad input. Messages name the file and the fix."""


class StoreError(Exception):
    """Base class of kdstore errors."""


class StoreFormatError(StoreError, ValueError):
    """The store (or a file in it) does not follow the format: wrong version, bad schema,
    unsafe path, out-of-range values."""


class IncompleteStoreError(StoreError, FileNotFoundError):
    """The store has no manifest: the write did not finish (or the path is wrong)."""


class CorruptShardError(StoreError, IOError):
    """A shard's bytes do not match the manifest (checksum, size, truncation)."""
