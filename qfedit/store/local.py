"""The checkpoint store in a folder: local, or a shared filesystem mounted on every host.

A file is written to a temporary name under `root/tmp`, fsynced, and renamed into
`root/objects/<aa>/<sha256><suffix>`, so a crash never leaves a half file under a real name;
rename is atomic on NFS and the like too. Paths are resolved (symlinks included) and refused
unless they stay inside `root/objects`.

`gc` and `put` share a lock file, `root/.lock` (`flock`, which Linux maps onto NFS locks too):
`put` holds it shared while it renames an object into place, `remove` exclusive from an
object's age check to its delete, so a same-content put lands either before the check (the
object is young and kept) or after the delete (it is published again), never in between.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from qfedit.store.base import (
    CHUNK,
    OBJECTS,
    TMP,
    CheckpointStore,
    ChecksumMismatch,
    StoredObject,
    StoreError,
    check_suffix,
    object_parts,
    spool,
    tmp_name,
)

logger = logging.getLogger(__name__)

LOCK = ".lock"


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(CheckpointStore):
    """Files under `root/objects/<aa>/<sha256><suffix>`; temporary files under `root/tmp`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """The store's publish lock: shared for puts (which may overlap), exclusive for a delete."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- writing -------------------------------------------------------------------------

    def put_stream(self, stream: BinaryIO, suffix: str = ".safetensors") -> StoredObject:
        check_suffix(suffix)
        tmp_path, sha, size = spool(stream, self.root / TMP)
        try:
            relative = self.relative_path(sha, suffix)
            final = self.root / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same content, same name: replacing an existing copy is harmless and keeps this atomic;
            # the fresh file's modification time is what keeps gc off it until it is recorded.
            with self._lock(exclusive=False):
                os.replace(tmp_path, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        logger.info("stored checkpoint %s (%d bytes)", relative, size)
        return StoredObject(sha256=sha, path=relative, size=size)

    # -- reading -------------------------------------------------------------------------

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored file; refuses anything that would leave `root/objects`."""
        object_parts(relative)
        objects = (self.root / OBJECTS).resolve()
        resolved = (self.root / relative).resolve()
        if not resolved.is_relative_to(objects):  # a symlink out of the store
            raise StoreError(f"checkpoint path {relative!r} resolves to {resolved}, outside {objects}")
        return resolved

    def read_bytes(self, relative: str, sha256: str) -> bytes:
        path = self.resolve(relative)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"checkpoint {path} is missing (recorded sha256 {sha256})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ChecksumMismatch(path, sha256, actual)
        return data

    def verified_local_file(self, relative: str, sha256: str) -> Path:
        """The stored file itself, hashed in a stream (no full read into memory) first."""
        path = self.resolve(relative)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            raise StoreError(f"checkpoint {path} is missing (recorded sha256 {sha256})") from None
        if digest.hexdigest() != sha256:
            raise ChecksumMismatch(path, sha256, digest.hexdigest())
        return path

    # -- garbage collection -------------------------------------------------------------

    def iter_objects(self) -> Iterator[str]:
        objects = self.root / OBJECTS
        if not objects.is_dir():
            return
        for path in sorted(objects.rglob("*")):
            if path.is_file():
                yield path.relative_to(self.root).as_posix()

    def garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        keep = {Path(p).as_posix() for p in referenced}
        cutoff = time.time() - min_age_s
        found = [
            p for p in self.iter_objects() if p not in keep and (self.root / p).stat().st_mtime <= cutoff
        ]
        tmp_dir = self.root / TMP
        if tmp_dir.is_dir():
            found.extend(
                p.relative_to(self.root).as_posix()
                for p in sorted(tmp_dir.iterdir())
                if p.is_file() and p.stat().st_mtime <= cutoff
            )
        return found

    def remove(self, relative_paths: Iterable[str], *, min_age_s: float | None = None) -> int:
        removed = 0
        for relative in relative_paths:
            name = tmp_name(relative)
            path = self.root / TMP / name if name is not None else self.resolve(relative)
            # The age check and the delete are one step for `put`: see the module docstring.
            with self._lock(exclusive=True):
                if min_age_s is not None:
                    try:
                        if path.stat().st_mtime > time.time() - min_age_s:
                            logger.info("kept %s: written again since it was listed", relative)
                            continue
                    except FileNotFoundError:
                        continue
                path.unlink(missing_ok=True)
            logger.info("removed unreferenced %s", relative)
            removed += 1
        return removed
