"""User-facing errors: each message names the thing that is wrong and how to fix it (the CLI prints it in one line)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LatentkitError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(LatentkitError):
    """A config file, key, value or command-line override is invalid."""


class DataError(LatentkitError):
    """A dataset path, record or field is missing or malformed."""


class RegistryError(LatentkitError):
    """An unknown, broken or duplicate method, or a segment kind name that is invalid or clashes."""


class CheckpointError(LatentkitError):
    """A checkpoint or run directory is missing, incomplete or from another method."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an OS error raised inside that names no file (a full disk fails a write without one)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
