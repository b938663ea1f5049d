"""Serving: the adapter cache, batched generation across users, and continuous batching of concurrent requests.

Public API (importing this package does not import torch; names load on first use):

- ``GenerationRequest`` / ``GenerationResult`` / ``ServedBy`` / ``GenerationDelta`` / ``TokenLogprob``: what
  callers send and get back (a streamed request gets deltas, then its result)
- ``AdapterCache(bank, fetch=..., capacity_slots=..., capacity_bytes=...)`` (or ``AdapterCache.from_blob_store``):
  bank slots by version sha256, LRU over unpinned slots, single-flight loads; ``acquire(members)`` -> ``Lease``
- ``GenerationEngine(backbone, bank, cache, resolve_bank=..., gate_factory=...)``: ``generate(requests)``
- ``ContinuousBatcher(engine, max_batch_size=32, max_prefill_tokens=2048)``: continuous batching (requests join
  the running batch at the next step): ``submit`` / ``submit_async`` / ``stream`` / ``stream_async`` / ``close``
- ``BatchingQueue(engine, max_batch_size=32, max_wait_ms=10)``: static batching (a batch decodes to its end
  before the next starts), the same ``submit`` / ``submit_async`` / ``close``; kept as the benchmarks' baseline
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
    "GenerationDelta": "lorafleet.serving.requests",
    "TokenLogprob": "lorafleet.serving.requests",
    "AdapterCache": "lorafleet.serving.cache",
    "CacheStats": "lorafleet.serving.cache",
    "Lease": "lorafleet.serving.cache",
    "blob_fetcher": "lorafleet.serving.fetch",
    "verify_folder": "lorafleet.serving.fetch",
    "GenerationEngine": "lorafleet.serving.engine",
    "BatchingQueue": "lorafleet.serving.batcher",
    "ContinuousBatcher": "lorafleet.serving.continuous",
    "ServingMetrics": "lorafleet.serving.metrics",
    "prometheus_text": "lorafleet.serving.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the API's schemas import request types without paying for torch."""
    return lazy_export(__name__, _EXPORTS, name)
