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

from lorafleet._exports import lazy_export

# The API's schemas import request types without paying for torch.
__getattr__, __dir__, __all__ = lazy_export(
    __name__,
    {
        "lorafleet.serving.requests": (
            "GenerationRequest",
            "GenerationResult",
            "ServedBy",
            "FinishReason",
            "GenerationDelta",
            "TokenLogprob",
        ),
        "lorafleet.serving.cache": ("AdapterCache", "CacheStats", "Lease"),
        "lorafleet.serving.fetch": ("blob_fetcher", "verify_folder"),
        "lorafleet.serving.engine": ("GenerationEngine",),
        "lorafleet.serving.batcher": ("BatchingQueue",),
        "lorafleet.serving.continuous": ("ContinuousBatcher",),
        "lorafleet.serving.metrics": ("ServingMetrics", "prometheus_text"),
    },
)
