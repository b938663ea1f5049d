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

``--train`` runs the continual-learning loop beside serving, as ``lorafleet serve`` does: the service's own
scheduler loop (``ApiOptions.run_scheduler``, the default ``SchedulerPolicy``, ``--scheduler-interval``) and one
Ray trainer actor (``run_workers=1``, a separate process on a local Ray), which runs the train jobs (every due
user of a job in one batched loop) and the QA jobs that decide on each new version (``--promote-rule``, ``qa``
by default). ``--learners`` of the 32 users (whose live versions then record the backbone's real fingerprint, so
training can continue from them) send ``--feedback-records`` new records each through the SDK every
``--feedback-every`` seconds (the synthetic facts of ``training.synthetic``, the rounds' topics in turn); a
promoted version is a new sha256, so serving loads it into a slot on the user's next request. Per minute it also
prints the feedback records sent, the train and QA jobs that finished, the versions made live, the seconds of
the minute a train job and a QA job were running, and the trainer actor's resident memory; the verdict adds
the p99 drift over the minutes in which no job ran at all.

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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common  # (also puts the repository root on sys.path, for the tests.* helpers below)
import numpy as np
import torch
from services.api.app import create_app
from services.api.runtime import ApiOptions
from sqlalchemy import select
from tests.integration.qa.qa_helpers import TINY_TRAINING  # the tiny backbone's QA-test training
from tests.integration.services.api_helpers import ApiServer  # the real uvicorn server the API tests use
from tests.lora_weights import random_lora_weights

from lorafleet import Client
from lorafleet.adapters import SlotConfig, inject_bank, save_slot
from lorafleet.backbone import load_backbone
from lorafleet.config import load_settings
from lorafleet.platform import Platform
from lorafleet.store.sql.models import SqlAliasEvent, SqlJob
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS
from lorafleet.training.synthetic import make_user_records

USERS = 32
#: the actor that makes the soak's first versions live (promotions by anyone else are the learning loop's)
SETUP_ACTOR = "soak"
#: ``--train``'s deployment training defaults on the random-init tiny backbone, under ``lorafleet serve``'s own
#: (``SERVICE_TRAINING_DEFAULTS``): every linear module, enough steps for the tiny model to learn its users' facts
#: so that QA has something to promote (``tests/integration/qa/qa_helpers.TINY_TRAINING``), no anchors (its
#: "answers" to general prompts are noise)
TINY_SOAK_TRAINING: dict[str, Any] = {**SERVICE_TRAINING_DEFAULTS, **TINY_TRAINING}


@dataclass
class Minute:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    feedback_records: int = 0
    feedback_errors: int = 0


def adapter_folders(
    data_dir: Path, dest: Path, n: int, *, backbone: str, quantization: str
) -> tuple[list[Path], str | None]:
    """``n`` real PEFT folders (random rank-8 A and B on every linear layer), written through one bank slot, and
    the backbone fingerprint they record."""
    loaded = load_backbone(backbone, quantization=quantization, device="cpu", data_dir=data_dir)
    bank = inject_bank(loaded, target_modules="all-linear", n_slots=1, max_rank=8)
    folders = []
    for seed in range(n):
        tensors = random_lora_weights(bank, rank=8, seed=seed, scale=0.02)
        bank.load_slot(0, tensors, SlotConfig(rank=8, alpha=16.0), replace=True)
        folders.append(save_slot(bank, 0, dest / f"adapter-{seed}").directory)
    return folders, bank.fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second, all clients together")
    _common.add_int_options(parser, clients=8, slots=16, min_tokens=4, max_tokens=48)
    parser.add_argument("--backbone", default="builtin:tiny")
    parser.add_argument("--quantization", default="fp32")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported row")
    learning = parser.add_argument_group("the learning loop beside serving (--train)")
    learning.add_argument(
        "--train", action="store_true", help="run the scheduler and a Ray trainer actor too"
    )
    learning.add_argument("--learners", type=int, default=8, help="users of the 32 who send feedback")
    learning.add_argument(
        "--feedback-every", type=float, default=180.0, help="seconds between feedback rounds"
    )
    learning.add_argument("--feedback-start", type=float, default=0.0, help="seconds to the first round")
    learning.add_argument(
        "--feedback-records", type=int, default=16, help="new records per learner per round"
    )
    learning.add_argument("--scheduler-interval", type=float, default=30.0, help="as `lorafleet serve`'s")
    learning.add_argument("--promote-rule", default="qa", help="qa, holdout-improved, always or never")
    learning.add_argument("--train-steps", type=int, default=TINY_SOAK_TRAINING["max_steps"])
    learning.add_argument(
        "--serving-threads",
        type=int,
        default=None,
        help="ApiOptions.serving_threads (default: the service's choice, cores less one per local trainer actor)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.train and not 1 <= args.learners <= USERS:
        parser.error(f"--learners: 1..{USERS}")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        settings = load_settings(
            data_dir=data,
            backbone=args.backbone,
            backbone_quantization=args.quantization,
            device="cpu",
            ray_address="",
            admin_key="soak-admin",
            promote_rule=args.promote_rule if args.train else "never",
        )
        platform = Platform.from_settings(settings, migrate=True)
        tenant, api_key = platform.tenants.create_tenant(name="soak")
        folders, fingerprint = adapter_folders(
            data, data / "folders", USERS, backbone=args.backbone, quantization=args.quantization
        )
        for i, folder in enumerate(folders):
            user = platform.tenants.get_or_create_user(tenant_id=tenant.id, external_id=f"user-{i}")
            adapter = platform.registry.get_or_create_adapter(
                tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
            )
            version = platform.registry.register_version(
                tenant_id=tenant.id,
                adapter_id=adapter.id,
                adapter_dir=folder,
                # a train job continues from the live version only if it was trained on this backbone
                base_fingerprint=fingerprint if args.train and fingerprint else "soak",
            )
            platform.registry.promote(
                tenant_id=tenant.id, adapter_id=adapter.id, number=version.number, actor=SETUP_ACTOR
            )
        platform.close()
        options = ApiOptions(engine_slots=args.slots, engine_max_rank=8, preload_engine=True)
        if args.train:
            from lorafleet.runtime.ray_runtime import init_ray

            init_ray(
                settings
            )  # on the main thread, as `lorafleet serve` does before the app starts its actors
            options = replace(
                options,
                run_scheduler=True,
                scheduler_interval=args.scheduler_interval,
                run_workers=1,
                training={**TINY_SOAK_TRAINING, "max_steps": args.train_steps},
                serving_threads=args.serving_threads,
            )
        server = ApiServer(create_app(settings, options=options)).start()
        try:
            run(server, api_key, args)
        finally:
            server.stop()
            if args.train:
                import ray

                ray.shutdown()


def run(server: Any, api_key: str, args: argparse.Namespace) -> None:
    services = server.server.config.app.state.services
    with Client(server.url, api_key, timeout=120, max_retries=0) as warm:
        deadline = time.monotonic() + 300
        while warm.ready().engine != "ready" or (args.train and warm.ready().workers != "running"):
            assert time.monotonic() < deadline, "the engine (or the trainer actor) did not start"
            time.sleep(0.2)
    serving_threads = new_thread_torch_threads()  # what the engine's load set (ApiOptions.serving_threads)
    windows: dict[int, Minute] = {}
    lock = threading.Lock()
    started = time.monotonic()
    started_wall = time.time()
    end = started + 60.0 * args.minutes
    gap = args.clients / args.rate  # each client's mean gap between arrivals (Poisson per client)

    def record(sent: float, **counts: int) -> None:
        window = int((sent - started) // args.window)
        with lock:
            minute = windows.setdefault(window, Minute())
            for name, value in counts.items():
                setattr(minute, name, getattr(minute, name) + value)

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
    if args.train:
        threads += [
            threading.Thread(
                target=feedback_loop, args=(server.url, api_key, i, args, started, end, record), daemon=True
            )
            for i in range(args.learners)
        ]
    for thread in threads:
        thread.start()
    print(
        f"soak: {args.minutes:g} min, {args.rate:g} req/s from {args.clients} clients, {USERS} users on "
        f"{args.slots} slots, {args.min_tokens}-{args.max_tokens} new tokens, {args.backbone} ({args.quantization})\n"
    )
    if args.train:
        print(
            f"learning: {args.learners} users send {args.feedback_records} records each every "
            f"{args.feedback_every:g} s (from {args.feedback_start:g} s); scheduler every "
            f"{args.scheduler_interval:g} s, 1 Ray trainer actor, {args.train_steps} steps per job, promote rule "
            f"{args.promote_rule}; serving on {serving_threads} torch thread(s)\n"
        )
        print(
            "| window | answered | p50 (s) | p99 (s) | req/s | errors | RSS (MiB) | loads | evictions | "
            "mean running | feedback | train done | QA done | made live | train s | QA s | trainer RSS (MiB) |"
        )
        print("| --- " * 17 + "|")
    else:
        print(
            "| window | answered | p50 (s) | p99 (s) | req/s | errors | RSS (MiB) | loads | evictions | mean running |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    learning = Learning(services, started_wall, args.window) if args.train else None
    reported, before = 0, None
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        now_window = int((time.monotonic() - started) // args.window)
        if now_window > reported:
            before = report(reported, windows, lock, services, args, before, learning)
            reported = now_window
    for thread in threads:
        thread.join()
    last = max(windows)
    while reported <= last:
        before = report(reported, windows, lock, services, args, before, learning)
        reported += 1
    verdict(windows, lock, learning)


def feedback_loop(
    url: str, api_key: str, learner: int, args: argparse.Namespace, started: float, end: float, record: Any
) -> None:
    """One learning user: a batch of new records every ``--feedback-every`` seconds, the rounds' topics in turn
    (round 1's, then 2's, then 3's, then round 1's next records ...); a few seconds of jitter per user."""
    user = f"user-{learner}"
    rng = random.Random(f"feedback/{learner}")
    pools = [make_user_records(user, round=r, n_records=192, seed=0) for r in (1, 2, 3)]
    n = args.feedback_records
    with Client(url, api_key, timeout=120, max_retries=0) as client:
        burst = 0
        while True:
            due = started + args.feedback_start + burst * args.feedback_every + rng.uniform(0.0, 5.0)
            if due >= end:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            pool, turn = pools[burst % 3], burst // 3
            records = pool[turn * n : (turn + 1) * n]
            sent = time.monotonic()
            try:
                accepted = len(client.submit_feedback(user, records).ids) if records else 0
                record(sent, feedback_records=accepted)
            except Exception:  # counted; the soak goes on
                record(sent, feedback_errors=1)
            burst += 1


class Learning:
    """The learning loop's per-window figures, read from the service's database: jobs finished, live moves, and
    how long a train or QA job was running within the window (from the jobs' start and finish times)."""

    def __init__(self, services: Any, started_wall: float, window: float) -> None:
        self.db = services.db
        self.started_wall = started_wall
        self.window = window
        #: per window: seconds with a train job running, and with a QA job running
        self.busy: dict[int, tuple[float, float]] = {}

    def bounds(self, window: int) -> tuple[datetime, datetime]:
        start = self.started_wall + window * self.window
        return datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + self.window, UTC)

    def figures(self, window: int) -> dict[str, Any]:
        lo, hi = self.bounds(window)
        now = datetime.now(UTC)
        with self.db.session() as s:
            jobs = list(s.execute(select(SqlJob.kind, SqlJob.state, SqlJob.started_at, SqlJob.finished_at)))
            moves = s.scalars(
                select(SqlAliasEvent.to_version_id).where(
                    SqlAliasEvent.actor != SETUP_ACTOR,
                    SqlAliasEvent.created_at >= lo,
                    SqlAliasEvent.created_at < hi,
                )
            ).all()
        done = {"train": 0, "qa": 0}
        failed = 0
        busy = {"train": 0.0, "qa": 0.0}
        for kind, state, began, ended in jobs:
            if ended is not None and lo <= ended < hi and kind in done:
                done[kind] += 1
                failed += state != "succeeded"
            if began is not None and kind in busy:
                overlap = min(ended or now, hi) - max(began, lo)
                busy[kind] += max(0.0, overlap.total_seconds())
        self.busy[window] = (busy["train"], busy["qa"])
        return {
            "train_done": done["train"],
            "qa_done": done["qa"],
            "failed": failed,
            "made_live": sum(1 for v in moves if v is not None),
            "train_s": busy["train"],
            "qa_s": busy["qa"],
        }

    def quiet(self, window: int) -> bool:
        """No train or QA job ran at any time in the window."""
        train, qa = self.busy.get(window, (0.0, 0.0))
        return train == 0.0 and qa == 0.0


def report(
    window: int,
    windows: dict[int, Minute],
    lock: threading.Lock,
    services: Any,
    args: argparse.Namespace,
    before: Any,
    learning: Learning | None = None,
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
    row = (
        f"| {window + 1} | {len(latencies)} | {p50:.2f} | {p99:.2f} | {len(latencies) / args.window:.2f} | "
        f"{minute.errors} | {rss:.0f} | {stats.loads} | {stats.evictions} | {running:.1f} |"
    )
    if learning is not None:
        f = learning.figures(window)
        fb = f"{minute.feedback_records}" + (
            f" ({minute.feedback_errors} failed)" if minute.feedback_errors else ""
        )
        failed = f" ({f['failed']} failed)" if f["failed"] else ""
        row += (
            f" {fb} | {f['train_done']} | {f['qa_done']}{failed} | {f['made_live']} | {f['train_s']:.0f} | "
            f"{f['qa_s']:.0f} | {trainer_rss_mib():.0f} |"
        )
    print(row, flush=True)
    return steps


def new_thread_torch_threads() -> int:
    """Torch's intra-op threads in a thread started now (as the engine's batcher thread was): a count set with
    ``torch.set_num_threads`` on another thread reaches new threads, not this one's earlier ones."""
    found: list[int] = []
    thread = threading.Thread(target=lambda: found.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return found[0]


def current_rss_mib() -> float:
    """The process's resident memory now (``VmRSS``), not its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trainer_rss_mib() -> float:
    """Resident memory of the trainer actor process(es) this process's local Ray started (``ray::TrainerHost``)."""
    import psutil  # Ray's dependency

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::TrainerHost"):
                total += child.memory_info().rss
        except (psutil.Error, IndexError):
            continue
    return total / (1 << 20)


def verdict(windows: dict[int, Minute], lock: threading.Lock, learning: Learning | None = None) -> None:
    with lock:
        full = [w for w in sorted(windows) if len(windows[w].latencies) >= 20]
        if len(full) < 2:
            print("\nnot enough windows for a verdict")
            return
        p99 = {w: float(np.percentile(windows[w].latencies, 99)) for w in full}
    first, last = p99[full[0]], p99[full[-1]]
    print(f"\np99: first window {first:.2f} s, last {last:.2f} s: ratio {last / first:.2f} (bound 1.5)")
    if learning is None:
        return
    quiet = [w for w in full if learning.quiet(w)]
    busy = [w for w in full if not learning.quiet(w)]
    listed = ", ".join(f"{w + 1}: {p99[w]:.2f}" for w in quiet) or "none"
    print(f"windows without any job running (window: p99 s): {listed}")
    if len(quiet) >= 2:
        a, b = p99[quiet[0]], p99[quiet[-1]]
        print(
            f"p99 without jobs: first such window {a:.2f} s, last {b:.2f} s: ratio {b / a:.2f} (bound 1.5); "
            f"max {max(p99[w] for w in quiet):.2f} s"
        )
    if busy:
        values = [p99[w] for w in busy]
        print(
            f"windows with a train or QA job running: {len(busy)}, p99 median {statistics.median(values):.2f} s, "
            f"max {max(values):.2f} s"
        )


if __name__ == "__main__":
    main()
