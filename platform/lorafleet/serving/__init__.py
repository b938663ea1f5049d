"""Serving: the adapter cache, batched generation across users, and the queue that forms the batches.

Public API (importing this package does not import torch; names load on first use):

- ``GenerationRequest`` / ``GenerationResult`` / ``ServedBy``: what callers send and get back
- ``AdapterCache(bank, fetch=..., capacity_slots=..., capacity_bytes=...)`` (or ``AdapterCache.from_blob_store``):
  bank slots by version sha256, LRU over unpinned slots, single-flight loads; ``acquire(members)`` -> ``Lease``
- ``GenerationEngine(backbone, bank, cache, resolve_bank=..., gate_factory=...)``: ``generate(requests)``
- ``BatchingQueue(engine, max_batch_size=32, max_wait_ms=10)``: ``submit`` / ``submit_async`` / ``close``
- ``ServingMetrics`` and ``prometheus_text``: counters for ``/metrics``

Its room (docs/architecture.md): the ML layer, above routing and adapters, below training and QA: one in-
process engine. The Ray Serve deployment around it is runtime (``lorafleet.runtime.ray_serve``); the HTTP
routes are in ``services/api``.
"""

from __future__ import annotations

from typing import Any

from lorafleet._exports import lazy_export

_EXPORTS = {
    "GenerationRequest": "lorafleet.serving.requests",
    "GenerationResult": "lorafleet.serving.requests",
    "ServedBy": "lorafleet.serving.requests",
    "FinishReason": "lorafleet.serving.requests",
    "AdapterCache": "lorafleet.serving.cache",
    "CacheStats": "lorafleet.serving.cache",
    "Lease": "lorafleet.serving.cache",
    "blob_fetcher": "lorafleet.serving.fetch",
    "verify_folder": "lorafleet.serving.fetch",
    "GenerationEngine": "lorafleet.serving.engine",
    "BatchingQueue": "lorafleet.serving.batcher",
    "ServingMetrics": "lorafleet.serving.metrics",
    "prometheus_text": "lorafleet.serving.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the API's schemas import request types without paying for torch."""
    return lazy_export(__name__, _EXPORTS, name)
