"""The content-addressed object store: one ``BlobStore`` interface, a local directory and S3 behind it.

``open_blob_store("file:///abs/path")`` or ``open_blob_store("s3://bucket/prefix")`` picks the backend.

Its room (docs/architecture.md): part of the store layer, on core only; the registry decides what a blob
holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from lorafleet.errors import ConfigError
from lorafleet.store.blob.base import BlobInfo, BlobRef, BlobStore, blob_key, sha256_file
from lorafleet.store.blob.local import LocalBlobStore
from lorafleet.store.blob.s3 import S3BlobStore

if TYPE_CHECKING:
    from lorafleet.config import Settings

__all__ = [
    "BlobInfo",
    "BlobRef",
    "BlobStore",
    "LocalBlobStore",
    "S3BlobStore",
    "blob_key",
    "open_blob_store",
    "open_blob_store_from_settings",
    "sha256_file",
]

_EXPECTED = "expected file:///absolute/path or s3://bucket/prefix"


def open_blob_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> BlobStore:
    """Open the store a URL names; ``endpoint_url`` and ``region`` apply to S3 only."""
    parsed = urlparse(url)
    if parsed.params or parsed.query or parsed.fragment:
        raise ConfigError(f"object store URL {url!r} must not have parameters, a query or a fragment")
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(f"object store URL {url!r} is not an absolute local path; {_EXPECTED}")
        return LocalBlobStore(Path(path))
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3 or "@" in parsed.netloc or ":" in parsed.netloc:
            raise ConfigError(f"object store URL {url!r} needs a bucket name of 3 or more characters")
        return S3BlobStore(parsed.netloc, unquote(parsed.path), endpoint_url=endpoint_url, region=region)
    raise ConfigError(f"unsupported object store URL {url!r}; {_EXPECTED}")


def open_blob_store_from_settings(settings: Settings) -> BlobStore:
    """Open the store the settings name (``LORAFLEET_OBJECT_STORE_URL``, ``_S3_ENDPOINT_URL``, ``_S3_REGION``)."""
    return open_blob_store(
        settings.resolved_object_store_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
