"""The object store interface: content-addressed, immutable blobs.

A blob's key is derived from its sha256 (``<prefix>/sha256/ab/abcdef...``), so writing the same bytes twice
is a no-op and a blob is never overwritten. Reads verify the digest and size; only the garbage collector
deletes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    """Where a blob is and what it must hash to."""

    uri: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BlobInfo:
    """A listed blob: digest, size and when it was written (the GC's grace period counts from it)."""

    sha256: str
    size: int
    modified_at: datetime


def sha256_file(path: Path) -> tuple[str, int]:
    """Digest and size of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class BlobStore(ABC):
    """One interface for S3 and a local directory."""

    @abstractmethod
    def put_file(self, path: Path) -> BlobRef:
        """Store a file's bytes under their sha256 (atomically; no-op if present) and return the reference."""

    @abstractmethod
    def put_bytes(self, data: bytes) -> BlobRef:
        """Store bytes under their sha256 (atomically; no-op if present)."""

    @abstractmethod
    def get_bytes(self, sha256: str, *, expected_size: int | None = None) -> bytes:
        """Read and verify a blob; raise ``BlobNotFoundError`` or ``BlobIntegrityError``."""

    @abstractmethod
    def download(self, sha256: str, dest: Path, *, expected_size: int | None = None) -> Path:
        """Write a verified copy of a blob to ``dest`` (atomically) and return it."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob whose hex digest starts with ``prefix``."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove a blob. Only the garbage collector calls this."""

    @abstractmethod
    def uri_for(self, sha256: str) -> str:
        """The URI a version row records for this digest."""
