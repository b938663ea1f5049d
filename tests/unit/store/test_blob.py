"""The object store on both backends: a local directory and S3 over HTTP (moto's server on loopback)."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lorafleet.config import Settings
from lorafleet.errors import (
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStoreError,
    ConfigError,
    NotFoundError,
    ValidationError,
)
from lorafleet.store.blob import (
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    open_blob_store,
    open_blob_store_from_settings,
)
from lorafleet.store.blob.s3 import make_s3_client

MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RawAccess:
    """Reads and writes a store's objects behind its back, to corrupt them and to look at them."""

    def __init__(self, store: BlobStore, s3_client: Any = None) -> None:
        self.store = store
        self.s3 = s3_client

    def write(self, sha256: str, data: bytes) -> None:
        if isinstance(self.store, LocalBlobStore):
            path = self.store.path_for(sha256)
            path.chmod(0o644)
            path.write_bytes(data)
        else:
            assert isinstance(self.store, S3BlobStore)
            self.s3.put_object(Bucket=self.store.bucket, Key=self.store.key_for(sha256), Body=data)

    def read(self, sha256: str) -> bytes:
        if isinstance(self.store, LocalBlobStore):
            return self.store.path_for(sha256).read_bytes()
        assert isinstance(self.store, S3BlobStore)
        obj = self.s3.get_object(Bucket=self.store.bucket, Key=self.store.key_for(sha256))
        return bytes(obj["Body"].read())

    def stamp(self, sha256: str) -> tuple[object, ...]:
        """Something that changes whenever the object is written again."""
        if isinstance(self.store, LocalBlobStore):
            st = self.store.path_for(sha256).stat()
            return (st.st_ino, st.st_mtime_ns)
        assert isinstance(self.store, S3BlobStore)
        head = self.s3.head_object(Bucket=self.store.bucket, Key=self.store.key_for(sha256))
        return (head["LastModified"], head["ETag"])


@pytest.fixture
def raw(blob_store: BlobStore, request: pytest.FixtureRequest) -> RawAccess:
    if isinstance(blob_store, S3BlobStore):
        return RawAccess(blob_store, make_s3_client(endpoint_url=request.getfixturevalue("moto_endpoint")))
    return RawAccess(blob_store, None)


# --- round trips and content addressing --------------------------------------------------------------------
def test_put_bytes_round_trip_is_content_addressed(blob_store: BlobStore, raw: RawAccess) -> None:
    data = os.urandom(3000)
    sha = _sha(data)

    ref = blob_store.put_bytes(data)

    assert (ref.sha256, ref.size) == (sha, len(data))
    assert ref.uri == blob_store.uri_for(sha)
    assert ref.uri.endswith(f"/sha256/{sha[:2]}/{sha}")
    assert raw.read(sha) == data
    assert blob_store.exists(sha)
    assert blob_store.get_bytes(sha) == data
    assert blob_store.get_bytes(sha, expected_size=len(data)) == data


def test_put_file_gives_the_same_ref_as_put_bytes(blob_store: BlobStore, tmp_path: Path) -> None:
    data = b"adapter weights" * 1000
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)

    assert blob_store.put_file(path) == blob_store.put_bytes(data)
    assert blob_store.get_bytes(_sha(data)) == data


def test_empty_blob(blob_store: BlobStore) -> None:
    ref = blob_store.put_bytes(b"")

    assert (ref.sha256, ref.size) == (_sha(b""), 0)
    assert blob_store.get_bytes(ref.sha256, expected_size=0) == b""


def test_reput_does_not_rewrite_the_object(blob_store: BlobStore, raw: RawAccess, tmp_path: Path) -> None:
    data = os.urandom(1000)
    ref = blob_store.put_bytes(data)
    before = raw.stamp(ref.sha256)
    path = tmp_path / "same.bin"
    path.write_bytes(data)

    assert blob_store.put_bytes(data) == ref
    assert blob_store.put_file(path) == ref
    assert raw.stamp(ref.sha256) == before

    raw.write(ref.sha256, b"tampered")  # if a re-put wrote, it would repair this
    assert blob_store.put_bytes(data) == ref
    assert raw.read(ref.sha256) == b"tampered"


def test_racing_writer_does_not_overwrite(
    blob_store: BlobStore, raw: RawAccess, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1000)
    ref = blob_store.put_bytes(data)
    raw.write(ref.sha256, b"written by the other writer")
    monkeypatch.setattr(
        blob_store, "exists", lambda sha256: False
    )  # as if the object appeared after the check

    assert blob_store.put_bytes(data) == ref
    assert raw.read(ref.sha256) == b"written by the other writer"


