"""Creating the folders a config names (exp_dir, cache_dir), with one-line errors when the disk says no."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from hcpdiff.errors import ConfigError


def blocking_ancestor(path: Path) -> str:
    """Why `path` cannot be a folder: the nearest part of it that is a dangling link or a file ('' if none)."""
    for part in [*reversed(path.parents), path]:
        if part.is_symlink() and not part.exists():
            return f"'{part}' is a link to '{os.readlink(part)}', which does not exist"
        if part.exists() and not part.is_dir():
            return f"'{part}' is a file, not a folder"
    return ""


def os_error_reason(err: OSError) -> str:
    """A short reason for a failed folder creation, in words a user acts on."""
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOSPC:
        return "the disk is full"
    return err.strerror or type(err).__name__


def make_folder(path: str | os.PathLike, key: str) -> Path:
    """Create `path` and its parents (an existing folder is fine); ConfigError naming `key` and the path if the disk
    refuses, e.g. a dangling link, a file in the way or a read-only file system."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = blocking_ancestor(path) or os_error_reason(err)
        raise ConfigError(f"{key}: cannot create folder '{path}': {reason}") from err
    return path
