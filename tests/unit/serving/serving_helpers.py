"""Helpers for the serving tests: real adapter folders for the tiny backbone, bank members and user banks,
trivial gates and a folder fetcher that counts its calls."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, save_slot
from lorafleet.registry import pack_adapter_archive
from lorafleet.registry.peft_format import inspect_adapter_dir
from lorafleet.routing.experts import Expert, ExpertSet
from lorafleet.routing.spec import GateDecision, GateSpec
from lorafleet.serving.cache import AdapterCache
from lorafleet.store.blob.base import sha256_file

__all__ = ["Expert", "GateDecision", "GateSpec", "ExpertSet"]


def touch(cache: AdapterCache, m: Expert) -> int:
    """Acquire one version (loading it if needed) and release it at once; the slot it is in."""
    with cache.acquire([m]) as lease:
        return lease.slots[m.sha256]


def write_adapter(author: AdapterBank, path: Path, *, seed: int, rank: int = 4, scale: float = 0.3) -> Path:
    """A PEFT folder with random (non-zero) A and B on every bank layer, saved through a scratch slot."""
    tensors = random_lora_weights(author, rank=rank, seed=seed, scale=scale)
    author.load_slot(0, tensors, SlotConfig(rank=rank, alpha=2.0 * rank), replace=True)
    save_slot(author, 0, path)
    author.evict_slot(0)
    return path


def archive_sha256(folder: Path) -> tuple[str, int]:
    """The digest and size of the registry's archive of a folder (what a version's sha256 is)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = pack_adapter_archive(files=inspect_adapter_dir(folder), dest=Path(tmp) / "a.tar")
        return sha256_file(archive)


def member(
    folder: Path, *, adapter_id: int, name: str = "", version: int = 1, version_id: int | None = None
) -> Expert:
    """A bank member for an adapter folder (sha256 and size of its archive)."""
    sha256, size = archive_sha256(folder)
    return Expert(
        adapter_id=adapter_id,
        adapter_name=name or f"adapter-{adapter_id}",
        kind="personal",
        version_id=version_id if version_id is not None else 100 * adapter_id + version,
        version_number=version,
        sha256=sha256,
        size_bytes=size,
        rank=4,
        routing_key=None,
    )


def user_bank(user: str, members: Sequence[Expert], *, tenant_id: int = 1, user_id: int = 1) -> ExpertSet:
    revision = "-".join(str(m.version_id) for m in members) or "empty"
    return ExpertSet(
        tenant_id=tenant_id,
        user_id=user_id,
        external_id=user,
        members=tuple(members),
        gate=GateSpec(),
        revision=revision,
    )


@dataclass
class FixedGate:
    """Every row gets the same routes (index into members, weight); default: all to member 0."""

    routes: tuple[tuple[int, float], ...] = ((0, 1.0),)

    def decide(self, bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        return [GateDecision(routes=self.routes) for _ in range(embeddings.shape[0])]


def gates_by_user(gates: Mapping[str, FixedGate]) -> Callable[[ExpertSet], FixedGate]:
    """A gate factory picking each user's gate by external id (member 0 at weight 1 when not listed)."""
    return lambda bank: gates.get(bank.external_id, FixedGate())


def zero_embed(backbone: object, bank: AdapterBank, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An embedding stub for gates that ignore embeddings: ``[batch, 1]`` zeros."""
    return torch.zeros(ids.shape[0], 1)


@dataclass
class FolderFetcher:
    """Serves folders by sha256 (copied into the cache's workdir), counting fetches; a fetch of a key in
    ``hold`` waits until its event is set."""

    folders: dict[str, Path] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, folder: Path) -> str:
        sha256, _ = archive_sha256(folder)
        self.folders[sha256] = folder
        return sha256

    def __call__(self, version: Expert, workdir: Path) -> Path:
        with self.lock:
            self.calls.append(version.sha256)
        event = self.hold.get(version.sha256)
        if event is not None:
            assert event.wait(timeout=10)
        return Path(shutil.copytree(self.folders[version.sha256], workdir / "adapter"))
