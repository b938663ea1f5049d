"""QA benchmark: what QA decides on the training issue's synthetic benchmark, and what QA costs per candidate.

**Decisions.** The protocol of ``bench_quality.py`` run through the production pipeline: U users with private
preferences (``lorafleet.training.synthetic``) on the built-in tiny backbone (nf4), three rounds of records, each
round one scheduler tick -> one ``train`` job for all users (promote rule ``qa``, continuing from the live
version with replay) -> one ``qa`` job per candidate, run by a ``JobWorker`` with both handlers. Then two
deliberately harmful candidates per user, trained with ``lorafleet.training`` on the user's own prompts: half
the users get *adversarial* answers (another user's preferences), the other half *shuffled* completions (their
own answers permuted across prompts). Reported: promoted / rejected per round and kind, and which rules failed.

**Cost.** Seconds per candidate for a user whose bank holds 1, 3 and 8 adapters (the personal one plus 0, 2
and 7 enrolled task adapters with routing keys), on a bank of 8 slots (so the 8-adapter bank is sampled: budget
``min(max_bank_members=6, 8 - 2)`` = 6 of its 7 other members). Timed: the evaluation (fetch, sanity, slots,
matrix with greedy samples; median of repeats) and one full ``run_candidate`` (evaluation + report blob +
decision transaction).

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_qa.py`` (about 6 minutes on 2 CPU cores;
``--part cost`` alone takes about one). Prints progress and a Markdown report.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common  # noqa: E402, F401  (puts the repository root on sys.path, for the tests.* helpers below)
import torch  # noqa: E402
from tests.integration.qa.qa_helpers import World, adversarial, register_candidate  # noqa: E402

from lorafleet.adapters import inject_bank, remove_bank, save_slot  # noqa: E402
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone  # noqa: E402
from lorafleet.jobs import JobQueue, JobWorker, Scheduler, SchedulerPolicy  # noqa: E402
from lorafleet.qa.policy import QAPolicy  # noqa: E402
from lorafleet.qa.reports import load_report  # noqa: E402
from lorafleet.registry import Registry  # noqa: E402
from lorafleet.routing.embeddings import routing_key  # noqa: E402
from lorafleet.routing.experts import enrol  # noqa: E402
from lorafleet.store.blob import open_blob_store  # noqa: E402
from lorafleet.store.sql import migrate  # noqa: E402
from lorafleet.store.sql.database import Database  # noqa: E402
from lorafleet.store.sql.tenants import TenantRepository  # noqa: E402
from lorafleet.training import synthetic  # noqa: E402
from lorafleet.training import synthetic_routing as routing_tasks  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import Example, build_dataset  # noqa: E402
from lorafleet.training.overrides import set_tenant_training  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer  # noqa: E402
from lorafleet.workflows.feedback import ingest_feedback, list_feedback  # noqa: E402
from lorafleet.workflows.qa_runner import QARunner  # noqa: E402

logger = logging.getLogger("bench_qa")
BANK_SIZES = (1, 3, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "decisions", "cost"), default="all")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--records", type=int, default=64, help="records per user per round")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per bank size")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def make_env(tmp: Path, backbone: Backbone, config: TrainingConfig, *, slots: int, name: str) -> World:
    """A fresh SQLite database and blob directory over one resident backbone and a new bank, with one tenant."""
    url = f"sqlite:///{tmp / f'{name}.db'}"
    migrate.upgrade(url)
    db = Database(url)
    registry = Registry(db, open_blob_store((tmp / f"{name}-blobs").as_uri()))
    bank = inject_bank(backbone, target_modules=config.target_modules, n_slots=slots, max_rank=config.rank)
    tenant_id = TenantRepository(db).create_tenant(name=name)[0].id
    set_tenant_training(db, tenant_id=tenant_id, overrides=config.model_dump(mode="json"))  # its jobs' config
    return World(db, registry, backbone, bank, tenant_id, config)


def release(env: World) -> None:
    """Take the bank's layers out again, so the next environment can inject its own."""
    remove_bank(env.bank)
    env.db.dispose()


