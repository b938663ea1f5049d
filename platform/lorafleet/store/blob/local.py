"""The object store on a local directory: ``<root>/sha256/ab/<hex>``, written atomically, verified on read.

A blob is written to a temp file in its shard directory, fsynced, then linked into place; a hard link fails
when the target exists, so a blob is never overwritten, even by a concurrent writer of the same bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from lorafleet.errors import BlobNotFoundError, BlobStoreError
from lorafleet.store.blob.base import (
    BlobBackend,
    BlobInfo,
    DigestCheck,
    blob_key,
    is_digest,
    iter_chunks,
    read_verified,
    write_verified,
)

# Errors of os.link that mean "this filesystem has no hard links", not "the write failed".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


@contextmanager
def _os_errors(action: str) -> Iterator[None]:
    """Translate filesystem failures (permissions, full disk) into ``BlobStoreError``."""
    try:
        yield
    except OSError as exc:
        raise BlobStoreError(f"local object store: cannot {action}: {exc}") from exc


class LocalBlobStore(BlobBackend):
    """Content-addressed blobs in a local directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        with _os_errors(f"create {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def path_for(self, sha256: str) -> Path:
        """The file a digest is stored in."""
        return self.root / blob_key(sha256)

    def uri_for(self, sha256: str) -> str:
        return self.path_for(sha256).as_uri()

    # --- writing -----------------------------------------------------------------------------------------
    def _reading(self, path: Path) -> AbstractContextManager[None]:
        return _os_errors(f"read {path}")

    def _write(self, sha256: str, size: int, open_source: Callable[[], BinaryIO], *, source: str) -> None:
        """Copy into a temp file in the shard directory, re-verify (the source may change), link into place."""
        target = self.path_for(sha256)
        with _os_errors(f"read {source}"), open_source() as f, _os_errors(f"write {target}"):
            check = DigestCheck(sha256, size)
            where = f"from {source} (changed while being stored?)"
            write_verified(iter_chunks(f), target, check, where, publish=_publish_once)
            _fsync_dir(target.parent)

    # --- reading -----------------------------------------------------------------------------------------
    def get_bytes(self, sha256: str, *, expected_size: int | None = None) -> bytes:
        path = self.path_for(sha256)
        with self._open(path) as f, _os_errors(f"read {path}"):
            return read_verified(iter_chunks(f), DigestCheck(sha256, expected_size), str(path))

    def download(self, sha256: str, dest: Path, *, expected_size: int | None = None) -> Path:
        path = self.path_for(sha256)
        with self._open(path) as f, _os_errors(f"copy {path} to {dest}"):
            return write_verified(iter_chunks(f), dest, DigestCheck(sha256, expected_size), str(path))

    @contextmanager
    def _open(self, path: Path) -> Iterator[BinaryIO]:
        """Open a stored blob, with a missing one reported as ``BlobNotFoundError``."""
        try:
            f = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFoundError(f"no blob {path.name} in {self.root}") from exc
        except OSError as exc:
            raise BlobStoreError(f"local object store: cannot open {path}: {exc}") from exc
        with f:
            yield f

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def _list(self, prefix: str) -> Iterator[BlobInfo]:
        base = self.root / "sha256"
        with _os_errors(f"list {base}"):
            shards = [d for d in _scandir(base) if d.is_dir() and _shard_matches(d.name, prefix)]
        for shard in shards:
            with _os_errors(f"list {shard.path}"):
                entries = _scandir(Path(shard.path))
            for entry in entries:
                if not (is_digest(entry.name) and entry.name.startswith(prefix)):
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                yield BlobInfo(
                    sha256=entry.name,
                    size=stat.st_size,
                    modified_at=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
                )

    # --- deleting ----------------------------------------------------------------------------------------
    def delete(self, sha256: str) -> None:
        path = self.path_for(sha256)
        with _os_errors(f"delete {path}"):
            path.unlink(missing_ok=True)


def _publish_once(tmp: Path, target: Path) -> None:
    """Make ``tmp`` read-only and put it at ``target`` unless a blob (same digest, same bytes) is there."""
    os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) & ~0o222)
    try:
        os.link(tmp, target)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if not target.exists():
            os.replace(tmp, target)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    """Directory entries sorted by name, or none if the directory does not exist yet."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []


def _shard_matches(name: str, prefix: str) -> bool:
    """Whether shard directory ``name`` (two hex characters) can hold digests starting with ``prefix``."""
    return len(name) == 2 and (name.startswith(prefix) if len(prefix) < 2 else name == prefix[:2])


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); platforms that cannot open a directory skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
