"""Output directories that appear whole or not at all.

A command writes into a fresh temporary directory beside its target and renames it into place
only when everything is written; on failure the temporary directory is removed. An existing
target is replaced only when asked (`overwrite`), and only after the new one is complete, so a
failed run never costs the user what they had.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..errors import InputError, RoadkitError
from ..fileio import PathLike, current_umask


class OutputExistsError(RoadkitError, FileExistsError):
    """The output directory exists and replacing it was not asked for."""


class OutputTakenError(OutputExistsError):
    """The output directory appeared while the command worked (another run wrote it); the new result
    was kept beside it, at `kept`."""

    def __init__(self, target: str, kept: str) -> None:
        super().__init__(
            f"output directory {target!r} was created by another run while this one worked; it was "
            f"left as it is, and this run's result was saved in {kept!r} instead."
        )
        self.kept = kept


def check_output(target: PathLike, overwrite: bool, inputs: Iterable[PathLike] = (), hint: str = "") -> str:
    """Validate an output directory before any work starts; returns its absolute path.

    Refuses a target that is a file, an existing directory unless `overwrite`, and a target that
    is or contains one of `inputs` (replacing it would delete what the command reads).
    """
    path = os.path.abspath(os.fspath(target))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"output {os.fspath(target)!r} is a file, not a directory.")
    if os.path.isdir(path) and not overwrite:
        raise OutputExistsError(
            f"output directory {os.fspath(target)!r} already exists; {hint or 'pass --overwrite to replace it'}."
        )
    for item in inputs:
        src = os.path.abspath(os.fspath(item))
        if os.path.exists(src) and (src == path or src.startswith(path + os.sep)):
            raise InputError(
                f"output directory {os.fspath(target)!r} holds the input {os.fspath(item)!r}; "
                "choose another output directory."
            )
        if os.path.isdir(src) and path.startswith(src + os.sep):
            raise InputError(
                f"output directory {os.fspath(target)!r} is inside the input directory "
                f"{os.fspath(item)!r}; choose an output outside it."
            )
    return path


@contextmanager
def staged_directory(target: PathLike, keep_existing: bool = False, replace: bool = True) -> Iterator[str]:
    """Yield an empty temporary directory beside `target`; on normal exit it replaces `target`.

    Without `replace` (the output was checked to be new when the command started), a `target` that
    exists by the end was written by someone else meanwhile: it is left alone, the new directory is
    kept as `<target>-2` (or -3, ...), and OutputTakenError says where.

    On an exception the temporary directory is removed and `target` is left as it was. The swap
    moves the old target aside, renames the new one in, then deletes the old one. With
    `keep_existing`, the entries of an existing `target` that the new directory lacks (files the
    user put there) are copied into it before the swap, so only the files written anew change.
    """
    path = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        if keep_existing and os.path.isdir(path):
            _copy_missing(path, staging)
            shutil.copymode(path, staging)
        else:
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; give what os.makedirs would
        if not replace:
            _move_in_or_beside(staging, path)
            return
        if not os.path.isdir(path):
            os.replace(staging, path)
            return
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        aside = os.path.join(old, name)
        os.replace(path, aside)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(aside, path)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_in_or_beside(staging: str, path: str) -> None:
    """Rename `staging` to `path` unless `path` exists; else to the first free `path-N` (N >= 2), and raise
    OutputTakenError naming it."""
    try:
        if os.path.lexists(path):
            raise FileExistsError(path)
        os.rename(staging, path)  # fails, rather than replaces, when another run's directory got there first
        return
    except OSError:
        if not os.path.lexists(path):
            raise
    for n in range(2, 10_000):
        kept = f"{path}-{n}"
        try:
            os.mkdir(kept)  # claims the name: another run choosing one at once gets FileExistsError
        except FileExistsError:
            continue
        os.replace(staging, kept)
        raise OutputTakenError(path, kept)
    raise OutputExistsError(f"output directory {path!r} exists, and so do {path}-2 to {path}-9999.")


def _copy_missing(source: str, destination: str) -> None:
    """Copy the entries of `source` that `destination` lacks (recursively inside directories both have)."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(destination, name)
        if os.path.isdir(src) and not os.path.islink(src):
            if os.path.isdir(dst) and not os.path.islink(dst):
                _copy_missing(src, dst)
            elif not os.path.lexists(dst):
                shutil.copytree(src, dst, symlinks=True)
        elif not os.path.lexists(dst):
            shutil.copy2(src, dst, follow_symlinks=False)