# --- decisions on the synthetic benchmark ------------------------------------------------------------------
def run_decisions(env: World, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Three rounds through train + QA jobs, then two harmful candidates per user; one row per QA decision."""
    users = [f"user-{i}" for i in range(args.users)]
    trainer = ContinualTrainer(env.resident, config=env.config, promote_rule="qa")
    runner = QARunner(env.resident)
    worker = JobWorker(
        JobQueue(env.db),
        worker_id="bench",
        handlers={"train": trainer.run_job, "qa": runner.run_job},
        lease_seconds=600.0,
    )
    rows: list[dict[str, Any]] = []
    for r in (1, 2, 3):
        for user in users:
            records = synthetic.make_user_records(user, round=r, n_records=args.records, seed=0)
            ingest_feedback(env.db, tenant_id=env.tenant_id, user_external_id=user, records=records)
        tick = Scheduler(env.db, SchedulerPolicy(min_new_records=1, users_per_job=len(users))).tick()
        assert len(tick.jobs_created) == 1, tick
        started = time.perf_counter()
        done = worker.run_until_idle()
        logger.info("round %d: %d jobs in %.0f s", r, len(done), time.perf_counter() - started)
        rows += [_row(env, f"round {r}", j.result or {}) for j in done if j.kind == "qa"]
    rows += harmful_candidates(env, runner, users, steps=args.steps)
    return rows


def harmful_candidates(env: World, runner: QARunner, users: list[str], *, steps: int) -> list[dict[str, Any]]:
    """Per user, one candidate trained on poisoned data (adversarial for the first half, shuffled for the rest)."""
    plans = []
    for i, user in enumerate(users):
        records = list_feedback(env.db, tenant_id=env.tenant_id, user_external_id=user, limit=1000)
        train = list(build_dataset(records, config=env.config).train)
        kind = "adversarial" if i < len(users) // 2 else "shuffled"
        poisoned = (
            adversarial(train, other_user=users[(i + 1) % len(users)])
            if kind == "adversarial"
            else shuffled(train)
        )
        plans.append((user, kind, poisoned, [r.id for r in records]))
    with tempfile.TemporaryDirectory(prefix="bench-qa-harm-") as tmp:
        folders = train_fresh(env, [p[2] for p in plans], work=Path(tmp), steps=steps)
        rows = []
        for (user, kind, _, ids), folder in zip(plans, folders, strict=True):
            version = register(env, user=user, folder=folder, record_ids=ids)
            report = runner.run_candidate(tenant_id=env.tenant_id, version_id=version)
            assert report is not None
            rows.append(
                _row(env, kind, {"version_id": version, "decision": report.decision, "report_id": report.id})
            )
    return rows


def shuffled(examples: list[Example]) -> list[Example]:
    completions = [e.completion for e in examples]
    random.Random(0).shuffle(completions)
    return [Example(e.record_id, e.prompt, c, e.kind) for e, c in zip(examples, completions, strict=True)]


def train_fresh(env: World, datasets: list[list[Example]], *, work: Path, steps: int) -> list[Path]:
    """Train one fresh slot per dataset, as many together as the bank holds (as a job would); PEFT folders."""
    folders: list[Path] = []
    chunk = env.bank.n_slots - len(env.bank.occupied())
    for start in range(0, len(datasets), chunk):
        folders += _train_chunk(env, datasets[start : start + chunk], work=work, steps=steps, first=start)
    return folders


def _train_chunk(
    env: World, datasets: list[list[Example]], *, work: Path, steps: int, first: int
) -> list[Path]:
    config = env.config.with_changes(max_steps=steps)
    slots: list[int] = []
    try:
        for i in range(len(datasets)):
            slot = env.bank.free_slot()
            env.bank.init_slot(
                slot, config.slot_config(backbone_fingerprint=env.bank.fingerprint), seed=first + i
            )
            slots.append(slot)
        tasks = [
            SlotTraining(s, f"fresh-{first + i}", d, [])
            for i, (s, d) in enumerate(zip(slots, datasets, strict=True))
        ]
        train_slots(env.bank, env.backbone.tokenizer, tasks, config)
        return [save_slot(env.bank, s, work / f"fresh-{first + i}").directory for i, s in enumerate(slots)]
    finally:
        for slot in slots:
            env.bank.evict_slot(slot)


def register(env: World, *, user: str, folder: Path, record_ids: list[int]) -> int:
    """A candidate of the user's personal adapter, continuing from its live version."""
    adapter_id = env.personal(user)
    return register_candidate(
        env,
        adapter_id=adapter_id,
        folder=folder,
        record_ids=record_ids,
        user_id=env.user_id(user),
        parent=env.registry.live_version(tenant_id=env.tenant_id, adapter_id=adapter_id),
    ).id


def _row(env: World, kind: str, result: dict[str, Any]) -> dict[str, Any]:
    report, document = load_report(env.db, env.registry, report_id=int(result["report_id"]))
    own = report.summary.get("own_losses", {})
    return {
        "kind": kind,
        "decision": report.decision,
        "failed": sorted(r["rule"] for r in document["rules"] if not r["passed"])
        or [p.split(":")[0] for p in document["sanity"]["problems"]],
        "candidate": own.get("candidate"),
        "previous": own.get("previous"),
        "base": own.get("base"),
        "probe_move": _probe_move(document),
        "seconds": report.summary.get("seconds"),
    }


def _probe_move(document: dict[str, Any]) -> float | None:
    cells = (document.get("matrix") or {}).get("cells", {}).get("probe", {})
    if not cells:
        return None
    return abs(cells["candidate"]["loss"] - cells["base"]["loss"])


# --- cost by bank size --------------------------------------------------------------------------------------
def run_cost(env: World, *, size: int, repeats: int) -> dict[str, Any]:
    """A user with a live personal version, a candidate and ``size - 1`` enrolled task adapters; QA timings."""
    runner = QARunner(env.resident, policy=QAPolicy())
    user_records = synthetic.make_user_records("alice", round=1, n_records=64, seed=0)
    ids = ingest_feedback(env.db, tenant_id=env.tenant_id, user_external_id="alice", records=user_records).ids
    records = list_feedback(env.db, tenant_id=env.tenant_id, user_external_id="alice", limit=1000)
    train = list(build_dataset(records, config=env.config).train)
    tasks = [_task_data(env, i) for i in range(size - 1)]
    with tempfile.TemporaryDirectory(prefix="bench-qa-cost-") as tmp:
        folders = train_fresh(env, [train, train, *[t[1] for t in tasks]], work=Path(tmp), steps=30)
        user_id = TenantRepository(env.db).get_user(tenant_id=env.tenant_id, external_id="alice").id
        personal = env.registry.create_adapter(
            tenant_id=env.tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER, target_config=_target(env)
        )
        v1 = register_candidate(
            env, adapter_id=personal.id, folder=folders[0], record_ids=ids, user_id=user_id
        )
        env.registry.promote(tenant_id=env.tenant_id, adapter_id=personal.id, number=1, actor="bench")
        candidate = register_candidate(
            env, adapter_id=personal.id, folder=folders[1], record_ids=ids, user_id=user_id, parent=v1
        ).id
        for (name, data, task_ids), folder in zip(tasks, folders[2:], strict=True):
            adapter = env.registry.create_adapter(
                tenant_id=env.tenant_id, owner_user_id=None, name=name, target_config=_target(env)
            )
            key = routing_key(env.backbone, env.bank, [e.prompt for e in data])
            register_candidate(
                env, adapter_id=adapter.id, folder=folder, record_ids=task_ids, user_id=None, key=key
            )
            env.registry.promote(tenant_id=env.tenant_id, adapter_id=adapter.id, number=1, actor="bench")
            enrol(env.db, tenant_id=env.tenant_id, user_external_id="alice", task_name=name, actor="bench")
    runner.evaluate_candidate(tenant_id=env.tenant_id, version_id=candidate)  # warm-up (sets the routing key)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        evaluation = runner.evaluate_candidate(tenant_id=env.tenant_id, version_id=candidate)
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    report = runner.run_candidate(tenant_id=env.tenant_id, version_id=candidate)
    full = time.perf_counter() - started
    assert report is not None and evaluation.matrix is not None
    logger.info("bank of %d: %s (%s)", size, report.decision, "; ".join(report.reasons))
    sampling = evaluation.bank.get("sampling", {})
    return {
        "bank": size,
        "evaluated": 1 + len(sampling.get("sampled", [])),
        "rows": len(evaluation.matrix.rows),
        "columns": len(evaluation.matrix.columns),
        "examples": sum(r.examples for r in evaluation.matrix.rows),
        "evaluate_s": statistics.median(seconds),
        "full_s": full,
        "decision": report.decision,
        "failed": sorted({r.split(":")[0] for r in report.reasons}) if report.decision == "reject" else [],
    }


def _task_data(env: World, i: int) -> tuple[str, list[Example], list[int]]:
    """A task adapter's name, training examples and the ids of its data, stored as feedback of a data user (so
    its holdout is real): the three routing tasks, cycled with different seeds."""
    task = routing_tasks.TASKS[i % len(routing_tasks.TASKS)]
    train, holdout = routing_tasks.task_split(task, n_train=48, n_holdout=16, seed=i)
    records = [{"kind": "sft", "prompt": e.prompt, "completion": e.completion} for e in [*train, *holdout]]
    name = f"{task}-{i}"
    ids = ingest_feedback(
        env.db, tenant_id=env.tenant_id, user_external_id=f"data-{name}", records=records
    ).ids
    return name, train, ids


def _target(env: World) -> dict[str, Any]:
    c = env.config
    return {"rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "target_modules": c.target_modules}


# --- report -------------------------------------------------------------------------------------------------
def report_decisions(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| candidates | n | promoted | rejected | failed rules (count) | mean own loss: base / previous / candidate "
        "| probe move: mean (max) | mean s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        failed = Counter(rule for r in group for rule in r["failed"] if r["decision"] != "promote")
        lines.append(
            f"| {kind} | {len(group)} | {sum(r['decision'] == 'promote' for r in group)} "
            f"| {sum(r['decision'] == 'reject' for r in group)} "
            f"| {', '.join(f'{k} ({v})' for k, v in sorted(failed.items())) or '-'} "
            f"| {_mean(group, 'base')} / {_mean(group, 'previous')} / {_mean(group, 'candidate')} "
            f"| {_mean(group, 'probe_move')} ({_max(group, 'probe_move')}) | {_mean(group, 'seconds', 2)} |"
        )
    return "\n".join(lines)


def _mean(rows: list[dict[str, Any]], key: str, digits: int = 3) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.mean(values):.{digits}f}" if values else "-"


def _max(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{max(values):.3f}" if values else "-"


def report_cost(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| adapters in bank | adapters evaluated | rows x columns | examples scored per column | evaluation s "
        "(median) | full run_candidate s | decision (failed rules) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['bank']} | {r['evaluated']} | {r['rows']} x {r['columns']} | {r['examples']} "
            f"| {r['evaluate_s']:.2f} | {r['full_s']:.2f} | {r['decision']}"
            + (f" ({', '.join(r['failed'])})" if r["failed"] else "")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("lorafleet").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = TrainingConfig(
        rank=8,
        alpha=16.0,
        learning_rate=args.lr,
        max_steps=args.steps,
        batch_size=8,
        max_seq_len=64,
        replay_ratio=1.0,
    )
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-qa-") as data_dir:
        tmp = Path(data_dir)
        backbone = load_backbone(build_tiny_backbone(tmp), quantization=args.quantization, device="cpu")
        if args.part in ("all", "cost"):
            costs = []
            for size in BANK_SIZES:
                env = make_env(tmp, backbone, config, slots=8, name=f"cost{size}")
                costs.append(run_cost(env, size=size, repeats=args.repeats))
                logger.info("cost: %s", costs[-1])
                release(env)
            out.append("QA cost per candidate (bank of 8 slots):\n\n" + report_cost(costs))
        if args.part in ("all", "decisions"):
            env = make_env(tmp, backbone, config, slots=max(8, args.users) + 2, name="decisions")
            rows = run_decisions(env, args)
            release(env)
            out.append("Decisions on the synthetic benchmark:\n\n" + report_decisions(rows))
    print(
        f"\nconfig: {config.model_dump()} quantization={args.quantization} users={args.users} "
        f"records/round={args.records} policy={QAPolicy().model_dump()}\n"
    )
    print("\n\n".join(out))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
