"""Soak benchmark of serving (not CI): does latency drift while a service runs?

A new user reported a service that, after running a while, served 32 users on 16 adapter slots at p99 8.6 s and
18 req/s, against p99 0.6 s and 41.6 req/s after a restart. This runs the real HTTP service (uvicorn in this
process, the embedded defaults: SQLite and a local object store, the tiny backbone unless ``--backbone``) with
32 users, each with a live personal adapter, on ``--slots`` adapter slots (fewer than users, so slots are
evicted and reloaded all along), and ``--clients`` threads sending requests through the SDK at a fixed
``--rate`` (open loop: a late answer does not slow the arrivals) for ``--minutes``, with new tokens uniform in
``[--min-tokens, --max-tokens]`` and a mix of ``/generate``, ``/v1/completions`` and streamed chat.

Per minute it prints p50 and p99 latency, answered requests per second, errors, the process's resident memory,
the adapter cache's loads and evictions, and the running batch. The verdict compares the last minute's p99 with
the first's (the issue's bound: within 1.5x).

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_soak.py --minutes 10``.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path, for the tests.* helpers below)
import numpy as np
from services.api.app import create_app
from services.api.runtime import ApiOptions
from tests.integration.services.api_helpers import ApiServer  # the real uvicorn server the API tests use
from tests.lora_weights import random_lora_weights

from lorafleet import Client
from lorafleet.adapters import SlotConfig, inject_bank, save_slot
from lorafleet.backbone import load_backbone
from lorafleet.config import load_settings
from lorafleet.platform import Platform

USERS = 32


@dataclass
class Minute:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def adapter_folders(data_dir: Path, dest: Path, n: int, *, backbone: str, quantization: str) -> list[Path]:
    """``n`` real PEFT folders (random rank-8 A and B on every linear layer), written through one bank slot."""
    loaded = load_backbone(backbone, quantization=quantization, device="cpu", data_dir=data_dir)
    bank = inject_bank(loaded, target_modules="all-linear", n_slots=1, max_rank=8)
    folders = []
    for seed in range(n):
        tensors = random_lora_weights(bank, rank=8, seed=seed, scale=0.02)
        bank.load_slot(0, tensors, SlotConfig(rank=8, alpha=16.0), replace=True)
        folders.append(save_slot(bank, 0, dest / f"adapter-{seed}").directory)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second, all clients together")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--backbone", default="builtin:tiny")
    parser.add_argument("--quantization", default="fp32")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        settings = load_settings(
            data_dir=data,
            backbone=args.backbone,
            backbone_quantization=args.quantization,
            device="cpu",
            ray_address="",
            admin_key="soak-admin",
            promote_rule="never",
        )
        platform = Platform.from_settings(settings, migrate=True)
        tenant, api_key = platform.tenants.create_tenant(name="soak")
        folders = adapter_folders(
            data, data / "folders", USERS, backbone=args.backbone, quantization=args.quantization
        )
        for i, folder in enumerate(folders):
            user = platform.tenants.get_or_create_user(tenant_id=tenant.id, external_id=f"user-{i}")
            adapter = platform.registry.get_or_create_adapter(
                tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
            )
            version = platform.registry.register_version(
                tenant_id=tenant.id, adapter_id=adapter.id, adapter_dir=folder, base_fingerprint="soak"
            )
            platform.registry.promote(
                tenant_id=tenant.id, adapter_id=adapter.id, number=version.number, actor="soak"
            )
        platform.close()
        options = ApiOptions(engine_slots=args.slots, engine_max_rank=8, preload_engine=True)
        server = ApiServer(create_app(settings, options=options)).start()
        try:
            run(server, api_key, args)
        finally:
            server.stop()


def run(server: Any, api_key: str, args: argparse.Namespace) -> None:
    services = server.server.config.app.state.services
    with Client(server.url, api_key, timeout=120, max_retries=0) as warm:
        deadline = time.monotonic() + 300
        while warm.ready().engine != "ready":
            assert time.monotonic() < deadline, "the engine did not load"
            time.sleep(0.2)
    windows: dict[int, Minute] = {}
    lock = threading.Lock()
    started = time.monotonic()
    end = started + 60.0 * args.minutes
    gap = args.clients / args.rate  # each client's mean gap between arrivals (Poisson per client)

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        with Client(server.url, api_key, timeout=120, max_retries=0) as client:
            due = time.monotonic() + rng.expovariate(1.0 / gap)
            while due < end:
                time.sleep(max(0.0, due - time.monotonic()))
                user = f"user-{rng.randrange(USERS)}"
                tokens = rng.randint(args.min_tokens, args.max_tokens)
                kind = rng.random()
                sent = time.monotonic()
                ok = True
                try:
                    if kind < 0.4:
                        client.generate(user, f"Tell me about item {rng.randrange(1000)}.", max_tokens=tokens)
                    elif kind < 0.7:
                        client.complete(
                            user, f"Item {rng.randrange(1000)} is", max_tokens=tokens, temperature=0.7
                        )
                    else:
                        messages = [{"role": "user", "content": f"Describe item {rng.randrange(1000)}."}]
                        for _ in client.stream_chat(user, messages, max_tokens=tokens, temperature=0.7):
                            pass
                except Exception:  # counted; the soak goes on
                    ok = False
                done = time.monotonic()
                window = int((sent - started) // args.window)
                with lock:
                    minute = windows.setdefault(window, Minute())
                    if ok:
                        minute.latencies.append(done - sent)
                    else:
                        minute.errors += 1
                due += rng.expovariate(1.0 / gap)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    print(
        f"soak: {args.minutes:g} min, {args.rate:g} req/s from {args.clients} clients, {USERS} users on "
        f"{args.slots} slots, {args.min_tokens}-{args.max_tokens} new tokens, {args.backbone} ({args.quantization})\n"
    )
    print(
        "| window | answered | p50 (s) | p99 (s) | req/s | errors | RSS (MiB) | loads | evictions | mean running |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    reported, before = 0, None
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        now_window = int((time.monotonic() - started) // args.window)
        if now_window > reported:
            before = report(reported, windows, lock, services, args, before)
            reported = now_window
    for thread in threads:
        thread.join()
    last = max(windows)
    while reported <= last:
        before = report(reported, windows, lock, services, args, before)
        reported += 1
    verdict(windows, lock)


def report(
    window: int,
    windows: dict[int, Minute],
    lock: threading.Lock,
    services: Any,
    args: argparse.Namespace,
    before: Any,
) -> Any:
    with lock:
        minute = windows.get(window, Minute())
        latencies = list(minute.latencies)
    engine = services.engine.serving_engine
    stats = engine.cache.stats()
    snap = engine.metrics.snapshot()
    steps = (snap["decode_steps"], snap["decode_step_rows"])
    delta = (steps[0] - before[0], steps[1] - before[1]) if before else steps
    running = delta[1] / delta[0] if delta[0] else 0.0
    rss = current_rss_mib()
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    print(
        f"| {window + 1} | {len(latencies)} | {p50:.2f} | {p99:.2f} | {len(latencies) / args.window:.2f} | "
        f"{minute.errors} | {rss:.0f} | {stats.loads} | {stats.evictions} | {running:.1f} |",
        flush=True,
    )
    return steps


def current_rss_mib() -> float:
    """The process's resident memory now (``VmRSS``), not its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def verdict(windows: dict[int, Minute], lock: threading.Lock) -> None:
    with lock:
        full = [w for w in sorted(windows) if len(windows[w].latencies) >= 20]
        if len(full) < 2:
            print("\nnot enough windows for a verdict")
            return
        first = float(np.percentile(windows[full[0]].latencies, 99))
        last = float(np.percentile(windows[full[-1]].latencies, 99))
    print(f"\np99: first window {first:.2f} s, last {last:.2f} s: ratio {last / first:.2f} (bound 1.5)")


if __name__ == "__main__":
    main()
