"""Content-addressed checkpoint store: delta files named by their sha256, under the data folder.

A file is written to a temporary name, fsynced, and renamed into place, so a crash never leaves
a half file under a real name; only then does the caller record it in the database. A crash in
between leaves an unreferenced file, which `gc` finds. Paths read back from the database are
resolved inside the store or refused, and every read verifies the sha256.

The folder may be a shared filesystem (NFS and the like: rename is atomic there too); for
S3-compatible object storage, `store_from_settings` returns `qfedit.object_store`'s store, which
keeps the same guarantees with what object storage offers in place of rename.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

    from qfedit.config import Settings

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
OBJECTS = "objects"
TMP = "tmp"


class StoreError(RuntimeError):
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


def check_suffix(suffix: str) -> None:
    # The suffix becomes part of a file name (and an object key): nothing that could add a folder.
    if not re.fullmatch(r"(\.[A-Za-z0-9]+)*", suffix):
        raise ValueError(f"suffix {suffix!r} must be like '.safetensors'")


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
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """Files under `root/objects/<aa>/<sha256><suffix>`; temporary files under `root/tmp`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- writing -------------------------------------------------------------------------

    def put_file(self, source: Path, suffix: str = ".safetensors") -> StoredObject:
        """Copy `source` into the store (hashing while copying) and return where it landed."""
        with Path(source).open("rb") as handle:
            return self._put_stream(handle, suffix)

    def put_bytes(self, data: bytes, suffix: str = ".safetensors") -> StoredObject:
        return self._put_stream(io.BytesIO(data), suffix)

    def put_tensors(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> StoredObject:
        """Serialise a delta (parameter name -> tensor) as safetensors and store it."""
        from safetensors.torch import save

        return self.put_bytes(save({name: t.contiguous() for name, t in tensors.items()}, metadata=metadata))

    def _put_stream(self, stream: BinaryIO, suffix: str) -> StoredObject:
        check_suffix(suffix)
        tmp_path, sha, size = spool(stream, self.root / TMP)
        try:
            relative = self.relative_path(sha, suffix)
            final = self.root / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same content, same name: replacing an existing copy is harmless and keeps this atomic.
            os.replace(tmp_path, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        logger.info("stored checkpoint %s (%d bytes)", relative, size)
        return StoredObject(sha256=sha, path=relative, size=size)

    @staticmethod
    def relative_path(sha256: str, suffix: str = ".safetensors") -> str:
        if not _SHA256.match(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex sha256")
        return f"{OBJECTS}/{sha256[:2]}/{sha256}{suffix}"

    # -- reading -------------------------------------------------------------------------

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored file; refuses anything that would leave `root/objects`."""
        candidate = Path(relative)
        objects = (self.root / OBJECTS).resolve()
        if candidate.is_absolute() or ".." in candidate.parts:
            raise StoreError(f"checkpoint path {relative!r} is not a relative path inside the store")
        resolved = (self.root / candidate).resolve()
        if not resolved.is_relative_to(objects):
            raise StoreError(f"checkpoint path {relative!r} resolves to {resolved}, outside {objects}")
        return resolved

    def read_bytes(self, relative: str, sha256: str) -> bytes:
        """The file's bytes, after checking they hash to `sha256` (ChecksumMismatch names the file)."""
        path = self.resolve(relative)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"checkpoint {path} is missing (recorded sha256 {sha256})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ChecksumMismatch(path, sha256, actual)
        return data

    def verify(self, relative: str, sha256: str) -> Path:
        """Hash the file in a stream (no full read into memory) and return its path if it matches."""
        path = self.resolve(relative)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            raise StoreError(f"checkpoint {path} is missing (recorded sha256 {sha256})") from None
        if digest.hexdigest() != sha256:
            raise ChecksumMismatch(path, sha256, digest.hexdigest())
        return path

    def load_tensors(self, relative: str, sha256: str) -> dict[str, torch.Tensor]:
        """A verified delta as tensors (safetensors, never pickle)."""
        from safetensors.torch import load

        return load(self.read_bytes(relative, sha256))

    # -- garbage collection -------------------------------------------------------------

    def iter_objects(self) -> Iterator[str]:
        objects = self.root / OBJECTS
        if not objects.is_dir():
            return
        for path in sorted(objects.rglob("*")):
            if path.is_file():
                yield path.relative_to(self.root).as_posix()

    def garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        """Stored files nothing references, plus stale temporary files, older than `min_age_s`.

        The age floor protects a file a worker has just renamed into place but not yet recorded
        in the database: that is the window the crash-safety ordering opens, and gc must not
        race it.
        """
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

    def remove(self, relative_paths: Iterable[str]) -> int:
        removed = 0
        for relative in relative_paths:
            parts = Path(relative).parts
            if parts and parts[0] == TMP and len(parts) == 2 and ".." not in parts:
                path = self.root / relative
            else:
                path = self.resolve(relative)
            path.unlink(missing_ok=True)
            logger.info("removed unreferenced %s", relative)
            removed += 1
        return removed


def store_from_settings(settings: Settings) -> CheckpointStore:
    """The store `settings` name: `QFEDIT_STORE_URL`, or the folder `QFEDIT_DATA_DIR/store`.

    A plain path or `file://` URL is a folder (local or a shared filesystem mounted on every
    host); any other URL (`s3://bucket/prefix`) is object storage through fsspec, imported only
    then so that the folder store needs none of it.
    """
    url = settings.store_url
    if not url:
        return CheckpointStore(settings.store_dir)
    scheme, separator, rest = url.partition("://")
    if not separator:
        return CheckpointStore(Path(url))
    if scheme == "file":
        return CheckpointStore(Path(rest))
    from qfedit.object_store import ObjectCheckpointStore

    options = dict(settings.store_options)
    if settings.store_endpoint_url:
        if scheme not in {"s3", "s3a"}:
            raise ValueError(f"QFEDIT_STORE_ENDPOINT_URL applies to s3:// stores, not {scheme}://")
        options.setdefault("endpoint_url", settings.store_endpoint_url)
    return ObjectCheckpointStore(url, cache_dir=settings.cache_dir / "store", storage_options=options)
