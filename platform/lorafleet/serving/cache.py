"""``AdapterCache``: bank slots filled from the object store on demand, keyed by each version's content hash.

The key is the version's sha256, never its name or number, so a rollback or a re-promotion can never serve
stale weights: another version is another key. The cache owns a set of bank slots and a byte budget (version
sizes); a miss reserves room first (evicting least recently used, unpinned entries), then fetches and loads
without holding the cache's lock, so one slow download never blocks hits or other loads. Concurrent requests
for the same key share one load (single flight, one future per key). A batch pins the slots it uses for its
whole lifetime through a :class:`Lease` (or each row its own: ``Lease.share``); a pinned slot is never evicted, and when nothing can be evicted the
acquisition fails with ``CapacityError`` rather than waiting.

**Host tier.** Under the device slots, an optional host-memory tier (:class:`HostTier`, vLLM's CPU LoRA cache)
keeps the tensors of recently loaded versions, far more of them than there are slots (thousands: a version is a
few hundred KiB to tens of MiB): a slot miss whose version is there costs a copy into the slot, not an
object-store download, unpack and file checks. It is LRU, bounded by a count and a byte budget, filled only with
tensors that a slot accepted (so what it serves passed every check), and keyed by the same sha256.

Failure policy: a fetch or load that fails (``BlobIntegrityError`` for a corrupted blob, ``BlobNotFoundError``,
a format or backbone mismatch) leaves its slot empty and un-cached, counts a ``load_failures``, and raises to
every caller waiting on that key. There is no fallback to another version: serving something other than the
version the alias names would break "wholly the live version"; the engine fails only the requests that
needed that version.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.adapters.bank import AdapterBank
from lorafleet.adapters.slots import SlotConfig
from lorafleet.domain.closing import ClosesOnExit
from lorafleet.errors import CapacityError, LorafleetError, ValidationError
from lorafleet.serving.fetch import Fetcher, VersionRef, blob_fetcher, read_adapter, verify_folder
from lorafleet.store.blob.base import BlobStore, check_digest

#: How many recent load durations ``stats()`` keeps.
LOAD_SAMPLES = 1024


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was built, and its current occupancy."""

    hits: int
    misses: int
    #: acquisitions that found the key being loaded by another caller and waited for that load
    coalesced: int
    evictions: int
    loads: int
    load_failures: int
    #: wall seconds of the most recent successful loads (fetch + verify + slot write), oldest first
    load_seconds: tuple[float, ...]
    #: wall seconds of every successful load since the cache was built
    load_seconds_total: float
    slots_used: int
    capacity_slots: int
    bytes_used: int
    capacity_bytes: int | None
    pinned: int
    #: slot misses served from the host tier (a copy into the slot, no object-store read); part of ``misses``
    host_hits: int = 0
    host_evictions: int = 0
    host_entries: int = 0
    host_bytes: int = 0
    #: the host tier's bounds (0 entries: no host tier)
    host_capacity_entries: int = 0
    host_capacity_bytes: int | None = None

    @property
    def hit_rate(self) -> float:
        """Device-slot hits (including coalesced waits) over all acquisitions; 0 when there were none."""
        total = self.hits + self.coalesced + self.misses
        return (self.hits + self.coalesced) / total if total else 0.0

    @property
    def tiered_hit_rate(self) -> float:
        """Acquisitions served without an object-store read (slot hits, coalesced waits and host-tier hits)."""
        total = self.hits + self.coalesced + self.misses
        return (self.hits + self.coalesced + self.host_hits) / total if total else 0.0


@dataclass(frozen=True)
class _HostEntry:
    tensors: dict[str, torch.Tensor]
    config: SlotConfig
    nbytes: int


