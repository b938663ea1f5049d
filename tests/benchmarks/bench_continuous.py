"""Benchmarks of continuous batching (not CI): ``ContinuousBatcher`` against today's static ``BatchingQueue``
over the same engine, and the engine against Hugging Face ``generate`` on the bare backbone.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_continuous.py`` (tiny backbone, a few
minutes on 2 CPU cores), or ``--backbone builtin:smollm2-135m --data-dir DIR`` for SmolLM2-135M-Instruct
(converted once into ``DIR/backbones/``; ``--quantization`` nf4 by default, as served). Prints markdown tables.

1. **A short request arriving while a long batch decodes.** ``--long-rows`` requests of ``--long-tokens`` new
   tokens start together; a short request (``--short-tokens``) arrives a quarter of the way through. Static
   batching makes it wait for the whole batch; continuous batching lets it join at the next step. Measured: the
   short request's time to first token (continuous: its first streamed delta; static: the start of the batch
   that serves it, a lower bound that favours static) and total latency, and the long batch's completion.
2. **Poisson arrivals** at three rates (fractions of the capacity measured first, ``--capacity``: ``steady``,
   requests per second while a saturated batch runs full, or ``batch``, over a saturated batch's makespan), 32
   users with one all-linear rank-16 adapter each, new tokens uniform in ``[--min-tokens, --max-tokens]``, the
   same seeded arrival schedule for every batcher: p50 and p99 latency and throughput (completion tokens per
   second of makespan).
3. **Throughput against bare ``generate``.** 16 requests of 16 distinct users through the continuous batcher,
   against ``model.generate`` on the bare backbone (no bank) with the same left-padded prompts, greedy.

Figures are medians of ``--runs`` runs; ratios are computed within a run. Each condition gets an untimed
warm-up first.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import add_int_options, word_prompts
from bench_serving import _bank, write_versions

from lorafleet.adapters import inject_bank
from lorafleet.adapters.dense import dense_budget, densify
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone, resolve_backbone_path
from lorafleet.serving import (
    AdapterCache,
    BatchingQueue,
    ContinuousBatcher,
    GenerationEngine,
    GenerationRequest,
)
from lorafleet.serving.decode import left_pad
from lorafleet.serving.engine import Outcome
from lorafleet.store.blob import open_blob_store

USERS, RANK = 32, 16


# --- the engine ----------------------------------------------------------------------------------------------
class Timed:
    """The engine as the static queue sees it, noting when each of its batches starts (for the short request's
    time to first token under static batching)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine, self.metrics = engine, engine.metrics
        self.starts: list[tuple[float, tuple[str | None, ...]]] = []

    def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        self.starts.append((time.perf_counter(), tuple(r.request_id for r in requests)))
        return self.engine.generate_each(requests)


def build(
    path: Path, quantization: str, store_dir: Path, *, dense_mb: int | None = None, device: str = "cpu"
) -> tuple[Backbone, GenerationEngine]:
    """The engine as ``build_engine`` makes it for the service (dense views of 4-bit layers within ``dense_mb``
    MiB, None: its default), over ``USERS`` random adapters."""
    backbone = load_backbone(path, quantization=quantization, device=device)
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=USERS + 1, max_rank=RANK)
    densify(
        backbone.model,
        budget_bytes=dense_budget(backbone.device, None if dense_mb is None else dense_mb << 20),
    )
    store = open_blob_store(f"file://{store_dir}")
    members = write_versions(bank, store, USERS, rank=RANK)
    banks = {f"user-{i}": _bank(f"user-{i}", [m]) for i, m in enumerate(members)}  # the default gate
    cache = AdapterCache.from_blob_store(bank, store, slots=range(1, USERS + 1))
    engine = GenerationEngine(backbone, bank, cache, resolve_bank=lambda t, u: banks[u])
    return backbone, engine


