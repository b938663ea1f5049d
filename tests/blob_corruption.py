"""Damaging a stored blob behind the object store's back (a flipped byte, a deleted object), on the local
directory or on S3 over HTTP (moto), for the tests of ``lorafleet verify`` and the scheduler's scrub."""

from __future__ import annotations

from typing import Any

from lorafleet.store.blob import BlobStore
from lorafleet.store.blob.local import LocalBlobStore
from lorafleet.store.blob.s3 import S3BlobStore


def flip_byte(blobs: BlobStore, sha256: str, *, s3_endpoint: str | None = None) -> None:
    """Flip one byte in the middle of a stored blob (same size, another digest)."""
    if isinstance(blobs, LocalBlobStore):
        path = blobs.path_for(sha256)
        data = bytearray(path.read_bytes())
        path.chmod(0o644)  # blobs are stored read-only
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    assert isinstance(blobs, S3BlobStore) and s3_endpoint is not None
    client = _s3(s3_endpoint)
    body = bytearray(client.get_object(Bucket=blobs.bucket, Key=blobs.key_for(sha256))["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=blobs.bucket, Key=blobs.key_for(sha256), Body=bytes(body))


def delete_blob(blobs: BlobStore, sha256: str) -> None:
    """Remove a stored blob (what only the garbage collector does)."""
    blobs.delete(sha256)


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
