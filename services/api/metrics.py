"""HTTP metrics of the API and the ``/metrics`` page in Prometheus' text exposition format (version 0.0.4).

Written by hand (no client library): request counts by method, route template and status; request latency
histograms by method and route; jobs by state; and the serving engine's counters and adapter cache (hits,
misses, loads) from ``lorafleet.serving.metrics`` once the engine is loaded.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

#: upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "lorafleet"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


class _Histogram:
    """Bucket counts (non-cumulative), sum and count of one label set."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        self.buckets[index] += 1
        self.total += seconds
        self.count += 1


class ApiMetrics:
    """Thread-safe request counters and latency histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency: defaultdict[tuple[str, str], _Histogram] = defaultdict(_Histogram)

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            self._latency[(method, route)].observe(seconds)

    def requests_total(self, *, route: str | None = None) -> int:
        with self._lock:
            return sum(n for (_, r, _), n in self._requests.items() if route is None or r == route)

    def render(self) -> list[str]:
        """The HTTP metrics as exposition lines."""
        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted((k, list(h.buckets), h.total, h.count) for k, h in self._latency.items())
        name = f"{PREFIX}_http_requests_total"
        lines = [f"# HELP {name} HTTP requests by method, route and status.", f"# TYPE {name} counter"]
        for (method, route, status), n in requests:
            lines.append(f"{name}{_labels({'method': method, 'route': route, 'status': status})} {n}")
        name = f"{PREFIX}_http_request_duration_seconds"
        lines += [f"# HELP {name} HTTP request latency.", f"# TYPE {name} histogram"]
        for (method, route), buckets, total, count in latency:
            lines += _histogram_lines(name, {"method": method, "route": route}, buckets, total, count)
        return lines


def _histogram_lines(
    name: str, labels: Mapping[str, str], buckets: list[int], total: float, count: int
) -> list[str]:
    lines, running = [], 0
    bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    for bound, n in zip(bounds, buckets, strict=True):
        running += n
        lines.append(f"{name}_bucket{_labels({**labels, 'le': bound})} {running}")
    lines.append(f"{name}_sum{_labels(labels)} {total:.6f}")
    lines.append(f"{name}_count{_labels(labels)} {count}")
    return lines


def job_lines(counts: Mapping[str, int]) -> list[str]:
    """Jobs by state (a gauge: they move between states)."""
    name = f"{PREFIX}_jobs"
    lines = [f"# HELP {name} Jobs by state.", f"# TYPE {name} gauge"]
    return lines + [f"{name}{_labels({'state': state})} {n}" for state, n in sorted(counts.items())]


def gauge_lines(name: str, help_text: str, value: float) -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {help_text}", f"# TYPE {full} gauge", f"{full} {value:g}"]


def exposition(sections: Iterable[Iterable[str]]) -> str:
    """Join sections of lines into one page (a trailing newline, as the format requires)."""
    return "\n".join(line.rstrip("\n") for section in sections for line in section) + "\n"


__all__ = ["LATENCY_BUCKETS", "ApiMetrics", "exposition", "gauge_lines", "job_lines"]
