"""Getting an adapter version's PEFT folder from the object store, verified against the version's sha256.

A version's ``sha256`` is the digest of its archive (the registry's deterministic tar of the two PEFT files).
:func:`blob_fetcher` downloads that archive through the blob store, which checks digest and size before anything
is written, then unpacks it. :func:`verify_folder` re-packs a folder the same way and compares digests, so a
fetcher that yields folders by other means (a mirror, a local copy) is held to the same content hash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lorafleet.adapters.slots import SlotConfig
from lorafleet.errors import BackboneMismatchError, BlobIntegrityError
from lorafleet.registry import pack_adapter_archive, unpack_adapter_archive
from lorafleet.registry.peft_format import inspect_adapter_dir, load_adapter_tensors
from lorafleet.store.blob.base import BlobStore, sha256_file

if TYPE_CHECKING:
    import torch


class VersionRef(Protocol):
    """What the cache needs of a bank member: its content hash and size (``routing.Expert`` has both)."""

    @property
    def sha256(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...


#: ``fetch(version, workdir) -> folder``: put the version's PEFT folder somewhere under ``workdir`` (a fresh,
#: private directory the cache deletes after loading) and return it.
Fetcher = Callable[[VersionRef, Path], Path]


def blob_fetcher(blobs: BlobStore) -> Fetcher:
    """A fetcher over an object store: verified download of the archive (``BlobIntegrityError`` if corrupted)."""

    def fetch(version: VersionRef, workdir: Path) -> Path:
        archive = blobs.download(version.sha256, workdir / "adapter.tar", expected_size=version.size_bytes)
        folder = workdir / "adapter"
        folder.mkdir()
        unpack_adapter_archive(archive=archive, dest_dir=folder)
        archive.unlink()
        return folder

    return fetch


def verify_folder(folder: Path, *, sha256: str, workdir: Path) -> None:
    """``BlobIntegrityError`` unless the folder's files pack to the archive whose digest is ``sha256``."""
    files = inspect_adapter_dir(folder)
    archive = pack_adapter_archive(files=files, dest=workdir / ".verify.tar")
    try:
        actual, _ = sha256_file(archive)
    finally:
        archive.unlink(missing_ok=True)
    if actual != sha256:
        raise BlobIntegrityError(
            f"adapter folder {folder} packs to sha256 {actual}, expected {sha256} (stale or corrupted)"
        )


def read_adapter(
    folder: Path, *, name: str, require_fingerprint: bool = False
) -> tuple[dict[str, torch.Tensor], SlotConfig]:
    """A PEFT folder's tensors and slot config, checked as ``load_slot_from_dir`` checks them (pickle files,
    header, config, finiteness), read before any lock is taken; the bank checks shapes and fingerprint."""
    # torch, on first use: fetching needs none until a folder is read
    from lorafleet.adapters.serialization import read_adapter_fingerprint, slot_config_from_peft

    files = inspect_adapter_dir(folder)
    fingerprint = read_adapter_fingerprint(files)
    if require_fingerprint and not fingerprint:
        raise BackboneMismatchError(f"{folder}: the adapter records no backbone fingerprint")
    config = slot_config_from_peft(files.config, backbone_fingerprint=fingerprint)
    tensors = load_adapter_tensors(files)
    content_hash, _ = sha256_file(files.weights_path)
    return tensors, dataclasses.replace(config, content_hash=content_hash, name=name)


__all__ = ["Fetcher", "VersionRef", "blob_fetcher", "read_adapter", "verify_folder"]
