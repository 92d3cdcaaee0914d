"""What storage raises: one family under `StorageError`, each message naming the URL.

Raised by both backends (`local.py`, `s3.py`) and caught by callers, who import them from
`components/storage/storage.py`.
"""

from __future__ import annotations


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and what to do."""


class StorageUnavailable(StorageError):
    """The storage endpoint could not be reached after the configured retries."""


class AlreadyExists(StorageError, FileExistsError):
    """A create-only write found the object already there."""


class PreconditionFailed(StorageError):
    """A compare-and-swap write found a different version than the caller read."""


class NotFound(StorageError, FileNotFoundError):
    """The object does not exist."""