class HostTier:
    """Adapter versions' tensors in host memory by sha256, least recently used first, bounded by ``max_entries``
    and ``max_bytes`` (module docstring). Thread-safe.

    ``dtype``: tensors are kept in the bank's dtype (half the memory of fp32 when the slots are bf16; the slot
    write would cast to it anyway). ``pin``: page-locked memory, so the copy into a CUDA slot is a direct DMA.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        pin: bool = False,
    ) -> None:
        if max_entries < 1:
            raise ValidationError("a host tier needs max_entries >= 1")
        if max_bytes is not None and max_bytes <= 0:
            raise ValidationError("host tier max_bytes must be positive")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._dtype, self._pin = dtype, pin
        self._entries: OrderedDict[str, _HostEntry] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], SlotConfig] | None:
        """The version's tensors and config (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.tensors, entry.config

    def put(self, key: str, tensors: dict[str, torch.Tensor], config: SlotConfig) -> bool:
        """Keep a version (evicting least recently used ones for room); False when it alone exceeds the budget."""
        kept = {name: self._host_copy(t) for name, t in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in kept.values())
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and (
                len(self._entries) >= self.max_entries
                or (self.max_bytes is not None and self._bytes + nbytes > self.max_bytes)
            ):
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.nbytes
                self.evictions += 1
            self._entries[key] = _HostEntry(kept, config, nbytes)
            self._bytes += nbytes
        return True

    def discard(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to("cpu", self._dtype or tensor.dtype)
        if self._pin:
            try:
                out = out.pin_memory()
            except RuntimeError:  # no CUDA driver after all: pageable memory works, only slower
                self._pin = False
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries


@dataclass(eq=False)
class _Entry:
    key: str
    slot: int
    size_bytes: int
    pins: int = 0
    ready: Future[None] = field(default_factory=Future)


class Lease(ClosesOnExit):
    """Pinned slots of one batch (``slots``: sha256 -> slot) and the keys that failed (``errors``).

    Use it as a context manager; the pins are released on exit (``release`` is idempotent).
    """

    def __init__(self, cache: AdapterCache) -> None:
        self._cache = cache
        self._entries: list[_Entry] = []
        self.slots: dict[str, int] = {}
        self.errors: dict[str, LorafleetError] = {}

    def _add(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self.slots[entry.key] = entry.slot

    def share(self, keys: Iterable[str]) -> Lease:
        """A new lease pinning this lease's slots of ``keys`` once more (a row's share of its batch's pins, so the
        row can release them on its own); keys this lease does not hold are left out."""
        part = Lease(self._cache)
        wanted = set(keys)
        with self._cache._lock:
            for entry in self._entries:
                if entry.key in wanted and entry.key not in part.slots:
                    entry.pins += 1
                    part._add(entry)
        return part

    def release(self) -> None:
        """Unpin every slot of the lease."""
        entries, self._entries = self._entries, []
        self._cache._unpin(entries)

    close = release  # what leaving the ``with`` block calls


class AdapterCache:
    """Bank slots holding adapter versions by sha256, with a slot and byte budget and LRU eviction."""

    def __init__(
        self,
        bank: AdapterBank,
        *,
        fetch: Fetcher,
        capacity_slots: int | None = None,
        capacity_bytes: int | None = None,
        slots: Iterable[int] | None = None,
        verify: bool = True,
        require_fingerprint: bool = False,
        host_entries: int = 0,
        host_bytes: int | None = None,
    ) -> None:
        """``slots``: the bank slots the cache may use (default: every slot empty now). ``verify`` re-checks a
        fetched folder against the sha256 (turn off only for a fetcher that already verified the download).
        ``host_entries``/``host_bytes``: the host tier's bounds (0 entries: none; ``serving.factory`` gives the
        service 1,000 adapters within 4 GiB)."""
        managed = (
            sorted(slots)
            if slots is not None
            else [s for s in range(bank.n_slots) if bank.slot_info(s) is None]
        )
        if capacity_slots is not None:
            managed = managed[:capacity_slots]
        if not managed:
            raise ValidationError("an adapter cache needs at least one empty bank slot")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValidationError("capacity_bytes must be positive")
        self.bank = bank
        self._fetch = fetch
        self._verify = verify
        self._require_fingerprint = require_fingerprint
        self.capacity_slots = len(managed)
        self.capacity_bytes = capacity_bytes
        self._free: list[int] = managed[::-1]  # pop() hands out the lowest slot first
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes_used = 0
        self._lock = threading.Lock()  # guards the fields above; never held during a fetch
        self._bank_lock = threading.Lock()  # serialises writes into the bank's slots
        self._counts = {
            "hits": 0,
            "misses": 0,
            "coalesced": 0,
            "evictions": 0,
            "loads": 0,
            "load_failures": 0,
        }
        self._load_seconds: deque[float] = deque(maxlen=LOAD_SAMPLES)
        self._load_seconds_total = 0.0
        self._counts["host_hits"] = 0
        self.host: HostTier | None = (
            HostTier(host_entries, max_bytes=host_bytes, dtype=bank.dtype, pin=bank.device.type == "cuda")
            if host_entries > 0
            else None
        )

    @classmethod
    def from_blob_store(
        cls,
        bank: AdapterBank,
        blobs: BlobStore,
        *,
        capacity_slots: int | None = None,
        capacity_bytes: int | None = None,
        slots: Iterable[int] | None = None,
        require_fingerprint: bool = False,
        host_entries: int = 0,
        host_bytes: int | None = None,
    ) -> AdapterCache:
        """A cache over an object store; its downloads are verified (sha256 and size) before they are unpacked,
        so the folder is not checked a second time."""
        return cls(
            bank,
            fetch=blob_fetcher(blobs),
            capacity_slots=capacity_slots,
            capacity_bytes=capacity_bytes,
            slots=slots,
            verify=False,
            require_fingerprint=require_fingerprint,
            host_entries=host_entries,
            host_bytes=host_bytes,
        )

    # --- acquiring -------------------------------------------------------------------------------------------
    def acquire(self, versions: Sequence[VersionRef], *, strict: bool = True) -> Lease:
        """Pin a slot for each distinct sha256, loading what is missing; returns the lease.

        ``strict``: the first failure releases everything and raises. Otherwise failures are collected in
        ``lease.errors`` and the other keys stay pinned (the engine fails only the requests that needed them).
        """
        lease = Lease(self)
        seen: set[str] = set()
        for version in versions:
            key = version.sha256
            if key in seen:
                continue
            seen.add(key)
            try:
                check_digest(key)
                lease._add(self._pin(version))
            except LorafleetError as exc:
                if strict:
                    lease.release()
                    raise
                lease.errors[key] = exc
            except BaseException:
                lease.release()
                raise
        return lease

    def _pin(self, version: VersionRef) -> _Entry:
        """The key's entry, pinned once more: a hit, a wait on another caller's load, or a load of our own."""
        key = version.sha256
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._reserve(key, version.size_bytes)
                self._counts["misses"] += 1
                loading = True
            else:
                entry.pins += 1
                self._entries.move_to_end(key)
                loading = False
                self._counts["hits" if entry.ready.done() else "coalesced"] += 1
        if loading:
            self._load(entry, version)
        else:
            entry.ready.result()  # re-raises the loader's error to every waiter
        return entry

    def _reserve(self, key: str, size_bytes: int) -> _Entry:
        """A new pinned entry on a free slot, evicting LRU unpinned entries for room (under ``_lock``)."""
        if size_bytes < 0:
            raise ValidationError(f"version {key[:12]} has a negative size")
        if self.capacity_bytes is not None and size_bytes > self.capacity_bytes:
            raise CapacityError(
                f"version {key[:12]} is {size_bytes} bytes, above the cache's capacity of {self.capacity_bytes}"
            )
        while not self._free or not self._fits(size_bytes):
            self._evict(self._victim(key))
        entry = _Entry(key=key, slot=self._free.pop(), size_bytes=size_bytes, pins=1)
        self._entries[key] = entry
        self._bytes_used += size_bytes
        return entry

    def _fits(self, size_bytes: int) -> bool:
        return self.capacity_bytes is None or self._bytes_used + size_bytes <= self.capacity_bytes

    def _victim(self, key: str) -> _Entry:
        for entry in self._entries.values():  # least recently used first
            if entry.pins == 0 and entry.ready.done():
                return entry
        raise CapacityError(
            f"adapter cache is full ({len(self._entries)}/{self.capacity_slots} slots, {self._bytes_used} bytes) "
            f"and every entry is pinned by a batch in flight: cannot load {key[:12]}"
        )

    def _evict(self, entry: _Entry) -> None:
        """Drop an unpinned entry and empty its slot (a memory write, not I/O)."""
        del self._entries[entry.key]
        self._bytes_used -= entry.size_bytes
        with self._bank_lock:
            if self.bank.slot_info(entry.slot) is not None:
                self.bank.evict_slot(entry.slot)
        self._free.append(entry.slot)
        self._counts["evictions"] += 1

    def _load(self, entry: _Entry, version: VersionRef) -> None:
        """Fill the entry's reserved slot from the host tier, or else fetch, verify and write the version (and keep
        its tensors in the host tier); on failure undo the reservation."""
        started = time.perf_counter()
        held = self.host.get(entry.key) if self.host is not None else None
        try:
            if held is not None:
                tensors, config = held
            else:
                with tempfile.TemporaryDirectory(prefix="lorafleet-cache-") as tmp:
                    folder = self._fetch(version, Path(tmp))
                    if self._verify:
                        verify_folder(folder, sha256=entry.key, workdir=Path(tmp))
                    tensors, config = read_adapter(
                        folder, name=entry.key, require_fingerprint=self._require_fingerprint
                    )
            with self._bank_lock:  # only the memory write is under the lock, never the file reads
                self.bank.load_slot(entry.slot, tensors, config)
        except BaseException as exc:
            if held is not None and self.host is not None:
                self.host.discard(entry.key)  # never offered again: the next miss reads the store
            self._abandon(entry)
            entry.ready.set_exception(exc)
            raise
        if held is None and self.host is not None:
            self.host.put(entry.key, tensors, config)  # only tensors a slot accepted
        with self._lock:
            seconds = time.perf_counter() - started
            self._counts["loads"] += 1
            if held is not None:
                self._counts["host_hits"] += 1
            self._load_seconds.append(seconds)
            self._load_seconds_total += seconds
        entry.ready.set_result(None)

    def _abandon(self, entry: _Entry) -> None:
        """Forget a failed load: its slot goes back empty, its bytes are freed, nothing stays cached."""
        with self._bank_lock:
            if self.bank.slot_info(entry.slot) is not None:
                self.bank.evict_slot(entry.slot)
        with self._lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._bytes_used -= entry.size_bytes
            self._free.append(entry.slot)
            self._counts["load_failures"] += 1

    def _unpin(self, entries: Iterable[_Entry]) -> None:
        with self._lock:
            for entry in entries:
                entry.pins -= 1

    # --- inspection ------------------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters and the occupancy."""
        host = self.host
        with self._lock:
            return CacheStats(
                **self._counts,
                host_evictions=0 if host is None else host.evictions,
                host_entries=0 if host is None else len(host),
                host_bytes=0 if host is None else host.nbytes,
                host_capacity_entries=0 if host is None else host.max_entries,
                host_capacity_bytes=None if host is None else host.max_bytes,
                load_seconds=tuple(self._load_seconds),
                load_seconds_total=self._load_seconds_total,
                slots_used=len(self._entries),
                capacity_slots=self.capacity_slots,
                bytes_used=self._bytes_used,
                capacity_bytes=self.capacity_bytes,
                pinned=sum(1 for e in self._entries.values() if e.pins > 0),
            )

    def keys(self) -> list[str]:
        """Cached (or loading) sha256 keys, least recently used first: the order they would be evicted in."""
        with self._lock:
            return list(self._entries)

    def slot_of(self, sha256: str) -> int | None:
        """The slot holding a loaded version, or None (does not count as an access)."""
        with self._lock:
            entry = self._entries.get(sha256)
            return entry.slot if entry is not None and entry.ready.done() else None

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and self.slot_of(sha256) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


__all__ = ["AdapterCache", "CacheStats", "HostTier", "Lease"]
