"""The object-store checkpoint store against a real S3 endpoint (moto's server over HTTP).

The same guarantees as the folder store: content-addressed publish that never leaves a partial
object under a real key, sha256 checked on every read, paths confined to `objects/`, gc.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qfedit.config import Settings
from qfedit.delta import Delta
from qfedit.store import ChecksumMismatch, LocalStore, ObjectStore, StoreError, store_from_settings

pytest.importorskip("s3fs")


@pytest.fixture
def bucket_url(s3_endpoint: str, s3_credentials: dict[str, Any]) -> str:
    """A new bucket per test, with a prefix, so tests share the server but not objects."""
    import s3fs

    name = f"qfedit-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True, **s3_credentials).mkdir(name)
    return f"s3://{name}/checkpoints"


def _store(url: str, endpoint: str, cache: Path) -> ObjectStore:
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return ObjectStore(url, cache_dir=cache, storage_options=options)


@pytest.fixture
def store(bucket_url: str, s3_endpoint: str, tmp_path: Path) -> ObjectStore:
    return _store(bucket_url, s3_endpoint, tmp_path / "cache-a")


def test_put_and_load_round_trip_by_content(store: ObjectStore) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    data = Delta({name: torch.randn(3, 5)}, base_fingerprint="f" * 64, metadata={"layer": 1}).to_bytes()
    stored = store.put_bytes(data)
    assert stored.path == f"objects/{stored.sha256[:2]}/{stored.sha256}.safetensors"
    assert store.fs.cat_file(f"{store.base}/{stored.path}") == data
    assert store.read_bytes(stored.path, stored.sha256) == data
    assert store.put_bytes(data) == stored  # same bytes, same object
    assert list(store.iter_objects()) == [stored.path]
    assert not list((store.cache.root / "tmp").iterdir())  # no spool file left behind


def test_another_host_reads_what_one_wrote(
    store: ObjectStore, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    stored = store.put_bytes(b"delta bytes")
    # A second host: its own cache folder, nothing local, only the bucket in common.
    other = _store(bucket_url, s3_endpoint, tmp_path / "cache-b")
    assert other.read_bytes(stored.path, stored.sha256) == b"delta bytes"
    path = other.verified_local_file(stored.path, stored.sha256)
    assert path.is_relative_to(tmp_path / "cache-b") and path.read_bytes() == b"delta bytes"
    assert path == other.cache.resolve(stored.path)
    assert other.verified_local_file(stored.path, stored.sha256) == path  # the cached copy, checked again


def test_a_corrupt_object_is_an_error_naming_it(
    store: ObjectStore, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    stored = store.put_bytes(b"delta bytes")
    store.fs.pipe_file(f"{store.base}/{stored.path}", b"delta bytez")
    with pytest.raises(ChecksumMismatch, match=f"{bucket_url}/{stored.path}"):
        store.read_bytes(stored.path, stored.sha256)
    fresh = _store(bucket_url, s3_endpoint, tmp_path / "cache-b")
    with pytest.raises(ChecksumMismatch, match="corrupt"):
        fresh.verified_local_file(stored.path, stored.sha256)
    assert not fresh.cache.resolve(stored.path).exists()  # a bad download never becomes a cached copy
    assert not list((fresh.cache.root / "tmp").iterdir())
    store.fs.rm_file(f"{store.base}/{stored.path}")
    with pytest.raises(StoreError, match="missing"):
        store.read_bytes(stored.path, stored.sha256)
    with pytest.raises(StoreError, match="missing"):
        fresh.verified_local_file(stored.path, stored.sha256)


def test_a_damaged_cached_copy_is_fetched_again(store: ObjectStore) -> None:
    stored = store.put_bytes(b"delta bytes")
    cached = store.cache.resolve(stored.path)
    cached.write_bytes(b"bit rot")
    assert store.verified_local_file(stored.path, stored.sha256).read_bytes() == b"delta bytes"


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../outside.safetensors", "objects/../../x", "tmp/abc.part", "x"]
)
def test_paths_never_leave_the_objects_prefix(store: ObjectStore, bad: str) -> None:
    sha = "0" * 64
    with pytest.raises(StoreError):
        store.read_bytes(bad, sha)
    with pytest.raises(StoreError):
        store.verified_local_file(bad, sha)
    if bad != "tmp/abc.part":  # the one name gc may remove outside objects/
        with pytest.raises(StoreError):
            store.remove([bad])


def test_a_failed_upload_leaves_no_object(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unplugged(io.RawIOBase):
        """A source that fails half way: nothing may be sent, since the hash is not known yet."""

        def __init__(self) -> None:
            self.sent = False

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            if self.sent:
                raise OSError("source lost")
            self.sent = True
            buffer[:4] = b"half"
            return 4

    with pytest.raises(OSError, match="source lost"):
        store.put_stream(Unplugged())  # type: ignore[arg-type]

    def network_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("network down")

    monkeypatch.setattr(store.fs, "put_file", network_down)
    with pytest.raises(ConnectionError):
        store.put_bytes(b"whole")
    monkeypatch.undo()
    assert list(store.iter_objects()) == []
    assert not list((store.cache.root / "tmp").iterdir())
    assert not (store.cache.root / "objects").exists()


def test_a_multipart_upload_cut_off_midway_publishes_nothing(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large checkpoints go up in parts; S3 shows the object only once every part is in."""
    from fsspec.callbacks import Callback

    # s3fs reports progress after each uploaded part. Had it sent one PUT instead, this would
    # fire after the object was published and the final assertion would fail.
    class CutAfterFirstPart(Callback):
        def relative_update(self, inc: int = 1) -> None:
            super().relative_update(inc)
            raise ConnectionError("connection reset after the first part")

    original = store.fs.put_file
    part = 5 * 1024 * 1024  # S3's smallest part

    def multipart(lpath: str, rpath: str, **kwargs: Any) -> None:
        original(lpath, rpath, chunksize=part, callback=CutAfterFirstPart(), **kwargs)

    monkeypatch.setattr(store.fs, "put_file", multipart)
    data = torch.randint(0, 255, (3 * part,), dtype=torch.uint8).numpy().tobytes()
    with pytest.raises(ConnectionError):
        store.put_bytes(data, suffix=".bin")
    monkeypatch.undo()
    assert list(store.iter_objects()) == []


