"""Content-addressed checkpoint store: an interface and implementations chosen by URL.

    store = open_store("s3://bucket/checkpoints", cache_dir=Path("cache"))
    store = store_from_settings(get_settings())          # QFEDIT_STORE_URL, or data_dir/store
    stored = store.put_bytes(delta.to_bytes())
    Delta.from_bytes(store.read_bytes(stored.path, stored.sha256))

- `base`: `CheckpointStore`, the interface and its guarantees (content addressed by sha256,
  atomic publication, verified reads, gc of unreferenced objects), and its errors.
- `local`: `LocalStore`, a folder (a plain path or `file://` URL), local or on a shared
  filesystem mounted on every host.
- `s3`: `ObjectStore`, S3 and S3-compatible object storage (any other fsspec URL), with a
  verified local cache; fsspec is imported only when such a store is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qfedit.errors import InvalidInputError
from qfedit.store.base import CheckpointStore, ChecksumMismatch, StoredObject, StoreError
from qfedit.store.local import LocalStore
from qfedit.store.s3 import ObjectStore

if TYPE_CHECKING:
    from qfedit.config import Settings

__all__ = [
    "CheckpointStore",
    "ChecksumMismatch",
    "LocalStore",
    "ObjectStore",
    "StoreError",
    "StoredObject",
    "open_store",
    "store_from_settings",
]

_ENDPOINT_SCHEMES = frozenset({"s3", "s3a"})


def open_store(
    url: str | Path,
    *,
    cache_dir: Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
    endpoint_url: str | None = None,
) -> CheckpointStore:
    """The store at `url`: a plain path or `file://` URL is a folder, anything else fsspec's.

    `cache_dir` (object storage only) holds verified local copies; `endpoint_url` names an
    S3-compatible server (`s3://` only); `storage_options` go to fsspec as they are.
    """
    scheme, separator, rest = str(url).partition("://")
    if not separator:
        return LocalStore(Path(url))
    if scheme == "file":
        return LocalStore(Path(rest))
    if cache_dir is None:
        raise InvalidInputError(f"{scheme}:// stores need a cache_dir for their verified local copies")
    options = dict(storage_options or {})
    if endpoint_url:
        if scheme not in _ENDPOINT_SCHEMES:
            raise InvalidInputError(f"QFEDIT_STORE_ENDPOINT_URL applies to s3:// stores, not {scheme}://")
        options.setdefault("endpoint_url", endpoint_url)
    return ObjectStore(str(url), cache_dir=cache_dir, storage_options=options)


def store_from_settings(settings: Settings) -> CheckpointStore:
    """The store `settings` name: `QFEDIT_STORE_URL`, or the folder `QFEDIT_DATA_DIR/store`."""
    if not settings.store_url:
        return LocalStore(settings.store_dir)
    return open_store(
        settings.store_url,
        cache_dir=settings.cache_dir / "store",
        storage_options=settings.store_options,
        endpoint_url=settings.store_endpoint_url,
    )