def prompts(backbone: Backbone, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct raw prompts of random lowercase words, at least ``tokens`` tokens each."""
    return word_prompts(backbone.tokenizer, n, tokens, np.random.default_rng(seed))


def request(user: int, prompt: str, new_tokens: int, request_id: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        tenant_id=1,
        user=f"user-{user % USERS}",
        prompt=prompt,
        raw=True,
        max_new_tokens=new_tokens,
        request_id=request_id,
    )


class Batchers:
    """Both batchers over one engine; only one runs at a time (they would share the model otherwise)."""

    def __init__(
        self, engine: GenerationEngine, max_batch_size: int, *, separate: bool = False, **continuous: Any
    ) -> None:
        self.engine, self.max_batch_size, self.continuous = engine, max_batch_size, continuous
        #: the batchers compared: static, continuous (joins fused into the step's forward where the model
        #: allows) and, with ``separate``, continuous with every join a forward of its own
        self.kinds = ("static", "continuous", "separate") if separate else ("static", "continuous")

    def open(self, kind: str) -> tuple[Any, Timed | None]:
        if kind in ("continuous", "separate"):
            batcher = ContinuousBatcher(
                self.engine,
                max_batch_size=self.max_batch_size,
                max_wait_ms=2.0,
                fuse_joins=kind == "continuous",
                **self.continuous,
            )
            return batcher, None
        timed = Timed(self.engine)
        return BatchingQueue(timed, max_batch_size=self.max_batch_size, max_wait_ms=2.0), timed


# --- 1. a short request during a long batch ----------------------------------------------------------------------
def bench_arrival(
    batchers: Batchers, backbone: Backbone, *, long_rows: int, long_tokens: int, short_tokens: int, runs: int
) -> dict[str, Any]:
    long_prompts = prompts(backbone, long_rows, 16, seed=1)
    (short_prompt,) = prompts(backbone, 1, 16, seed=2)
    longs = [request(i, p, long_tokens) for i, p in enumerate(long_prompts)]
    # how long the long batch takes alone: the short request arrives a quarter of the way through
    with ContinuousBatcher(batchers.engine, max_batch_size=batchers.max_batch_size) as warm:
        started = time.perf_counter()
        [f.result() for f in [warm.submit(r) for r in longs]]
        delay = 0.25 * (time.perf_counter() - started)
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(runs):
        for kind in batchers.kinds:
            got = one_arrival(batchers, kind, longs, short_prompt, short_tokens, delay)
            for key, value in got.items():
                samples.setdefault(kind, {}).setdefault(key, []).append(value)
    out: dict[str, Any] = {
        kind: {k: statistics.median(v) for k, v in m.items()} for kind, m in samples.items()
    }
    out["delay"], out["kinds"] = delay, batchers.kinds
    out["ratios"] = {
        key: statistics.median(
            s / c for s, c in zip(samples["static"][key], samples["continuous"][key], strict=True)
        )
        for key in ("short_ttft", "short_total")
    }
    return out


def one_arrival(
    batchers: Batchers,
    kind: str,
    longs: Sequence[GenerationRequest],
    short_prompt: str,
    short_tokens: int,
    delay: float,
) -> dict[str, float]:
    batcher, timed = batchers.open(kind)
    with batcher:
        started = time.perf_counter()
        long_futures = [batcher.submit(r) for r in longs]
        long_ends: list[float] = []
        for f in long_futures:
            f.add_done_callback(lambda _: long_ends.append(time.perf_counter()))
        time.sleep(delay)
        short = request(USERS - 1, short_prompt, short_tokens, request_id="short")
        arrived = time.perf_counter()
        first_token: list[float] = []
        if kind != "static":
            future: Future[Any] = batcher.submit(
                short, on_delta=lambda _: first_token.append(time.perf_counter()) if not first_token else None
            )
        else:
            future = batcher.submit(short)
        future.result()
        short_done = time.perf_counter()
        [f.result() for f in long_futures]
        long_done = max(long_ends)
    if timed is not None:  # static: the start of the batch that carried the short request
        first_token = [next(t for t, ids in timed.starts if "short" in ids)]
    return {
        "short_ttft": (first_token[0] if first_token else short_done) - arrived,
        "short_total": short_done - arrived,
        "long_batch": long_done - started,
    }


# --- 2. Poisson arrivals ---------------------------------------------------------------------------------------
def bench_poisson(
    batchers: Batchers,
    backbone: Backbone,
    *,
    n_requests: int,
    min_tokens: int,
    max_tokens: int,
    fractions: Sequence[float],
    runs: int,
    capacity_kind: str = "batch",
) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    texts = prompts(backbone, n_requests, 16, seed=4)
    lengths = [int(t) for t in rng.integers(min_tokens, max_tokens + 1, n_requests)]
    requests = [request(i, texts[i], lengths[i]) for i in range(n_requests)]
    capacities = measure_capacity(batchers, requests)
    capacity = capacities[capacity_kind]
    rows = []
    for fraction in fractions:
        rate = fraction * capacity
        gaps = np.random.default_rng(5).exponential(1.0 / rate, n_requests)
        per_kind: dict[str, list[dict[str, float]]] = {kind: [] for kind in batchers.kinds}
        for _ in range(runs):
            for kind in per_kind:
                per_kind[kind].append(one_poisson(batchers, kind, requests, gaps))
        row: dict[str, Any] = {"fraction": fraction, "rate": rate}
        for kind, results in per_kind.items():
            for key in ("p50", "p99", "tok_s"):
                row[f"{kind}_{key}"] = statistics.median(r[key] for r in results)
        for kind in batchers.kinds[1:]:
            row[f"{kind}_p99_ratio"] = statistics.median(
                s["p99"] / c["p99"] for s, c in zip(per_kind["static"], per_kind[kind], strict=True)
            )
        rows.append(row)
    return {"capacity": capacity, "capacities": capacities, "rows": rows, "kinds": batchers.kinds}


def measure_capacity(batchers: Batchers, requests: Sequence[GenerationRequest]) -> dict[str, float]:
    """Requests per second of continuous batching with every request queued at once. ``batch``: all of them over
    the makespan, which includes the tail where the queue is empty and the batch drains (fewer rows per step).
    ``steady``: while the batch runs full, i.e. until the last request joins, just after the ``n - max_batch_size``
    -th completion (a throughput benchmark's "maximum throughput"); ``batch`` when there are too few requests."""
    ends: list[float] = []
    with ContinuousBatcher(batchers.engine, max_batch_size=batchers.max_batch_size) as warm:
        started = time.perf_counter()
        futures = [warm.submit(r) for r in requests]
        for future in futures:
            future.add_done_callback(lambda _: ends.append(time.perf_counter()))
        [f.result() for f in futures]
        makespan = time.perf_counter() - started
    batch = len(requests) / makespan
    full = len(requests) - batchers.max_batch_size
    steady = full / (sorted(ends)[full - 1] - started) if full > 0 else batch
    return {"batch": batch, "steady": steady}


def one_poisson(
    batchers: Batchers, kind: str, requests: Sequence[GenerationRequest], gaps: Sequence[float]
) -> dict[str, float]:
    batcher, _ = batchers.open(kind)
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def done(arrived: float) -> Callable[[Future[Any]], None]:
        def note(future: Future[Any]) -> None:
            with lock:
                latencies.append(time.perf_counter() - arrived)
                tokens[0] += future.result().completion_tokens

        return note

    with batcher:
        started = time.perf_counter()
        due = started
        futures = []
        for req, gap in zip(requests, gaps, strict=True):
            due += float(gap)
            time.sleep(max(0.0, due - time.perf_counter()))
            future = batcher.submit(req)
            future.add_done_callback(done(time.perf_counter()))
            futures.append(future)
        [f.result() for f in futures]
        makespan = time.perf_counter() - started
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "tok_s": tokens[0] / makespan,
    }


# --- 3. against bare generate ------------------------------------------------------------------------------------
def bench_bare(
    batchers: Batchers, backbone: Backbone, bare: Backbone, *, rows: int, new_tokens: int, runs: int
) -> dict[str, Any]:
    texts = prompts(backbone, rows, 16, seed=6)
    requests = [request(i, t, new_tokens) for i, t in enumerate(texts)]
    ids, mask = left_pad([tuple(bare.tokenizer(t)["input_ids"]) for t in texts], pad_id=0, device=bare.device)
    counts: dict[str, int] = {}

    def run_bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = bare.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=int(bare.tokenizer.pad_token_id or 0),
            )
        counts["bare"] = int(out.shape[0] * (out.shape[1] - ids.shape[1]))
        return time.perf_counter() - started

    def run_engine(batcher: ContinuousBatcher) -> float:
        started = time.perf_counter()
        results = [f.result() for f in [batcher.submit(r) for r in requests]]
        counts["engine"] = sum(r.completion_tokens for r in results)
        return time.perf_counter() - started

    samples: dict[str, list[float]] = {"bare": [], "engine": []}
    with ContinuousBatcher(batchers.engine, max_batch_size=max(rows, batchers.max_batch_size)) as batcher:
        run_bare()
        run_engine(batcher)
        for _ in range(runs):
            samples["bare"].append(counts.get("bare", 0) / run_bare())
            samples["engine"].append(counts.get("engine", 0) / run_engine(batcher))
    return {
        "bare_tok_s": statistics.median(samples["bare"]),
        "engine_tok_s": statistics.median(samples["engine"]),
        "ratio": statistics.median(e / b for e, b in zip(samples["engine"], samples["bare"], strict=True)),
        "engine_tokens": counts["engine"],
        "bare_tokens": counts["bare"],
    }


