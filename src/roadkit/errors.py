"""The errors roadkit raises on purpose: inputs it cannot use, files it cannot find, requirements not met.

`RoadkitError` is their base, so a caller (the `roadkit` command first of all) can tell a problem the
message explains to the user from a bug: the command prints a `RoadkitError` as one line, and anything
else as an unexpected error. Each concrete class also derives from the built-in exception that roadkit
raised before it existed (`ValueError`, `FileNotFoundError`, `OSError`), so `except ValueError` keeps
catching what it caught.
"""

from __future__ import annotations


class RoadkitError(Exception):
    """Base of the errors roadkit raises on purpose; the message says what is wrong and how to fix it."""


class InputError(RoadkitError, ValueError):
    """A value, setting or file content roadkit cannot use (a bad config, an adapter that does not fit)."""


class MissingFileError(RoadkitError, FileNotFoundError):
    """A file or directory roadkit needs does not exist (or is not what it should be)."""


class StorageError(RoadkitError, OSError):
    """Reading or writing files failed for a reason the message names (a full disk, a damaged file)."""
