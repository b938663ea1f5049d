"""Serving through Ray Serve against the in-process engine (not CI): requests/s, and the latency of the hop.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_serve.py [--size medium]`` (about 4
minutes for the tiny backbone, 8 for the medium one, on 2 CPU cores). Prints the markdown table of
tests/benchmarks/README.md ("Ray Serve").

Setup: a local Ray on 127.0.0.1 (a new one, never another process's), a fresh data directory with a SQLite
database and a local blob store, the tiny backbone (or ``--size medium``) in fp32, ``--users`` users with one
personal adapter each (rank 4 on q_proj and v_proj). Three ways to serve the same requests, all with the same
engine options (``--slots`` slots, batches of up to ``--batch`` requests, 5 ms batching wait):

- in-process: ``GenerationEngine`` behind a ``BatchingQueue`` in this process (what the API does by default);
- Serve, 1 replica and Serve, 2 replicas: two Serve apps (one CPU per replica) called through ``ServeClient``.

1. Throughput: ``--concurrency`` threads each send single greedy requests (``--new-tokens`` new tokens) for
   users drawn in a fixed order, ``--requests`` in total; requests/s over the whole set.
2. Latency: one request at a time, ``--latency-requests`` of them; the p50, and the Serve hop: the p50 through
   Serve minus the in-process p50 (both include the same 5 ms batching wait).

Every mode is warmed up first (each user once: adapters loaded in every cache). Runs are interleaved across
the modes, ``--runs`` of them; the table gives medians, ratios are medians of per-run ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# a local Ray binds to loopback only, and must be our own (ray.init() joins any cluster found on the machine)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _common import BACKBONE_SIZES, add_int_options  # noqa: E402
from tests.lora_weights import write_random_peft_folder  # noqa: E402

from lorafleet.backbone import build_tiny_backbone  # noqa: E402
from lorafleet.config import Settings, load_settings  # noqa: E402
from lorafleet.registry import Registry  # noqa: E402
from lorafleet.runtime.ray_serve import ReplicaOptions, ServeClient, deploy  # noqa: E402
from lorafleet.serving import BatchingQueue, GenerationRequest, GenerationResult  # noqa: E402
from lorafleet.serving.factory import build_engine  # noqa: E402
from lorafleet.store.blob import open_blob_store_from_settings  # noqa: E402
from lorafleet.store.sql import migrate  # noqa: E402
from lorafleet.store.sql.database import Database  # noqa: E402
from lorafleet.store.sql.tenants import TenantRepository  # noqa: E402

PROMPT = "Tell me something about the weather in the mountains"
Generate = Callable[[GenerationRequest], GenerationResult]


# --- data --------------------------------------------------------------------------------------------------
def populate(settings: Settings, n_users: int) -> tuple[int, list[str]]:
    """A tenant and ``n_users`` users, each with a live personal adapter; the tenant id and the user ids."""
    db = Database(settings.resolved_database_url)
    registry = Registry(db, open_blob_store_from_settings(settings))
    tenants = TenantRepository(db)
    tenant, _key = tenants.create_tenant(name="bench")
    users = [f"user-{i}" for i in range(n_users)]
    for i, user in enumerate(users):
        owner = tenants.get_or_create_user(tenant_id=tenant.id, external_id=user)
        adapter = registry.get_or_create_adapter(
            tenant_id=tenant.id, owner_user_id=owner.id, name="personal", target_config={}
        )
        folder = write_random_peft_folder(
            settings.backbone, settings.data_dir, settings.data_dir / f"adapter-{i}", seed=i
        )
        version = registry.register_version(
            tenant_id=tenant.id, adapter_id=adapter.id, adapter_dir=folder, base_fingerprint="tiny"
        )
        registry.promote(tenant_id=tenant.id, adapter_id=adapter.id, number=version.number, actor="bench")
    db.dispose()
    return tenant.id, users


# --- measuring ---------------------------------------------------------------------------------------------
def throughput(generate: Generate, requests: Sequence[GenerationRequest], concurrency: int) -> float:
    """Requests/s of ``requests`` sent one per call from ``concurrency`` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(generate, requests))
    seconds = time.perf_counter() - started
    assert all(isinstance(r, GenerationResult) for r in results)
    return len(requests) / seconds


