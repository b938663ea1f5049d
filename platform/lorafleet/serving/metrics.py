"""Serving counters for the API's ``/metrics``: requests, failures by error code, batch sizes, tokens, timings.

With continuous batching a "batch" is a group of requests admitted together (``record_batch``); rows then end
one by one (``record_row``: completion tokens, decoding failures), and every decoding step is counted with its
running rows (``decode_steps``, ``decode_step_rows``: their ratio is the mean running batch).

Plain thread-safe counters (no client library): ``snapshot()`` gives a dict, :func:`prometheus_text` renders
it, together with the adapter cache's stats, in Prometheus' text exposition format.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.serving.cache import CacheStats
    from lorafleet.serving.prefix_cache import PrefixCache

#: Upper bounds of the batch size histogram's buckets (the last bucket is +Inf).
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class BatchRecord:
    """What one engine batch did."""

    size: int
    failed_codes: tuple[str, ...]
    base_rows: int
    adapter_rows: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class ServingMetrics:
    """Counters updated by the engine (per batch) and the batching queue (per request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._batch_buckets: Counter[int | None] = Counter()  # None = +Inf
        self._seconds: dict[str, float] = {"batch": 0.0, "queue_wait": 0.0, "decode": 0.0}

    def record_batch(self, record: BatchRecord) -> None:
        with self._lock:
            c = self._counts
            c["batches"] += 1
            c["requests"] += record.size
            c["requests_failed"] += len(record.failed_codes)
            c["rows_base"] += record.base_rows
            c["rows_adapter"] += record.adapter_rows
            c["prompt_tokens"] += record.prompt_tokens
            c["completion_tokens"] += record.completion_tokens
            self._failures.update(record.failed_codes)
            self._batch_buckets[next((b for b in BATCH_BUCKETS if record.size <= b), None)] += 1
            self._seconds["batch"] += record.seconds

    def record_row(self, *, completion_tokens: int, failed_code: str | None) -> None:
        """A row of continuous batching ended (its admission was counted by ``record_batch``)."""
        with self._lock:
            self._counts["completion_tokens"] += completion_tokens
            if failed_code is not None:
                self._counts["requests_failed"] += 1
                self._failures[failed_code] += 1

    def record_cancelled(self, rows: int) -> None:
        """Requests whose caller went away (a cancelled future, a disconnected stream) after admission."""
        with self._lock:
            self._counts["requests_cancelled"] += rows

    def record_step(self, rows: int, seconds: float) -> None:
        """One decoding step of continuous batching over ``rows`` running rows (with any newcomers' prefill)."""
        with self._lock:
            self._counts["decode_steps"] += 1
            self._counts["decode_step_rows"] += rows
            self._seconds["decode"] += seconds

    def record_queue_wait(self, seconds: float) -> None:
        with self._lock:
            self._counts["queued"] += 1
            self._seconds["queue_wait"] += seconds

    def snapshot(self) -> dict[str, object]:
        """Every counter: ``requests``, ``requests_failed``, ``failures`` by code, ``batch_size_buckets``, ..."""
        with self._lock:
            return {
                **{k: self._counts[k] for k in _COUNTS},
                "failures": dict(self._failures),
                "batch_size_buckets": {
                    ("+Inf" if b is None else str(b)): n
                    for b, n in sorted(self._batch_buckets.items(), key=_bucket)
                },
                "batch_seconds_total": self._seconds["batch"],
                "queue_wait_seconds_total": self._seconds["queue_wait"],
                "decode_seconds_total": self._seconds["decode"],
            }


_COUNTS = (
    "requests",
    "requests_failed",
    "batches",
    "rows_base",
    "rows_adapter",
    "prompt_tokens",
    "completion_tokens",
    "queued",
    "decode_steps",
    "decode_step_rows",
    "requests_cancelled",
)


def _bucket(item: tuple[int | None, int]) -> float:
    return float("inf") if item[0] is None else float(item[0])


def prometheus_text(
    metrics: ServingMetrics,
    cache: CacheStats | None = None,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix: str = "lorafleet",
) -> str:
    """The counters (and the adapter cache's and the prefix cache's) in Prometheus' text format, e.g.
    ``lorafleet_serving_requests_total 12``; ``lorafleet_prefix_cache_hit_tokens_total`` over
    ``..._lookup_tokens_total`` is the share of prompt tokens that did not run."""
    snap = metrics.snapshot()
    lines = [f"{prefix}_serving_{name}_total {snap[name]}" for name in _COUNTS]
    failures = snap["failures"]
    assert isinstance(failures, dict)
    lines += [
        f'{prefix}_serving_requests_failed_by_code_total{{code="{c}"}} {n}'
        for c, n in sorted(failures.items())
    ]
    lines += _histogram(f"{prefix}_serving_batch_size", snap["batch_size_buckets"])
    lines.append(f"{prefix}_serving_batch_seconds_total {snap['batch_seconds_total']:.6f}")
    lines.append(f"{prefix}_serving_queue_wait_seconds_total {snap['queue_wait_seconds_total']:.6f}")
    lines.append(f"{prefix}_serving_decode_seconds_total {snap['decode_seconds_total']:.6f}")
    if cache is not None:
        lines += _cache_lines(f"{prefix}_adapter_cache", cache)
    if prefix_cache is not None:
        lines += _prefix_cache_lines(f"{prefix}_prefix_cache", prefix_cache)
    return "\n".join(lines) + "\n"


def _prefix_cache_lines(name: str, cache: PrefixCache) -> list[str]:
    """The prefix cache's counters (prompt tokens looked up and found, blocks stored and evicted) and its size."""
    snap = cache.snapshot()
    counters = ("lookup_tokens", "hit_tokens", "stored_blocks", "evicted_blocks")
    return [f"{name}_{c}_total {snap[c]}" for c in counters] + [
        f"{name}_{g} {snap[g]}" for g in ("blocks", "bytes")
    ]


def _histogram(name: str, buckets: object) -> list[str]:
    assert isinstance(buckets, dict)
    lines, running = [], 0
    for bound in [*(str(b) for b in BATCH_BUCKETS), "+Inf"]:
        running += int(buckets.get(bound, 0))
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    lines.append(f"{name}_count {running}")
    return lines


def _cache_lines(name: str, stats: CacheStats) -> list[str]:
    counters = (
        "hits",
        "misses",
        "coalesced",
        "evictions",
        "loads",
        "load_failures",
        "host_hits",
        "host_evictions",
    )
    lines = [f"{name}_{c}_total {getattr(stats, c)}" for c in counters]
    lines += [
        f"{name}_load_seconds_total {stats.load_seconds_total:.6f}",
        f"{name}_slots_used {stats.slots_used}",
        f"{name}_slots_capacity {stats.capacity_slots}",
        f"{name}_bytes_used {stats.bytes_used}",
        f"{name}_slots_pinned {stats.pinned}",
        f"{name}_host_entries {stats.host_entries}",
        f"{name}_host_bytes {stats.host_bytes}",
    ]
    if stats.capacity_bytes is not None:
        lines.append(f"{name}_bytes_capacity {stats.capacity_bytes}")
    return lines


__all__ = ["BATCH_BUCKETS", "BatchRecord", "ServingMetrics", "prometheus_text"]