def test_gc_lists_only_old_unreferenced_objects(store: ObjectStore) -> None:
    kept, orphan = store.put_bytes(b"kept"), store.put_bytes(b"orphan")
    store.fs.pipe_file(f"{store.base}/tmp/dead.part", b"x")  # an upload a crash left behind
    # S3 sets modification times itself, so age is tested through the threshold instead.
    assert store.garbage({kept.path}) == []  # all young: a writer may be about to record them
    garbage = store.garbage({kept.path}, min_age_s=0)
    assert garbage == [orphan.path, "tmp/dead.part"]
    assert store.remove(garbage) == 2
    assert list(store.iter_objects()) == [kept.path]
    assert not store.cache.resolve(orphan.path).exists()  # its cached copy went too
    assert store.garbage({kept.path}, min_age_s=0) == []
    with pytest.raises(StoreError):
        store.remove(["../../etc/passwd"])


def test_without_atomic_writes_uploads_go_through_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local folder through fsspec: a write there is not atomic, so it is staged and moved."""
    store = ObjectStore(f"file://{tmp_path / 'remote'}", cache_dir=tmp_path / "cache")
    assert not store.atomic_put
    stored = store.put_bytes(b"delta bytes")
    assert (tmp_path / "remote" / stored.path).read_bytes() == b"delta bytes"

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("crash before the move")

    monkeypatch.setattr(store.fs, "mv", crash)
    with pytest.raises(OSError, match="crash before the move"):
        store.put_bytes(b"second")
    monkeypatch.undo()
    assert list(store.iter_objects()) == [stored.path]
    (staged,) = store.garbage({stored.path}, min_age_s=0)
    assert staged.startswith("tmp/")
    assert store.remove([staged]) == 1
    assert store.garbage({stored.path}, min_age_s=0) == []


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in ("QFEDIT_STORE_URL", "QFEDIT_STORE_ENDPOINT_URL", "QFEDIT_STORE_OPTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    yield


@pytest.mark.usefixtures("clean_env")
def test_store_from_settings_picks_the_backend_by_url(
    tmp_path: Path, bucket_url: str, s3_endpoint: str, s3_credentials: dict[str, Any]
) -> None:
    default = store_from_settings(Settings(data_dir=tmp_path / "data"))
    assert type(default) is LocalStore and default.root == tmp_path / "data" / "store"
    shared = store_from_settings(Settings(data_dir=tmp_path, store_url=str(tmp_path / "nfs")))
    assert type(shared) is LocalStore and shared.root == tmp_path / "nfs"
    as_url = store_from_settings(Settings(data_dir=tmp_path, store_url=f"file://{tmp_path / 'nfs'}"))
    assert type(as_url) is LocalStore and as_url.root == tmp_path / "nfs"

    settings = Settings(
        data_dir=tmp_path / "data",
        store_url=bucket_url,
        store_endpoint_url=s3_endpoint,
        store_options=s3_credentials,
    )
    remote = store_from_settings(settings)
    assert isinstance(remote, ObjectStore) and remote.cache.root == tmp_path / "data" / "cache" / "store"
    stored = remote.put_bytes(b"via settings")
    assert remote.read_bytes(stored.path, stored.sha256) == b"via settings"

    with pytest.raises(ValueError, match="s3://"):
        store_from_settings(Settings(store_url="memory://x", store_endpoint_url=s3_endpoint))


@pytest.mark.usefixtures("clean_env")
def test_store_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFEDIT_STORE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("QFEDIT_STORE_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("QFEDIT_STORE_OPTIONS", '{"client_kwargs": {"region_name": "eu-west-1"}}')
    settings = Settings()
    assert settings.store_url == "s3://bucket/prefix"
    assert settings.store_endpoint_url == "http://minio:9000"
    assert settings.store_options == {"client_kwargs": {"region_name": "eu-west-1"}}
