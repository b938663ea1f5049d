"""Registry latency at scale: register, promote and live-version lookup with 10,000 users and 100,000
versions, on PostgreSQL (a database this script creates and drops) and, as a second column, SQLite.

The population is bulk-inserted (not through ``register_version``) so it takes seconds; the timed calls go
through the public ``Registry`` API with a local-directory blob store. Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_registry.py            # both databases
    .venv/bin/python tests/benchmarks/bench_registry.py --no-sqlite
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")

import _common  # noqa: E402  (also puts the repository root on sys.path, for the tests.* helpers below)
from sqlalchemy import insert, text  # noqa: E402
from tests.databases import migrated_pg_database  # noqa: E402
from tests.unit.registry.registry_helpers import write_adapter_dir  # noqa: E402

from lorafleet.registry import Registry  # noqa: E402
from lorafleet.store.blob import LocalBlobStore  # noqa: E402
from lorafleet.store.sql import migrate  # noqa: E402
from lorafleet.store.sql.database import Database  # noqa: E402
from lorafleet.store.sql.models import (  # noqa: E402
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlAliasEvent,
    SqlTenant,
    SqlUser,
    utcnow,
)

BATCH = 5000


@dataclass(frozen=True)
class Scale:
    tenants: int
    users: int
    versions_per_user: int

    def tenant_of(self, user_id: int) -> int:
        return (user_id - 1) % self.tenants + 1


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p95_ms: float
    n: int


# --- databases -------------------------------------------------------------------------------------------
@contextmanager
def sqlite_database(workdir: Path) -> Iterator[str]:
    url = f"sqlite:///{workdir / 'bench.db'}"
    migrate.upgrade(url)
    yield url


# --- population ------------------------------------------------------------------------------------------
def _batched(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def populate(db: Database, scale: Scale) -> None:
    """Tenants, users (one adapter each), versions 1..k per adapter with k live, and one alias event each."""
    now, k = utcnow(), scale.versions_per_user
    users = range(1, scale.users + 1)
    tables: list[tuple[Any, Callable[[], Iterator[dict[str, Any]]]]] = [
        (
            SqlTenant,
            lambda: (
                {"id": t, "name": f"tenant-{t}", "created_at": now} for t in range(1, scale.tenants + 1)
            ),
        ),
        (
            SqlUser,
            lambda: (
                {"id": u, "tenant_id": scale.tenant_of(u), "external_id": f"user-{u}", "created_at": now}
                for u in users
            ),
        ),
        (SqlAdapter, lambda: (_adapter_row(u, scale, now) for u in users)),
        (SqlAdapterVersion, lambda: (_version_row(u, n, k, now) for u in users for n in range(1, k + 1))),
        (
            SqlAlias,
            lambda: (
                {"adapter_id": u, "name": "live", "version_id": u * k, "updated_at": now} for u in users
            ),
        ),
        (SqlAliasEvent, lambda: (_event_row(u, k, now) for u in users)),
    ]
    with db.engine.begin() as conn:
        for model, rows in tables:
            for batch in _batched(rows()):
                conn.execute(insert(model), batch)
        if db.dialect == "postgresql":
            for table in ("tenants", "users", "adapters", "adapter_versions", "alias_history"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                    )
                )
            conn.execute(text("ANALYZE"))


def _adapter_row(u: int, scale: Scale, now: Any) -> dict[str, Any]:
    return {
        "id": u,
        "tenant_id": scale.tenant_of(u),
        "owner_user_id": u,
        "name": "chat",
        "target_config": {"r": 8},
        "version_count": scale.versions_per_user,
        "created_at": now,
    }


def _version_row(u: int, n: int, k: int, now: Any) -> dict[str, Any]:
    digest = f"{u:032x}{n:032x}"
    return {
        "id": (u - 1) * k + n,
        "adapter_id": u,
        "number": n,
        "blob_uri": f"file:///bench/{digest}",
        "sha256": digest,
        "size_bytes": 20480,
        "base_fingerprint": "bench",
        "rank": 8,
        "target_modules": ["q_proj", "v_proj"],
        "training_config": {},
        "metrics": {},
        "status": "live" if n == k else "archived",
        "created_at": now,
    }


def _event_row(u: int, k: int, now: Any) -> dict[str, Any]:
    return {
        "adapter_id": u,
        "alias": "live",
        "from_version_id": u * k - 1,
        "to_version_id": u * k,
        "actor": "bench",
        "reason": "",
        "created_at": now,
    }


# --- measurements ----------------------------------------------------------------------------------------
def timed(fn: Callable[[int], object], reps: int, warmup: int = 3) -> Stats:
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(reps):
        start = time.perf_counter()
        fn(warmup + i)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return Stats(statistics.median(samples), samples[min(len(samples) - 1, int(0.95 * len(samples)))], reps)


def measure(url: str, scale: Scale, workdir: Path, reps: dict[str, int]) -> dict[str, Stats]:
    db = Database(url)
    try:
        started = time.perf_counter()
        populate(db, scale)
        print(f"  populated {url.split('/')[-1]} in {time.perf_counter() - started:.1f}s", flush=True)
        registry = Registry(db, LocalBlobStore(workdir / f"blobs-{db.dialect}"))
        rng = random.Random(42)
        live = {u: scale.versions_per_user for u in range(1, scale.users + 1)}

        def lookup(_: int) -> None:
            u = rng.randint(1, scale.users)
            version = registry.live_version(tenant_id=scale.tenant_of(u), adapter_id=u)
            assert version is not None and version.number == live[u]

        def promote(_: int) -> None:
            u = rng.randint(1, scale.users)
            target = rng.choice([n for n in range(1, scale.versions_per_user + 1) if n != live[u]])
            registry.promote(tenant_id=scale.tenant_of(u), adapter_id=u, number=target, actor="bench")
            live[u] = target

        folders = [
            write_adapter_dir(workdir / f"adapter-{i}", seed=i, rank=8) for i in range(reps["register"] + 3)
        ]

        def register(i: int) -> None:
            u = rng.randint(1, scale.users)
            registry.register_version(
                tenant_id=scale.tenant_of(u), adapter_id=u, adapter_dir=folders[i], base_fingerprint="bench"
            )

        return {
            "live_version": timed(lookup, reps["lookup"]),
            "promote": timed(promote, reps["promote"]),
            "register_version": timed(register, reps["register"]),
        }
    finally:
        db.dispose()


def print_table(results: dict[str, dict[str, Stats]], scale: Scale) -> None:
    columns = list(results)
    print(
        f"\nregistry latency, {scale.users:,} users / {scale.users * scale.versions_per_user:,} versions "
        f"({scale.tenants} tenants), milliseconds\n"
    )
    header = "| operation | " + " | ".join(f"{c} median | {c} p95" for c in columns) + " | n |"
    print(header)
    print("|" + " --- |" * (2 + 2 * len(columns)))
    for op in ("live_version", "promote", "register_version"):
        cells = " | ".join(f"{results[c][op].median_ms:.2f} | {results[c][op].p95_ms:.2f}" for c in columns)
        print(f"| {op} | {cells} | {results[columns[0]][op].n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_int_options(
        parser, users=10_000, versions_per_user=10, tenants=10, lookups=1000, promotes=300, registers=60
    )
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    scale = Scale(tenants=args.tenants, users=args.users, versions_per_user=args.versions_per_user)
    reps = {"lookup": args.lookups, "promote": args.promotes, "register": args.registers}
    results: dict[str, dict[str, Stats]] = {}
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        workdir = Path(tmp)
        with migrated_pg_database("lorafleet_bench") as url:
            print("PostgreSQL", flush=True)
            results["PostgreSQL"] = measure(url, scale, workdir / "pg", reps)
        if not args.no_sqlite:
            (workdir / "sqlite").mkdir()
            with sqlite_database(workdir / "sqlite") as url:
                print("SQLite", flush=True)
                results["SQLite"] = measure(url, scale, workdir / "sqlite", reps)
    print_table(results, scale)


if __name__ == "__main__":
    main()
