"""The checkpoint store's interface: what every implementation guarantees, and the shared checks.

    store = open_store("s3://bucket/checkpoints", cache_dir=Path("cache"))   # or a folder
    stored = store.put_bytes(delta.to_bytes())           # StoredObject(sha256, path, size)
    data = store.read_bytes(stored.path, stored.sha256)  # the same bytes, or StoreError

The store holds bytes; what they mean (a delta, statistics, captured observations) is the
callers' business.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from qfedit.errors import PermanentError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
OBJECTS = "objects"
TMP = "tmp"


class StoreError(PermanentError):
    """A checkpoint that cannot be trusted: outside the store, missing, or not what was recorded."""


class ChecksumMismatch(StoreError):
    def __init__(self, path: Path | str, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"checkpoint {path}: sha256 is {actual}, but {expected} was recorded; the file is corrupt"
        )


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    path: str  # relative to the store root; what the database records
    size: int


class CheckpointStore(ABC):
    """Content-addressed objects under `objects/<aa>/<sha256><suffix>`, wherever the store keeps them.

    Every implementation guarantees:

    - Content addressing: an object's name is the sha256 of its bytes, so storing the same
      bytes twice gives the same `StoredObject`, and a name never changes meaning.
    - Atomic publication: an object appears under its name whole or not at all; a crash leaves
      at most an unreferenced object or a file under `tmp/`, never a partial object. Callers
      record an object in the database only after `put_*` returns.
    - Verified reads: every read hashes what it got and raises `ChecksumMismatch` (naming the
      file or URL) when it is not the recorded sha256, `StoreError` when the object is missing.
      Paths read back from the database are checked to stay inside `objects/` or refused.
    - Garbage collection: `garbage` lists objects nothing references, and stale `tmp/` files,
      older than an age floor; `remove` deletes them.
    """

    # -- writing -------------------------------------------------------------------------

    @abstractmethod
    def put_stream(self, stream: BinaryIO, suffix: str = ".safetensors") -> StoredObject:
        """Store what `stream` holds (hashed while it is copied, so nothing need fit in memory)."""

    def put_bytes(self, data: bytes, suffix: str = ".safetensors") -> StoredObject:
        return self.put_stream(io.BytesIO(data), suffix)

    @staticmethod
    def relative_path(sha256: str, suffix: str = ".safetensors") -> str:
        """Where an object with this content is stored, relative to the store's root."""
        if not _SHA256.match(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex sha256")
        return f"{OBJECTS}/{sha256[:2]}/{sha256}{suffix}"

    # -- reading -------------------------------------------------------------------------

    @abstractmethod
    def read_bytes(self, relative: str, sha256: str) -> bytes:
        """The object's bytes, after checking they hash to `sha256`."""

    @abstractmethod
    def verified_local_file(self, relative: str, sha256: str) -> Path:
        """A file on this host holding the object, hashed against `sha256` before it is returned.

        For callers that hand a file on (an HTTP download) rather than read it into memory.
        """

    # -- garbage collection -------------------------------------------------------------

    @abstractmethod
    def iter_objects(self) -> Iterator[str]:
        """The relative paths of all stored objects, sorted."""

    @abstractmethod
    def garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        """Objects not in `referenced`, plus stale temporary files, older than `min_age_s`.

        The age floor protects an object a writer has just published but not yet recorded in
        the database: that is the window the crash-safety ordering opens, and gc must not race it.
        """

    @abstractmethod
    def remove(self, relative_paths: Iterable[str], *, min_age_s: float | None = None) -> int:
        """Delete what `garbage` listed; the number removed. Paths outside the store are refused.

        With `min_age_s`, each file's age is checked again just before it goes: one written again
        since the listing (a writer about to record it) is kept. Where the storage has a lock
        (`LocalStore`), a same-content put cannot land between that check and the delete; object
        storage has none, so there a put in that instant can still lose its object."""


# -- shared checks and helpers ----------------------------------------------------------------


def check_suffix(suffix: str) -> None:
    # The suffix becomes part of a file name (and an object key): nothing that could add a folder.
    if not re.fullmatch(r"(\.[A-Za-z0-9]+)*", suffix):
        raise ValueError(f"suffix {suffix!r} must be like '.safetensors'")


def object_parts(relative: str) -> tuple[str, ...]:
    """The parts of a path read back from the database, refused unless it names something in `objects/`."""
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts:
        raise StoreError(f"checkpoint path {relative!r} is not a relative path inside the store")
    if len(parts) < 2 or parts[0] != OBJECTS:
        raise StoreError(f"checkpoint path {relative!r} is outside {OBJECTS}/")
    return parts


def tmp_name(relative: str) -> str | None:
    """The file name if `relative` is a temporary file (`tmp/<name>`, which gc may remove), else None."""
    parts = PurePosixPath(relative).parts
    if len(parts) == 2 and parts[0] == TMP and parts[1] != "..":
        return parts[1]
    return None


def spool(stream: BinaryIO, directory: Path) -> tuple[Path, str, int]:
    """Copy `stream` to a new temporary file in `directory`, fsynced; its path, sha256 and size.

    The caller owns the file (renames or removes it). Hashing while copying means the content's
    name is known before it is published anywhere.
    """
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(dir=directory, suffix=".part")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size