# --- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", help="'tiny' or builtin:smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--quantization", default=None, help="default: fp32 on tiny, nf4 on a real backbone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", default="arrival,poisson,bare")
    add_int_options(parser, max_batch_size=32)
    add_int_options(parser, long_rows=8, long_tokens=96, short_tokens=8)  # part 1: arrival
    add_int_options(parser, requests=64, min_tokens=8, max_tokens=64)  # part 2: Poisson
    parser.add_argument("--fractions", default="0.3,0.6,0.9")
    parser.add_argument(
        "--capacity",
        choices=("steady", "batch"),
        default="batch",
        help="what the rates are fractions of (measure_capacity): the full batch's throughput, or the makespan's",
    )
    parser.add_argument("--bare-rows", type=int, default=16)
    parser.add_argument("--bare-tokens", type=int, default=32)
    parser.add_argument(
        "--join-ratio", type=float, default=None, help="ContinuousBatcher's (default: its own)"
    )
    parser.add_argument("--join-delay", type=int, default=None, help="its max_join_delay_steps")
    parser.add_argument(
        "--dense-mb",
        type=int,
        default=None,
        help="the engine's dense views of 4-bit layers, MiB (LORAFLEET_SERVING_DENSE_MB; default: the service's, "
        "1024 on CPU; 0: dequantise at every call, as before). The bare generate of part 3 keeps the 4-bit layers",
    )
    parser.add_argument(
        "--separate",
        action="store_true",
        help="also continuous batching with every join a forward of its own (fuse_joins=False)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone == "tiny":
            path, quantization = build_tiny_backbone(Path(tmp) / "data"), args.quantization or "fp32"
        else:
            path = resolve_backbone_path(args.backbone, data_dir=args.data_dir)
            quantization = args.quantization or "nf4"
        backbone, engine = build(
            path, quantization, Path(tmp) / "blobs", dense_mb=args.dense_mb, device=args.device
        )
        knobs = {"join_ratio": args.join_ratio, "max_join_delay_steps": args.join_delay}
        batchers = Batchers(
            engine,
            args.max_batch_size,
            separate=args.separate,
            **{k: v for k, v in knobs.items() if v is not None},
        )
        parts = set(args.parts.split(","))
        dense = "the default" if args.dense_mb is None else f"{args.dense_mb} MiB"
        print(
            f"backbone {args.backbone} ({quantization}, dense views: {dense}), {args.threads} thread(s), "
            f"medians of {args.runs}\n"
        )
        if "arrival" in parts:
            report_arrival(
                bench_arrival(
                    batchers,
                    backbone,
                    long_rows=args.long_rows,
                    long_tokens=args.long_tokens,
                    short_tokens=args.short_tokens,
                    runs=args.runs,
                ),
                args,
            )
        if "poisson" in parts:
            report_poisson(
                bench_poisson(
                    batchers,
                    backbone,
                    n_requests=args.requests,
                    min_tokens=args.min_tokens,
                    max_tokens=args.max_tokens,
                    fractions=[float(f) for f in args.fractions.split(",")],
                    runs=args.runs,
                    capacity_kind=args.capacity,
                ),
                args,
            )
        if "bare" in parts:
            bare = load_backbone(path, quantization=quantization, device=args.device)
            report_bare(
                bench_bare(
                    batchers, backbone, bare, rows=args.bare_rows, new_tokens=args.bare_tokens, runs=args.runs
                ),
                args,
            )


def report_arrival(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"### A short request ({args.short_tokens} tokens) arriving {r['delay']:.2f} s into a batch of "
        f"{args.long_rows} x {args.long_tokens} tokens\n"
    )
    print("| batching | short: first token (s) | short: total (s) | long batch (s) |")
    print("| --- | --- | --- | --- |")
    for kind in r["kinds"]:
        m = r[kind]
        print(f"| {kind} | {m['short_ttft']:.3f} | {m['short_total']:.3f} | {m['long_batch']:.2f} |")
    ratios = r["ratios"]
    print(
        f"\nstatic / continuous: first token {ratios['short_ttft']:.1f}x, total {ratios['short_total']:.1f}x\n"
    )


def report_poisson(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"### Poisson arrivals: {args.requests} requests, {USERS} users, {args.min_tokens}-{args.max_tokens} new "
        f"tokens; capacity {r['capacity']:.2f} req/s ({args.capacity}; steady {r['capacities']['steady']:.2f}, "
        f"batch {r['capacities']['batch']:.2f})\n"
    )
    kinds = r["kinds"]
    print(
        "| rate (req/s) | "
        + " | ".join(f"{k} p50 / p99 (s)" for k in kinds)
        + " | "
        + " | ".join(f"p99 static / {k}" for k in kinds[1:])
        + " | tok/s "
        + " / ".join(kinds)
        + " |"
    )
    print("| --- " * (2 * len(kinds) + 1) + "|")
    for row in r["rows"]:
        print(
            f"| {row['rate']:.2f} ({row['fraction']:.0%}) | "
            + " | ".join(f"{row[f'{k}_p50']:.2f} / {row[f'{k}_p99']:.2f}" for k in kinds)
            + " | "
            + " | ".join(f"{row[f'{k}_p99_ratio']:.2f}x" for k in kinds[1:])
            + " | "
            + " / ".join(f"{row[f'{k}_tok_s']:.1f}" for k in kinds)
            + " |"
        )
    print()


def report_bare(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"### {args.bare_rows} distinct users x {args.bare_tokens} greedy tokens against bare `generate`\n")
    print("| | tok/s |")
    print("| --- | --- |")
    print(f"| bare `generate` (no bank) | {r['bare_tok_s']:.1f} |")
    print(f"| engine, continuous batcher | {r['engine_tok_s']:.1f} |")
    print(
        f"\nengine / bare: {r['ratio']:.2f}x (tokens: engine {r['engine_tokens']}, bare {r['bare_tokens']})\n"
    )


if __name__ == "__main__":
    main()
