"""API feedback-ingestion throughput: records/s through one API process, load generated from another.

Starts ``python -m services.api`` (one uvicorn process, no workers, no scheduler) on 127.0.0.1 with a fresh
data directory, creates a tenant through the admin route, then posts feedback batches through the SDK from
this process: ``--clients`` threads, each sending ``--batches`` batches of ``--batch-size`` distinct sft records
for its own users. Reports records/s (median of ``--runs`` runs, each run on new records) for SQLite and, with
``--postgres``, for a PostgreSQL database this script creates and drops. Loopback only; bounded in count.

    .venv/bin/python tests/benchmarks/bench_api.py [--postgres]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import _common  # (also puts the repository root on sys.path, for the tests.* helpers below)
import httpx
from tests.databases import migrated_pg_database

from lorafleet.sdk import Client

ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_process(*, data_dir: Path, database_url: str | None) -> Iterator[str]:
    """One API process on a free loopback port, stopped (SIGTERM) on exit."""
    port = _free_port()
    env = {**os.environ, "LORAFLEET_DATA_DIR": str(data_dir), "LORAFLEET_ADMIN_KEY": ADMIN_KEY}
    if database_url:
        env["LORAFLEET_DATABASE_URL"] = database_url
    cmd = [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port), "--migrate"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "API did not start: " + (proc.stderr.read().decode()[-2000:] if proc.stderr else "")
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _records(tag: str, n: int) -> list[dict[str, object]]:
    return [
        {"kind": "sft", "prompt": f"Q: {tag} item {i}?\nA:", "completion": f" answer {i} for {tag}"}
        for i in range(n)
    ]


def one_run(url: str, key: str, *, clients: int, batches: int, batch_size: int) -> float:
    """Records/s for ``clients`` threads each sending ``batches`` batches (all new records)."""
    run = uuid.uuid4().hex[:8]
    errors: list[BaseException] = []

    def worker(c: int) -> None:
        try:
            with Client(url, key, timeout=60) as client:
                for b in range(batches):
                    client.submit_feedback(f"user-{run}-{c}", _records(f"{run}-{c}-{b}", batch_size))
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return clients * batches * batch_size / elapsed


def measure(label: str, *, database_url: str | None, args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        api_process(data_dir=Path(tmp), database_url=database_url) as url,
    ):
        with Client(url, ADMIN_KEY) as admin:
            key = admin.create_tenant(f"bench-{uuid.uuid4().hex[:8]}").api_key
        one_run(url, key, clients=1, batches=2, batch_size=args.batch_size)  # warm-up
        rates = []
        for i in range(args.runs):
            rates.append(
                one_run(url, key, clients=args.clients, batches=args.batches, batch_size=args.batch_size)
            )
            print(f"  {label} run {i + 1}/{args.runs}: {rates[-1]:,.0f} records/s", flush=True)
        print(
            f"{label}: median {statistics.median(rates):,.0f} records/s "
            f"({args.clients} clients x {args.batches} batches x {args.batch_size} records, {args.runs} runs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_int_options(parser, clients=4, batches=10, batch_size=100, runs=5)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    measure("SQLite", database_url=None, args=args)
    if args.postgres:
        with migrated_pg_database("lorafleet_bench_api") as url:
            measure("PostgreSQL", database_url=url, args=args)


if __name__ == "__main__":
    main()