def latency_p50(generate: Generate, requests: Sequence[GenerationRequest]) -> float:
    """The median seconds of single requests sent one at a time."""
    seconds = []
    for request in requests:
        started = time.perf_counter()
        generate(request)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # as the replicas (OMP_NUM_THREADS=1): the engines get the same threads
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        path = build_tiny_backbone(data_dir, **BACKBONE_SIZES[args.size])
        url = f"sqlite:///{data_dir / 'bench.db'}"
        migrate.upgrade(url)
        settings = load_settings(
            data_dir=data_dir,
            backbone=str(path) if BACKBONE_SIZES[args.size] else "builtin:tiny",
            database_url=url,
            backbone_quantization="fp32",
            device="cpu",
            ray_address="",
            ray_num_cpus=4,
        )
        tenant_id, users = populate(settings, args.users)
        modes = start_modes(settings, args)
        order = random.Random(0)
        rows = [order.choice(users) for _ in range(args.requests)]

        def requests(users_in_order: Sequence[str]) -> list[GenerationRequest]:
            return [
                GenerationRequest(tenant_id=tenant_id, user=u, prompt=PROMPT, max_new_tokens=args.new_tokens)
                for u in users_in_order
            ]

        for generate in modes.values():  # warm-up: every adapter in every cache
            for request in requests(users):
                generate(request)
        results: dict[str, dict[str, list[float]]] = {m: {"rps": [], "p50": []} for m in modes}
        for n in range(args.runs):
            for name, generate in modes.items():
                results[name]["rps"].append(throughput(generate, requests(rows), args.concurrency))
                latency_users = rows[: args.latency_requests]
                results[name]["p50"].append(latency_p50(generate, requests(latency_users)))
            print(
                f"run {n + 1}/{args.runs}: "
                + ", ".join(f"{m} {r['rps'][-1]:.1f}/s" for m, r in results.items())
            )
        print_table(results, args)


def start_modes(settings: Settings, args: argparse.Namespace) -> dict[str, Generate]:
    """The in-process engine and the two Serve apps (1 and 2 replicas), each as ``generate(request)``."""
    options = ReplicaOptions(
        n_slots=args.slots,
        max_rank=8,
        max_batch_size=args.batch,
        max_wait_ms=5.0,
        num_cpus=1.0,
        env_vars={"OMP_NUM_THREADS": "1"},
    )
    db = Database(settings.resolved_database_url)
    engine = build_engine(
        settings, db, Registry(db, open_blob_store_from_settings(settings)), n_slots=args.slots, max_rank=8
    )
    queue = BatchingQueue(engine, max_batch_size=args.batch, max_wait_ms=5.0)
    modes: dict[str, Generate] = {"in-process": lambda r: queue.submit(r).result(timeout=300)}
    for replicas in (1, 2):
        app = settings.model_copy(update={"serve_app_name": f"bench-{replicas}", "serve_replicas": replicas})
        started = time.perf_counter()
        deploy(app, options, http_port=args.http_port)
        print(f"Serve app with {replicas} replica(s) running after {time.perf_counter() - started:.0f} s")
        client = ServeClient(app, timeout_s=300)
        modes[f"Serve, {replicas} replica{'s' if replicas > 1 else ''}"] = _single(client)
    return modes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _single(client: ServeClient) -> Generate:
    return lambda request: client.generate([request])[0]


def print_table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    base = results["in-process"]
    print(
        f"\n{args.size} backbone, {args.users} users, {args.requests} requests of {args.new_tokens} new tokens from {args.concurrency} "
        f"threads; latency over {args.latency_requests} single requests; median of {args.runs} runs\n"
    )
    print("| mode | requests/s | vs in-process | p50 latency (ms) | Serve hop, p50 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ratio = statistics.median(a / b for a, b in zip(r["rps"], base["rps"], strict=True))
        hop = statistics.median(a - b for a, b in zip(r["p50"], base["p50"], strict=True)) * 1000
        hop_text = "-" if name == "in-process" else f"{hop:+.1f}"
        print(
            f"| {name} | {statistics.median(r['rps']):.1f} | {ratio:.2f}x | "
            f"{statistics.median(r['p50']) * 1000:.1f} | {hop_text} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", choices=sorted(BACKBONE_SIZES), default="tiny")
    add_int_options(parser, users=16, requests=256, concurrency=16, new_tokens=16)
    add_int_options(parser, latency_requests=40, runs=5, slots=32, batch=16)
    parser.add_argument(
        "--http-port", type=int, default=0, help="the Serve proxy's port on 127.0.0.1 (0: free)"
    )
    args: Any = parser.parse_args(argv)
    args.http_port = args.http_port or _free_port()
    try:
        run(args)
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
