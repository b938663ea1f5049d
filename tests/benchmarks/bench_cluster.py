"""Training throughput on a Ray cluster: jobs/minute with one trainer node against two.

Starts a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, every node on 127.0.0.1): a
head without the trainer resource and two worker nodes with ``num_cpus=1`` and ``lorafleet_trainer: 1``, and
a ``TrainerPool`` of two actors, one per worker node (the nf4 built-in tiny backbone, loaded once per actor),
against a PostgreSQL database this script creates and drops and a local blob directory. Each round queues the
same jobs (``--users`` users with the same synthetic feedback, one user per job, a fresh tenant per round) and
times them from the scheduler tick until the queue is drained, either by the first actor alone ("1 node": the
other node idles) or by both ("2 nodes"). Rounds of the two configurations alternate, so load from other work
on the machine hits both alike; one untimed warm-up round each first. Reports the median jobs/minute of
``--runs`` rounds per configuration, and the ratio of 2 nodes to 1.

    .venv/bin/python tests/benchmarks/bench_cluster.py [--users 16] [--runs 5] [--max-steps 24]
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: nodes bind to 127.0.0.1
os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread per actor: each node offers one CPU

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import _common  # noqa: E402, F401  (puts the repository root on sys.path, for the tests.* helpers below)
from tests.databases import migrated_pg_database  # noqa: E402

from lorafleet.backbone import build_tiny_backbone  # noqa: E402
from lorafleet.config import Settings, load_settings  # noqa: E402
from lorafleet.jobs import JobQueue, Scheduler, SchedulerPolicy  # noqa: E402
from lorafleet.store.sql.database import Database  # noqa: E402
from lorafleet.store.sql.tenants import TenantRepository  # noqa: E402
from lorafleet.training.synthetic import make_user_records  # noqa: E402
from lorafleet.workflows.feedback import ingest_feedback  # noqa: E402


@dataclass(frozen=True)
class Round:
    jobs: int
    seconds: float
    #: jobs run per Ray node id (the worker id of a job's ``lease_owner`` names its node)
    per_node: dict[str, int]

    @property
    def jobs_per_minute(self) -> float:
        return 60.0 * self.jobs / self.seconds


@contextmanager
def local_cluster(trainer_nodes: int) -> Iterator[str]:
    """A head (no trainer resource) and ``trainer_nodes`` worker nodes on 127.0.0.1; its address."""
    from ray.cluster_utils import Cluster

    common: dict[str, Any] = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(
        initialize_head=True, head_node_args={**common, "num_cpus": 1, "include_dashboard": False}
    )
    try:
        for _ in range(trainer_nodes):
            cluster.add_node(**common, num_cpus=1, resources={"lorafleet_trainer": 1})
        cluster.wait_for_nodes()
        yield str(cluster.address)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def queue_round(db: Database, *, users: int, training: dict[str, Any]) -> list[int]:
    """A fresh tenant, the same feedback for ``users`` users, one job per user (with ``training``); the job ids."""
    tenant_id = TenantRepository(db).create_tenant(name=f"bench-{uuid.uuid4().hex[:8]}")[0].id
    for i in range(users):
        user = f"user-{i}"
        records = make_user_records(user, round=1, n_records=16, seed=0)
        ingest_feedback(db, tenant_id=tenant_id, user_external_id=user, records=records)
    policy = SchedulerPolicy(min_new_records=4, users_per_job=1, max_active_jobs=users)
    return [job.id for job in Scheduler(db, policy, training_defaults=training).tick().jobs_created]


def drain(actors: list[Any]) -> list[int]:
    """Each of ``actors`` runs jobs until none is claimable (``TrainerPool.drain`` over a subset)."""
    import ray

    return [job_id for ids in ray.get([a.run_until_idle.remote() for a in actors]) for job_id in ids]


def timed_round(db: Database, pool: Any, *, actors: int, users: int, training: dict[str, Any]) -> Round:
    """Queue the round's jobs and time them until the first ``actors`` actors of the pool drained them."""
    started = time.monotonic()
    job_ids = queue_round(db, users=users, training=training)
    ran = drain(pool.actors[:actors])
    seconds = time.monotonic() - started
    assert sorted(ran) == sorted(job_ids), (ran, job_ids)
    queue = JobQueue(db)
    jobs = [queue.get(tenant_id=None, job_id=job_id) for job_id in job_ids]
    assert all(job.state == "succeeded" for job in jobs), [job.error for job in jobs]
    nodes = Counter(pool.nodes[job.lease_owner][:8] for job in jobs)
    return Round(jobs=len(jobs), seconds=seconds, per_node=dict(nodes))


def measure(settings: Settings, *, users: int, runs: int, training: dict[str, Any]) -> dict[int, list[Round]]:
    """On one cluster with two trainer nodes (one actor each), rounds on 1 node (the first actor alone; the
    other node idles) and on 2 nodes, interleaved, so drifting load on the machine hits both alike."""
    # imported here, as Ray is: the pool loads Ray, which --help and the database set-up do not need
    from lorafleet.runtime.trainer_pool import TrainerPool

    db = Database(settings.resolved_database_url)
    results: dict[int, list[Round]] = {1: [], 2: []}
    with local_cluster(2) as address:
        on_cluster = load_settings(**{**settings.model_dump(), "ray_address": address})
        with TrainerPool(on_cluster, n_actors=2, training=training) as pool:
            assert len(set(pool.nodes.values())) == 2, pool.nodes  # one actor per trainer node
            for nodes in (1, 2):  # warm-up: first-job costs (imports, allocator), untimed
                timed_round(db, pool, actors=nodes, users=users, training=training)
            for i in range(runs):
                for nodes in (1, 2) if i % 2 == 0 else (2, 1):
                    r = timed_round(db, pool, actors=nodes, users=users, training=training)
                    results[nodes].append(r)
                    print(
                        f"  run {i + 1}/{runs}, {nodes} node(s): {r.jobs} jobs in {r.seconds:.1f} s = "
                        f"{r.jobs_per_minute:.1f} jobs/min, per node {sorted(r.per_node.values())}",
                        flush=True,
                    )
    db.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16, help="users per round, one job each")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--max-steps", type=int, default=24, help="optimizer steps per job")
    args = parser.parse_args()
    training = {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "learning_rate": 5e-3,
        "max_steps": args.max_steps,
        "batch_size": 4,
        "max_seq_len": 64,
        "holdout_fraction": 0.3,
        "seed": 0,
    }
    with (
        tempfile.TemporaryDirectory(prefix="lorafleet-bench-cluster-") as tmp,
        migrated_pg_database("lorafleet_bench_cluster") as url,
    ):
        data_dir = Path(tmp)
        build_tiny_backbone(data_dir)
        settings = load_settings(
            data_dir=data_dir,
            database_url=url,
            object_store_url=(data_dir / "blobs").as_uri(),
            device="cpu",
            backbone_quantization="nf4",
            trainer_slots=4,
            promote_rule="holdout-improved",
        )
        results = measure(settings, users=args.users, runs=args.runs, training=training)
    base = statistics.median(r.jobs_per_minute for r in results[1])
    print(
        f"\n{args.users} jobs of one user each, {args.max_steps} steps, nf4 tiny backbone, {args.runs} runs\n"
    )
    print("| trainer nodes (1 CPU, 1 actor each) | median jobs/min | median s per round | vs 1 node |")
    print("| --- | --- | --- | --- |")
    for n, rounds in results.items():
        rate = statistics.median(r.jobs_per_minute for r in rounds)
        seconds = statistics.median(r.seconds for r in rounds)
        print(f"| {n} | {rate:.1f} | {seconds:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