def test_concurrent_writers_of_the_same_bytes(blob_store: BlobStore) -> None:
    data = os.urandom(50_000)
    with ThreadPoolExecutor(max_workers=6) as pool:
        refs = set(pool.map(lambda _: blob_store.put_bytes(data), range(12)))

    assert len(refs) == 1
    assert [(info.sha256, info.size) for info in blob_store.list()] == [(_sha(data), len(data))]
    assert blob_store.get_bytes(_sha(data)) == data


def test_source_changing_while_stored_is_rejected(
    blob_store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = b"old contents", b"new contents"
    path = tmp_path / "moving.bin"
    path.write_bytes(new)
    monkeypatch.setattr("lorafleet.store.blob.base.sha256_file", lambda p: (_sha(old), len(old)))

    with pytest.raises(BlobIntegrityError, match="changed while being stored"):
        blob_store.put_file(path)
    assert not blob_store.exists(_sha(old))
    assert list(blob_store.list()) == []


# --- verification on read ----------------------------------------------------------------------------------
def test_corrupted_blob_raises_integrity_error(blob_store: BlobStore, raw: RawAccess, tmp_path: Path) -> None:
    data = os.urandom(2048)
    ref = blob_store.put_bytes(data)
    raw.write(ref.sha256, bytes([data[0] ^ 0xFF]) + data[1:])  # same size, one byte flipped

    with pytest.raises(BlobIntegrityError, match="corrupted"):
        blob_store.get_bytes(ref.sha256)
    with pytest.raises(BlobIntegrityError):
        blob_store.get_bytes(ref.sha256, expected_size=ref.size)
    with pytest.raises(BlobIntegrityError):
        blob_store.download(ref.sha256, tmp_path / "out.bin")


def test_truncated_blob_raises_integrity_error(blob_store: BlobStore, raw: RawAccess) -> None:
    data = os.urandom(2048)
    ref = blob_store.put_bytes(data)
    raw.write(ref.sha256, data[:-100])

    with pytest.raises(BlobIntegrityError):
        blob_store.get_bytes(ref.sha256)
    with pytest.raises(BlobIntegrityError, match="1948 bytes, expected 2048"):
        blob_store.get_bytes(ref.sha256, expected_size=ref.size)


def test_unexpected_size_raises_integrity_error(blob_store: BlobStore) -> None:
    ref = blob_store.put_bytes(b"twelve bytes")

    with pytest.raises(BlobIntegrityError, match="expected 13"):
        blob_store.get_bytes(ref.sha256, expected_size=13)


def test_missing_blob_raises_not_found(blob_store: BlobStore, tmp_path: Path) -> None:
    sha = _sha(b"never stored")

    assert not blob_store.exists(sha)
    with pytest.raises(BlobNotFoundError):
        blob_store.get_bytes(sha)
    with pytest.raises(NotFoundError):
        blob_store.download(sha, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("digest", ["", "abc", "../../etc/passwd", "A" * 64, "g" * 64, "a" * 65])
def test_malformed_digest_is_rejected(blob_store: BlobStore, digest: str) -> None:
    with pytest.raises(ValidationError):
        blob_store.get_bytes(digest)
    with pytest.raises(ValidationError):
        blob_store.delete(digest)


# --- download ----------------------------------------------------------------------------------------------
def test_download_writes_a_verified_copy(blob_store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)  # several read chunks
    ref = blob_store.put_bytes(data)
    dest = tmp_path / "nested" / "dir" / "adapter.safetensors"

    assert blob_store.download(ref.sha256, dest, expected_size=ref.size) == dest
    assert dest.read_bytes() == data

    dest.write_bytes(b"stale")  # an existing destination is replaced
    blob_store.download(ref.sha256, dest)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_failed_download_leaves_no_partial_file(
    blob_store: BlobStore, raw: RawAccess, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    ref = blob_store.put_bytes(data)
    raw.write(ref.sha256, data[: MiB + 1])  # truncated past the first chunk
    out = tmp_path / "out"
    out.mkdir()
    fresh, existing = out / "fresh.bin", out / "existing.bin"
    existing.write_bytes(b"previous version")

    with pytest.raises(BlobIntegrityError):
        blob_store.download(ref.sha256, fresh)
    with pytest.raises(BlobIntegrityError):
        blob_store.download(ref.sha256, existing, expected_size=ref.size)

    assert not fresh.exists()
    assert existing.read_bytes() == b"previous version"
    assert sorted(p.name for p in out.iterdir()) == ["existing.bin"]


# --- listing and deleting ----------------------------------------------------------------------------------
def test_list_by_prefix(blob_store: BlobStore) -> None:
    started = datetime.now(UTC) - timedelta(seconds=5)
    blobs = {}
    for i in range(24):
        data = os.urandom(10 + i)
        blobs[blob_store.put_bytes(data).sha256] = len(data)

    listed = list(blob_store.list())
    assert [info.sha256 for info in listed] == sorted(blobs)
    assert {info.sha256: info.size for info in listed} == blobs
    for info in listed:
        assert info.modified_at.tzinfo is not None
        assert started <= info.modified_at <= datetime.now(UTC) + timedelta(seconds=5)

    some = sorted(blobs)[7]
    for prefix in ["", some[:1], some[:2], some[:3], some]:
        expected = sorted(sha for sha in blobs if sha.startswith(prefix))
        assert [info.sha256 for info in blob_store.list(prefix)] == expected
    assert list(blob_store.list(_sha(b"never stored"))) == []


@pytest.mark.parametrize("prefix", ["AB", "xyz", "../", "a/b", "0" * 65])
def test_list_rejects_a_non_hex_prefix(blob_store: BlobStore, prefix: str) -> None:
    with pytest.raises(ValidationError):
        blob_store.list(prefix)


def test_delete(blob_store: BlobStore) -> None:
    kept = blob_store.put_bytes(b"kept")
    gone = blob_store.put_bytes(b"garbage")

    blob_store.delete(gone.sha256)

    assert not blob_store.exists(gone.sha256)
    with pytest.raises(BlobNotFoundError):
        blob_store.get_bytes(gone.sha256)
    assert [info.sha256 for info in blob_store.list()] == [kept.sha256]
    blob_store.delete(gone.sha256)  # a second collector racing is harmless
    assert blob_store.get_bytes(kept.sha256) == b"kept"
    assert blob_store.put_bytes(b"garbage") == gone  # and the bytes can come back
    assert blob_store.get_bytes(gone.sha256) == b"garbage"


# --- local directory ---------------------------------------------------------------------------------------
def test_local_layout_is_atomic_and_read_only(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    ref = store.put_bytes(b"local blob")
    path = tmp_path / "blobs" / "sha256" / ref.sha256[:2] / ref.sha256

    assert path.read_bytes() == b"local blob"
    assert ref.uri == path.as_uri()
    assert os.listdir(path.parent) == [ref.sha256]  # no temp files left behind
    assert path.stat().st_mode & 0o222 == 0


def test_local_list_ignores_foreign_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"real")
    shard = tmp_path / "sha256" / ref.sha256[:2]
    (shard / f".{ref.sha256}.abc.tmp").write_bytes(b"half written")
    (shard / "README").write_text("not a blob")
    (tmp_path / "sha256" / "zz").mkdir()

    assert [info.sha256 for info in store.list()] == [ref.sha256]


def test_local_store_without_hard_links_still_writes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"on a filesystem without hard links")
    before = store.path_for(ref.sha256).stat().st_ino

    assert store.put_bytes(b"on a filesystem without hard links") == ref
    assert store.get_bytes(ref.sha256) == b"on a filesystem without hard links"
    assert store.path_for(ref.sha256).stat().st_ino == before
    assert os.listdir(store.path_for(ref.sha256).parent) == [ref.sha256]


# --- S3 ----------------------------------------------------------------------------------------------------
def _mp_store(bucket: str, endpoint: str) -> S3BlobStore:
    return S3BlobStore(bucket, "mp", endpoint_url=endpoint, multipart_threshold=MiB, part_size=5 * MiB)


def test_s3_single_put_sends_sha256_checksum(s3_bucket: str, moto_endpoint: str) -> None:
    store = S3BlobStore(s3_bucket, "p", endpoint_url=moto_endpoint)
    ref = store.put_bytes(b"checked by the server")

    head = make_s3_client(endpoint_url=moto_endpoint).head_object(
        Bucket=s3_bucket, Key=store.key_for(ref.sha256), ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(ref.sha256)).decode()
    assert "-" not in head["ETag"]  # one PUT, not multipart


def test_s3_multipart_upload(s3_bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    store = _mp_store(s3_bucket, moto_endpoint)
    data = os.urandom(11 * MiB)
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)

    ref = store.put_file(path)

    client = make_s3_client(endpoint_url=moto_endpoint)
    head = client.head_object(Bucket=s3_bucket, Key=store.key_for(ref.sha256))
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB
    assert store.get_bytes(ref.sha256, expected_size=len(data)) == data
    assert store.download(ref.sha256, tmp_path / "copy.bin").read_bytes() == data
    assert store.put_bytes(data) == ref
    assert [(i.sha256, i.size) for i in store.list()] == [(ref.sha256, len(data))]


def test_s3_failed_multipart_upload_is_aborted(
    s3_bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _mp_store(s3_bucket, moto_endpoint)
    client = store._client
    real_upload_part = client.upload_part

    def failing_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "UploadPart")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", failing_upload_part)
    data = os.urandom(6 * MiB)

    with pytest.raises(BlobStoreError, match="InternalError"):
        store.put_bytes(data)
    assert not store.exists(_sha(data))
    assert (
        make_s3_client(endpoint_url=moto_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        == []
    )


def test_s3_racing_multipart_writer_does_not_overwrite(
    s3_bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _mp_store(s3_bucket, moto_endpoint)
    data = os.urandom(6 * MiB)
    ref = store.put_bytes(data)
    raw = RawAccess(store, make_s3_client(endpoint_url=moto_endpoint))
    raw.write(ref.sha256, b"the other writer")
    monkeypatch.setattr(store, "exists", lambda sha256: False)

    assert store.put_bytes(data) == ref
    assert raw.read(ref.sha256) == b"the other writer"
    assert raw.s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_s3_missing_bucket_is_a_store_error_not_a_missing_blob(moto_endpoint: str) -> None:
    store = S3BlobStore("lf-no-such-bucket", endpoint_url=moto_endpoint)

    with pytest.raises(BlobStoreError, match="NoSuchBucket") as excinfo:
        store.get_bytes(_sha(b"x"))
    assert not isinstance(excinfo.value, BlobNotFoundError)
    with pytest.raises(BlobStoreError, match="NoSuchBucket"):
        store.put_bytes(b"x")


def test_s3_unreachable_endpoint_raises_store_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3BlobStore(
        "bucket",
        "p",
        endpoint_url="http://127.0.0.1:9",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    sha = _sha(b"x")

    for call in (
        lambda: store.put_bytes(b"x"),
        lambda: store.get_bytes(sha),
        lambda: store.download(sha, tmp_path / "x"),
        lambda: store.exists(sha),
        lambda: list(store.list()),
        lambda: store.delete(sha),
    ):
        with pytest.raises(BlobStoreError, match="127.0.0.1:9"):
            call()


def test_s3_rejects_parts_below_the_s3_minimum() -> None:
    with pytest.raises(ConfigError, match="part_size"):
        S3BlobStore("bucket", part_size=MiB)


# --- opening a store from a URL ----------------------------------------------------------------------------
def test_open_file_url(tmp_path: Path) -> None:
    store = open_blob_store((tmp_path / "blobs").as_uri())

    assert isinstance(store, LocalBlobStore)
    assert store.root == (tmp_path / "blobs").resolve()
    assert (tmp_path / "blobs").is_dir()


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://my-bucket/a/b/", "my-bucket", "a/b"),
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://abc/", "abc", ""),
    ],
)
def test_open_s3_url(url: str, bucket: str, prefix: str) -> None:
    store = open_blob_store(url, endpoint_url="http://127.0.0.1:9")

    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (bucket, prefix)
    sha = _sha(b"")
    assert store.uri_for(sha) == f"s3://{bucket}/{prefix + '/' if prefix else ''}sha256/{sha[:2]}/{sha}"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relative/path",
        "/abs/path/without/scheme",
        "file://host/path",
        "file:relative",
        "http://example.com/blobs",
        "gs://bucket/prefix",
        "s3://",
        "s3://ab/prefix",
        "s3://bucket/prefix?versioning=1",
    ],
)
def test_open_bad_url_raises_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        open_blob_store(url)
    assert repr(url) in str(excinfo.value)


def test_open_from_settings(tmp_path: Path, s3_bucket: str, moto_endpoint: str) -> None:
    local = open_blob_store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalBlobStore)
    assert local.root == (tmp_path / "blobs").resolve()

    settings = Settings(object_store_url=f"s3://{s3_bucket}/fleet", s3_endpoint_url=moto_endpoint)
    remote = open_blob_store_from_settings(settings)
    ref = remote.put_bytes(b"via settings")
    assert ref.uri.startswith(f"s3://{s3_bucket}/fleet/sha256/")
    assert remote.get_bytes(ref.sha256) == b"via settings"
