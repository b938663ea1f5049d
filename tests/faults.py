"""Fault injection through collaborators: wrap what a production class is given, never patch the class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from lorafleet.store.blob import BlobInfo, BlobRef, BlobStore


class FaultyBlobs(BlobStore):
    """``inner`` with hooks around its writes: ``after_put_file(ref)`` once a ``put_file`` has written its blob
    (the registry's crash between blob and row), ``before_put_bytes(data)`` before a ``put_bytes`` writes (QA's
    report document: the first thing a decision writes). Raise in a hook to simulate a crash there."""

    def __init__(
        self,
        inner: BlobStore,
        *,
        after_put_file: Callable[[BlobRef], None] | None = None,
        before_put_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        self.inner = inner
        self.after_put_file = after_put_file
        self.before_put_bytes = before_put_bytes

    def put_file(self, path: Path) -> BlobRef:
        ref = self.inner.put_file(path)
        if self.after_put_file is not None:
            self.after_put_file(ref)
        return ref

    def put_bytes(self, data: bytes) -> BlobRef:
        if self.before_put_bytes is not None:
            self.before_put_bytes(data)
        return self.inner.put_bytes(data)

    def get_bytes(self, sha256: str, *, expected_size: int | None = None) -> bytes:
        return self.inner.get_bytes(sha256, expected_size=expected_size)

    def download(self, sha256: str, dest: Path, *, expected_size: int | None = None) -> Path:
        return self.inner.download(sha256, dest, expected_size=expected_size)

    def exists(self, sha256: str) -> bool:
        return self.inner.exists(sha256)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        return self.inner.list(prefix)

    def delete(self, sha256: str) -> None:
        self.inner.delete(sha256)

    def uri_for(self, sha256: str) -> str:
        return self.inner.uri_for(sha256)
