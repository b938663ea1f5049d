"""Re-hashing the blobs versions point at: is each still the bytes its row recorded (sha256 and size)?

A blob is verified on every read, so a flipped byte is found the first time something loads it (a generation
answers 502); ``BlobVerifier`` finds it before that. It streams a blob through the object store's verified
``download`` (the same digest and size check a read makes) into a temporary file that is removed at once, so a
blob of any size is checked in bounded memory. Versions are content-addressed, so several versions can share one
blob: a verifier remembers what each digest gave and reads each blob once.

What to do about a bad blob (quarantine the version, move its alias) is a workflow's decision:
``lorafleet.workflows.blob_verify``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafleet.domain import AdapterVersion, BlobCheck
from lorafleet.errors import BlobIntegrityError, BlobNotFoundError, BlobStoreError, ValidationError
from lorafleet.store.blob.base import BlobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobFinding:
    """What one blob check found: ``ok``, ``corrupt``, ``missing`` or ``unreadable``, and why (empty when ok)."""

    result: BlobCheck
    detail: str = ""


class BlobVerifier:
    """Checks versions' blobs against their rows, each digest once; ``bytes_read`` counts what was streamed."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._found: dict[tuple[str, int], BlobFinding] = {}
        self.bytes_read = 0

    def check(self, version: AdapterVersion) -> BlobFinding:
        """The blob of ``version`` re-hashed (or what an earlier check of the same digest and size found)."""
        key = (version.sha256, version.size_bytes)
        found = self._found.get(key)
        if found is None:
            found = self._read(version)
            self._found[key] = found
        return found

    def _read(self, version: AdapterVersion) -> BlobFinding:
        with tempfile.TemporaryDirectory(prefix="lorafleet-verify-") as tmp:
            try:
                self._blobs.download(version.sha256, Path(tmp) / "blob", expected_size=version.size_bytes)
            except BlobNotFoundError as exc:
                return BlobFinding(BlobCheck.MISSING, str(exc))
            except BlobIntegrityError as exc:
                self.bytes_read += version.size_bytes
                return BlobFinding(BlobCheck.CORRUPT, str(exc))
            except ValidationError as exc:  # the row's digest is not a sha256: no blob can ever match it
                return BlobFinding(BlobCheck.CORRUPT, f"the version's sha256 is unusable: {exc}")
            except BlobStoreError as exc:  # the store failed (network, permissions): nothing is known
                logger.warning("blob %s of version %d could not be read: %s", version.sha256, version.id, exc)
                return BlobFinding(BlobCheck.UNREADABLE, str(exc))
        self.bytes_read += version.size_bytes
        return BlobFinding(BlobCheck.OK)


__all__ = ["BlobFinding", "BlobVerifier"]
