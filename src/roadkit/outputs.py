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

from .fileio import PathLike, current_umask


class OutputExistsError(FileExistsError):
    """The output directory exists and replacing it was not asked for."""


def check_output(target: PathLike, overwrite: bool, inputs: Iterable[PathLike] = (), hint: str = "") -> str:
    """Validate an output directory before any work starts; returns its absolute path.

    Refuses a target that is a file, an existing directory unless `overwrite`, and a target that
    is or contains one of `inputs` (replacing it would delete what the command reads).
    """
    path = os.path.abspath(os.fspath(target))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"output {os.fspath(target)!r} is a file, not a directory.")
    if os.path.isdir(path) and not overwrite:
        raise OutputExistsError(f"output directory {os.fspath(target)!r} already exists; "
                                f"{hint or 'pass --overwrite to replace it'}.")
    for item in inputs:
        src = os.path.abspath(os.fspath(item))
        if os.path.exists(src) and (src == path or src.startswith(path + os.sep)):
            raise ValueError(f"output directory {os.fspath(target)!r} holds the input {os.fspath(item)!r}; "
                             "choose another output directory.")
    return path


@contextmanager
def staged_directory(target: PathLike, keep_existing: bool = False) -> Iterator[str]:
    """Yield an empty temporary directory beside `target`; on normal exit it replaces `target`.

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

