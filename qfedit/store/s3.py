"""The checkpoint store on object storage (S3 and S3-compatible servers), through fsspec.

Same layout (`objects/<aa>/<sha256><suffix>` under the URL's prefix) and the same guarantees as
every `CheckpointStore`, with what object storage offers in place of rename:

- Publish: the content is first spooled to a local file and hashed, so its final key is known
  before anything is sent; then one upload creates the whole object under that key. On S3 a PUT
  is atomic, and so is a multipart upload, which becomes visible only when it is completed; a
  failed upload leaves nothing under a real key. On a filesystem without atomic writes the
  upload goes to `tmp/` first and is then moved into place, and `gc` finds what a crash left.
- Read: every read hashes what came back and refuses a mismatch (`ChecksumMismatch` names the
  URL). `verified_local_file` returns a path, for callers that hand a file on (`FileResponse`):
  a verified copy in a local cache folder, hashed again each time it is handed out.
- Paths from the database are checked as in every store (`object_parts`) before they become keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

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
from qfedit.store.local import LocalStore

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

# Filesystems where writing one object is all-or-nothing, so the final key can be written
# directly. Elsewhere (a plain filesystem reached through fsspec, SFTP, ...) a reader could see
# a half-written file, so uploads go through `tmp/` and a move.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "memory"})


def _modified(info: Mapping[str, Any]) -> float | None:
    """An object's modification time (epoch seconds) from an fsspec listing, if it has one."""
    # s3fs reports `LastModified`, the local filesystem `mtime`, the memory filesystem `created`.
    for field in ("LastModified", "mtime", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


class ObjectStore(CheckpointStore):
    """Checkpoints under an fsspec URL (`s3://bucket/prefix`), with a verified cache in `cache_dir`.

    `cache` is a `LocalStore` of copies this host wrote or downloaded; `verified_local_file`
    hands those out, hashed again each time, and fetches again whatever is damaged or gone.
    """

    def __init__(self, url: str, cache_dir: Path, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.cache = LocalStore(cache_dir)
        fs, base = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        self.fs: AbstractFileSystem = fs
        self.base: str = base.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.atomic_put = bool(ATOMIC_PUT_PROTOCOLS.intersection(protocols))

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, cache_dir={str(self.cache.root)!r})"

    def _key(self, relative: str) -> str:
        # Checked as every path from the database is; the key is built from the checked parts.
        return f"{self.base}/{'/'.join(object_parts(relative))}"

    def _url(self, relative: str) -> str:
        return f"{self.url}/{'/'.join(Path(relative).parts)}"

    def _relative(self, key: str) -> str:
        return key[len(self.base) + 1 :]

    # -- writing -------------------------------------------------------------------------

    def put_stream(self, stream: BinaryIO, suffix: str = ".safetensors") -> StoredObject:
        check_suffix(suffix)
        spooled, sha, size = spool(stream, self.cache.root / TMP)
        try:
            relative = self.relative_path(sha, suffix)
            key = self._key(relative)
            # Uploaded even when the key exists: the bytes are the same, and the fresh
            # modification time keeps `gc` (which spares young objects) from removing an old
            # orphan with this content in the moment before the caller records it.
            if self.atomic_put:
                self.fs.put_file(str(spooled), key)
            else:
                staging = f"{self.base}/{TMP}/{spooled.name}"
                # Real folders must exist first (object stores have none, so this is for them only).
                self.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
                self.fs.makedirs(posixpath.dirname(key), exist_ok=True)
                self.fs.put_file(str(spooled), staging)
                self.fs.mv(staging, key)
            # The writer keeps a verified copy: the process that made a delta often reads it next.
            local = self.cache.resolve(relative)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spooled, local)
        finally:
            spooled.unlink(missing_ok=True)
        logger.info("stored checkpoint %s (%d bytes)", self._url(relative), size)
        return StoredObject(sha256=sha, path=relative, size=size)

    # -- reading -------------------------------------------------------------------------

    def read_bytes(self, relative: str, sha256: str) -> bytes:
        key = self._key(relative)
        try:
            data = self.fs.cat_file(key)
        except FileNotFoundError:
            raise StoreError(
                f"checkpoint {self._url(relative)} is missing (recorded sha256 {sha256})"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ChecksumMismatch(self._url(relative), sha256, actual)
        return bytes(data)

    def verified_local_file(self, relative: str, sha256: str) -> Path:
        """The cached copy of the object, verified against `sha256`, downloaded if needed."""
        key = self._key(relative)
        local = self.cache.resolve(relative)
        if local.is_file():
            try:
                return self.cache.verified_local_file(relative, sha256)
            except StoreError as err:
                # The cache is disposable: a damaged or vanished copy is fetched again.
                logger.warning("cached copy unusable, fetching again: %s", err)
        try:
            with self.fs.open(key, "rb", block_size=CHUNK) as remote:
                spooled, actual, _ = spool(remote, self.cache.root / TMP)
        except FileNotFoundError:
            raise StoreError(
                f"checkpoint {self._url(relative)} is missing (recorded sha256 {sha256})"
            ) from None
        try:
            if actual != sha256:
                raise ChecksumMismatch(self._url(relative), sha256, actual)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spooled, local)
        finally:
            spooled.unlink(missing_ok=True)
        return local

    # -- garbage collection -------------------------------------------------------------

    def _listing(self, folder: str) -> dict[str, Mapping[str, Any]]:
        prefix = f"{self.base}/{folder}"
        # Another host may have written since this process listed; listings must be current.
        self.fs.invalidate_cache(prefix)
        try:
            found: dict[str, Mapping[str, Any]] = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {
            self._relative(key): info
            for key, info in sorted(found.items())
            if info.get("type") != "directory"
        }

    def iter_objects(self) -> Iterator[str]:
        yield from self._listing(OBJECTS)

    def garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        keep = {Path(p).as_posix() for p in referenced}
        cutoff = time.time() - min_age_s
        found: list[str] = []
        for folder in (OBJECTS, TMP):
            for relative, info in self._listing(folder).items():
                if folder == OBJECTS and relative in keep:
                    continue
                modified = _modified(info)
                if modified is None:
                    modified = self.fs.modified(f"{self.base}/{relative}").timestamp()
                if modified <= cutoff:
                    found.append(relative)
        return found

    def remove(self, relative_paths: Iterable[str], *, min_age_s: float | None = None) -> int:
        removed = 0
        for relative in relative_paths:
            name = tmp_name(relative)
            if name is not None:
                key, local = f"{self.base}/{TMP}/{name}", None
            else:
                key, local = self._key(relative), self.cache.resolve(relative)
            if min_age_s is not None:
                try:
                    modified = _modified(self.fs.info(key)) or self.fs.modified(key).timestamp()
                except FileNotFoundError:
                    continue
                if modified > time.time() - min_age_s:
                    logger.info("kept %s: written again since it was listed", self._url(relative))
                    continue
            with contextlib.suppress(FileNotFoundError):  # already gone: the goal state
                self.fs.rm_file(key)
            if local is not None:
                local.unlink(missing_ok=True)
            logger.info("removed unreferenced %s", self._url(relative))
            removed += 1
        return removed
