"""One way to write a file that readers never see half-written: a unique temporary file beside the
target, fsynced, renamed over it, and the folder fsynced (the rename itself survives a crash)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A fresh path to write in place of `target`; it replaces `target` when the block ends and is
    removed when the block raises. The name is unique, so writers racing for one target (workers
    sharing a cache) never write into each other's file: the last rename wins, whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(descriptor)
    partial = Path(name)
    try:
        yield partial
        _fsync_path(partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_path(target.parent, directory=True)
