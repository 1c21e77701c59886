"""Files written whole or not at all: a crash or a full disk leaves the old file or the new one, never half."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` survive a power cut (the file's own fsync does not cover it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write a file whole or not at all: a temporary name, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
