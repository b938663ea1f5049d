"""The object store interface: content-addressed, immutable blobs.

A blob's key is derived from its sha256 (``<prefix>/sha256/ab/abcdef...``), so writing the same bytes twice
is a no-op and a blob is never overwritten. Reads verify the digest and size; only the garbage collector
deletes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from lorafleet.errors import BlobIntegrityError, ValidationError

CHUNK = 1024 * 1024
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{0,64}")


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


def check_digest(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex characters; anything else could escape the key layout."""
    if not _HEX_DIGEST.fullmatch(sha256):
        raise ValidationError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def check_prefix(prefix: str) -> str:
    """Return a digest prefix for ``list`` if it is lowercase hex of at most 64 characters."""
    if not _HEX_PREFIX.fullmatch(prefix):
        raise ValidationError(f"not a sha256 hex prefix: {prefix!r}")
    return prefix


def is_digest(name: str) -> bool:
    """Whether a key's last component is a digest (temporary and foreign files are not)."""
    return _HEX_DIGEST.fullmatch(name) is not None


def blob_key(sha256: str) -> str:
    """The digest's key below a store's root: ``sha256/ab/abcdef...`` (256 shards keep listings small)."""
    check_digest(sha256)
    return f"sha256/{sha256[:2]}/{sha256}"


class DigestCheck:
    """Running sha256 and size of bytes as they stream past, checked against what they must be."""

    def __init__(self, sha256: str, expected_size: int | None = None) -> None:
        self.sha256 = check_digest(sha256)
        self.expected_size = expected_size
        self._digest = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)

    def verify(self, where: str) -> None:
        """Raise ``BlobIntegrityError`` naming ``where`` if the size or the digest is not the expected one."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise BlobIntegrityError(
                f"blob {where} is {self.size} bytes, expected {self.expected_size} (truncated or corrupted)"
            )
        actual = self._digest.hexdigest()
        if actual != self.sha256:
            raise BlobIntegrityError(f"blob {where} hashes to {actual}, expected {self.sha256} (corrupted)")


def read_verified(chunks: Iterable[bytes], check: DigestCheck, where: str) -> bytes:
    """Join streamed chunks into bytes, verifying them before anything is returned."""
    parts = []
    for chunk in chunks:
        check.update(chunk)
        parts.append(chunk)
    check.verify(where)
    return b"".join(parts)


def write_verified(
    chunks: Iterable[bytes],
    dest: Path,
    check: DigestCheck,
    where: str,
    *,
    publish: Callable[[Path, Path], None] = os.replace,
) -> Path:
    """Stream chunks into a temp file next to ``dest``, verify, fsync, then ``publish(tmp, dest)``.

    Nothing is left at ``dest`` (or next to it) when the bytes fail verification or the stream breaks, so a
    reader never sees a partial or unverified file. ``publish`` defaults to an atomic rename.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                check.update(chunk)
                f.write(chunk)
            check.verify(where)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _create_temp(dest: Path) -> tuple[Path, int]:
    """A new hidden file next to ``dest``, opened for writing with the umask's usual permissions."""
    while True:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue


def iter_chunks(f: BinaryIO, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Read a binary stream in chunks until it ends."""
    while chunk := f.read(chunk_size):
        yield chunk


class BlobStore(ABC):
    """One interface for S3 and a local directory (and for wrappers around either, which delegate every method)."""

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
    def exists(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored (its bytes are not verified)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob whose hex digest starts with ``prefix``, in digest order."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove a blob (a missing one is a no-op, as two collectors may race). Only the GC calls this."""

    @abstractmethod
    def uri_for(self, sha256: str) -> str:
        """The URI a version row records for this digest."""


class BlobBackend(BlobStore):
    """A store that holds the bytes itself: how a put and a listing go is decided here, once for every backend.

    A put hashes the bytes, skips a blob that is already stored, and otherwise has the backend ``_write`` them
    from a fresh stream, re-verified as it is read. A backend supplies ``_reading`` (its error for a source file
    it cannot read), ``_write`` (an atomic, never-overwriting write) and ``_list`` (given a checked prefix).
    """

    def put_file(self, path: Path) -> BlobRef:
        with self._reading(path):
            sha256, size = sha256_file(path)
        return self._put(sha256, size, lambda: path.open("rb"), source=str(path))

    def put_bytes(self, data: bytes) -> BlobRef:
        sha256 = hashlib.sha256(data).hexdigest()
        return self._put(sha256, len(data), lambda: io.BytesIO(data), source="bytes")

    def _put(self, sha256: str, size: int, open_source: Callable[[], BinaryIO], *, source: str) -> BlobRef:
        if not self.exists(sha256):
            self._write(sha256, size, open_source, source=source)
        return BlobRef(uri=self.uri_for(sha256), sha256=sha256, size=size)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        return self._list(check_prefix(prefix))  # a bad prefix fails here, not on first iteration

    @abstractmethod
    def _reading(self, path: Path) -> AbstractContextManager[None]:
        """Translate an ``OSError`` while hashing the file at ``path`` into ``BlobStoreError``."""

    @abstractmethod
    def _write(self, sha256: str, size: int, open_source: Callable[[], BinaryIO], *, source: str) -> None:
        """Store what ``open_source()`` streams under ``sha256`` unless a blob is there (atomically, never
        overwriting); raise ``BlobIntegrityError`` if the stream is not ``size`` bytes hashing to ``sha256``."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[BlobInfo]:
        """``list`` after ``prefix`` has been checked."""
