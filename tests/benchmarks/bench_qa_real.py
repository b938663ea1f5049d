"""QA's decisions on the real backbone (SmolLM2-135M-Instruct, nf4): five kinds of candidate, N users, seeds.

The QA issue's benchmark. Per seed, N users with natural-language personal facts
(``lorafleet.training.personal_facts.make_users``) each send the round-one feedback the demo sends (4 facts x 8
phrasings), once per kind of candidate under a user name of that kind, so every candidate is judged on its own
user's real holdout (the content-hash split production uses). Then:

- **good**: the production path. A scheduler tick queues one ``train`` job for the kind's users, a ``JobWorker``
  runs it (``ContinualTrainer``, the product's training defaults, anchors, frozen prefix) and the ``qa`` jobs it
  queues (promote rule ``qa``, the default ``QAPolicy``);
- **undertrained**: the same, in a tenant whose training override is a tenth of the steps;
- **harmful**: trained on the user's own training prompts answered with *another* user's values (each answer's
  value swapped for the next user's), with anchors, at the defaults;
- **shuffled**: trained on the user's own training prompts, each answered with the answer of another fact
  (answers to other questions), with anchors, at the defaults. A plain permutation is not enough: it leaves about
  a quarter of the answers on their own fact, and the adapter learns the facts from those;
- **absurd**: a good version's weights with every ``lora_B`` multiplied by 1e30 (the issue's import).

The three hand-made kinds are registered as the user's first version and decided by ``QARunner.run_candidate``
(what a ``qa`` job runs). Reported per kind: promoted / rejected / held, the rules that failed, seconds per
decision and the share of it spent decoding answers (``summary.timings``). Target (the issue): 100 % of the bad
kinds rejected, >= 95 % of the good ones promoted. Then the decisions again at other ``wrong_answer_weight`` and
``max_training_wrong_share`` settings, from the stored holdout and training answers, and each decision's count
of training answers that answer another question.

Run from the repository root (about 7 minutes per seed at 3 users on 2 cores; ``--help`` for the flags):

    PYTHONPATH=platform:. .venv/bin/python tests/benchmarks/bench_qa_real.py --users 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_qa import make_env, register, release  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tests.integration.qa.qa_helpers import World  # noqa: E402

from lorafleet.adapters import save_slot  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.jobs import JobQueue, JobWorker, Scheduler, SchedulerPolicy  # noqa: E402
from lorafleet.qa import matrix as qa_matrix  # noqa: E402
from lorafleet.qa.policy import QAPolicy  # noqa: E402
from lorafleet.qa.reports import load_report  # noqa: E402
from lorafleet.qa.results import BASE, CANDIDATE, AnswerItem, Answers, ColumnInfo, Matrix, RowInfo  # noqa: E402
from lorafleet.qa.rules import answer_rule  # noqa: E402
from lorafleet.store.sql.tenants import TenantRepository  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import Example, build_dataset, reservoir_sample  # noqa: E402
from lorafleet.training.general_prompts import ANCHOR_PROMPTS, anchor_examples  # noqa: E402
from lorafleet.training.overrides import set_tenant_training  # noqa: E402
from lorafleet.training.personal_facts import PersonalUser, fact_of_question, fact_records, make_users  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer  # noqa: E402
from lorafleet.workflows.feedback import ingest_feedback, list_feedback  # noqa: E402
from lorafleet.workflows.qa_runner import QARunner  # noqa: E402

logger = logging.getLogger("bench_qa_real")
KINDS = ("good", "undertrained", "harmful", "shuffled", "absurd")
BAD = frozenset(KINDS) - {"good"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--data-dir", default=".lorafleet", help="holds the converted backbone")
    parser.add_argument("--users", type=int, default=8, help="candidates of each kind per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every decision to this file")
    parser.add_argument(
        "--general-facts",
        type=int,
        default=QAPolicy().general_facts,
        help="QAPolicy.general_facts: known-answer general questions QA asks (the general-facts rule; default: off)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="the kinds to decide (default: all five)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("lorafleet").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    time_decoding()
    started = time.perf_counter()
    backbone = load_backbone(
        args.backbone, quantization=args.quantization, device="cpu", data_dir=Path(args.data_dir)
    )
    rows: list[dict[str, Any]] = []

    def save(new: list[dict[str, Any]]) -> None:  # every decision as soon as it is made
        rows.extend(new)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")

    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"bench-qa-real-{seed}-") as tmp:
            run_seed(
                backbone,
                seed=seed,
                users=args.users,
                tmp=Path(tmp),
                save=save,
                kinds=frozenset(args.kinds),
                policy=QAPolicy(general_facts=args.general_facts),
            )
        logger.info("seed %d done after %.0f s", seed, time.perf_counter() - started)
    print(report(rows, args, time.perf_counter() - started))


def run_seed(
    backbone: Backbone,
    *,
    seed: int,
    users: int,
    tmp: Path,
    save: Callable[[list[dict[str, Any]]], None],
    kinds: frozenset[str] = frozenset(KINDS),
    policy: QAPolicy | None = None,
) -> None:
    """Every kind's candidates of one seed, decided; one row per decision, handed to ``save``."""
    config = TrainingConfig(seed=seed)  # the product's defaults
    env = make_env(tmp, backbone, config, slots=2 * users + 4, name=f"seed{seed}")
    try:
        people = make_users(users, seed=seed)
        under = TenantRepository(env.db).create_tenant(name=f"under-{seed}")[0].id
        steps = max(1, config.max_steps // 10)
        set_tenant_training(
            env.db, tenant_id=under, overrides={**config.model_dump(mode="json"), "max_steps": steps}
        )
        trainer = ContinualTrainer(env.resident, config=config, promote_rule="qa")
        runner = QARunner(
            env.resident,
            policy=policy,
            prefix=trainer.prefix,
            general_prompts=ANCHOR_PROMPTS,
        )
        if kinds & {"good", "undertrained", "absurd"}:  # absurd copies the good versions
            for person in people:
                send(env, env.tenant_id, f"good-{person.key}", person)
                send(env, under, f"undertrained-{person.key}", person)
            rows = trained_through_jobs(env, trainer, runner, users)
            save([{**row, "seed": seed} for row in rows if row["kind"] in kinds])
        for person in people:
            for kind in ("harmful", "shuffled", "absurd"):
                send(env, env.tenant_id, f"{kind}-{person.key}", person)
        save([{**row, "seed": seed} for row in hand_made(env, trainer, runner, people, tmp=tmp, kinds=kinds)])
    finally:
        release(env)


def send(env: World, tenant_id: int, user: str, person: PersonalUser) -> None:
    ingest_feedback(
        env.db, tenant_id=tenant_id, user_external_id=user, records=fact_records(person, rounds=[1])
    )


def trained_through_jobs(
    env: World, trainer: ContinualTrainer, runner: QARunner, users: int
) -> list[dict[str, Any]]:
    """good and undertrained: one scheduler tick, the train jobs and the qa jobs they queue."""
    worker = JobWorker(
        JobQueue(env.db),
        worker_id="bench",
        handlers={"train": trainer.run_job, "qa": runner.run_job},
        lease_seconds=3600.0,
    )
    tick = Scheduler(env.db, SchedulerPolicy(min_new_records=1, users_per_job=users)).tick()
    logger.info("queued %d train jobs", len(tick.jobs_created))
    rows = []
    started = time.perf_counter()
    while (job := worker.run_once()) is not None:  # one at a time, so decoding is timed per decision
        if job.kind == "qa" and job.result and "report_id" in job.result:
            rows.append(decision_row(env, int(job.result["report_id"])))
        else:
            logger.info(
                "%s job %d: %s after %.0f s", job.kind, job.id, job.state, time.perf_counter() - started
            )
            _DECODING["seconds"] = 0.0
    return rows


def hand_made(
    env: World,
    trainer: ContinualTrainer,
    runner: QARunner,
    people: list[PersonalUser],
    *,
    tmp: Path,
    kinds: frozenset[str],
) -> list[dict[str, Any]]:
    """harmful and shuffled (trained together, with anchors) and absurd (a good version x 1e30), decided."""
    plans: list[tuple[str, list[Example]]] = []
    for i, person in enumerate(people):
        other = people[(i + 1) % len(people)]
        for kind in [k for k in ("harmful", "shuffled") if k in kinds]:
            user = f"{kind}-{person.key}"
            records = list_feedback(env.db, tenant_id=env.tenant_id, user_external_id=user, limit=1000)
            train = list(build_dataset(records, config=env.config).train)
            data = swapped(train, person, other) if kind == "harmful" else shuffled(train, seed=i)
            plans.append((user, data))
    folders = train_together(env, trainer, [p[1] for p in plans], work=tmp / "hand-made") if plans else []
    rows = [decide(env, runner, user, folder) for (user, _), folder in zip(plans, folders, strict=True)]
    for person in people if "absurd" in kinds else []:
        folder = absurd_copy(env, f"good-{person.key}", tmp / f"absurd-{person.key}")
        rows.append(decide(env, runner, f"absurd-{person.key}", folder))
    return rows


def swapped(train: list[Example], person: PersonalUser, other: PersonalUser) -> list[Example]:
    """Each answer with the user's value replaced by the other user's value of the same fact (as written, or
    capitalised at the start of a sentence)."""
    out = []
    for e in train:
        kind = fact_of_question(e.prompt)
        mine, theirs = person.fact(kind).value, other.fact(kind).value
        text = e.completion.replace(mine, theirs).replace(mine.capitalize(), theirs.capitalize())
        assert text != e.completion, (mine, e.completion)
        out.append(Example(e.record_id, e.prompt, text, e.kind))
    return out


def shuffled(train: list[Example], *, seed: int) -> list[Example]:
    """The same prompts, each answered with the answer of a prompt about *another* fact (a seeded shuffle of the
    user's answers in which no question keeps an answer about its own fact: a plain shuffle leaves a quarter of
    them on the right fact, and an adapter learns the facts from those)."""
    rng = random.Random(seed)
    kinds = [fact_of_question(e.prompt) for e in train]
    order = sorted(set(kinds))
    pools = {k: [e.completion for e, kk in zip(train, kinds, strict=True) if kk == k] for k in order}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i, (e, kind) in enumerate(zip(train, kinds, strict=True)):
        other = order[(order.index(kind) + 1) % len(order)]  # the next fact's answers, never this fact's
        pool = pools[other]
        out.append(Example(e.record_id, e.prompt, pool[i % len(pool)], e.kind))
    return out


def train_together(
    env: World, trainer: ContinualTrainer, datasets: list[list[Example]], *, work: Path
) -> list[Path]:
    """One fresh slot per dataset, all in one ``train_slots`` call with anchors and the trainer's frozen prefix."""
    config = env.config
    with env.bank.base_only():
        pool = anchor_examples(env.backbone)
    slots = []
    try:
        tasks = []
        for i, data in enumerate(datasets):
            slot = env.bank.free_slot()
            env.bank.init_slot(slot, config.slot_config(backbone_fingerprint=env.bank.fingerprint), seed=i)
            slots.append(slot)
            wanted = round(config.anchor_ratio / (1 - config.anchor_ratio) * len(data))
            anchors = reservoir_sample(pool, min(wanted, len(pool)), seed=i)
            tasks.append(SlotTraining(slot, f"hand-made-{i}", data, [], anchors=anchors))
        started = time.perf_counter()
        train_slots(env.bank, env.backbone.tokenizer, tasks, config, prefix=trainer.prefix)
        logger.info("trained %d hand-made candidates in %.0f s", len(tasks), time.perf_counter() - started)
        return [save_slot(env.bank, s, work / f"slot-{i}").directory for i, s in enumerate(slots)]
    finally:
        for slot in slots:
            env.bank.evict_slot(slot)


def absurd_copy(env: World, good_user: str, dest: Path) -> Path:
    """The good user's newest version with every lora_B x 1e30 (finite in fp32, absurd in use)."""
    user_id = TenantRepository(env.db).get_user(tenant_id=env.tenant_id, external_id=good_user).id
    adapter = env.registry.find_adapter(tenant_id=env.tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER)
    assert adapter is not None
    version = env.registry.list_versions(tenant_id=env.tenant_id, adapter_id=adapter.id)[-1]
    folder = env.registry.fetch_version(version=version, dest_dir=dest)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    return folder


def decide(env: World, runner: QARunner, user: str, folder: Path) -> dict[str, Any]:
    """Register ``folder`` as the user's next version and run QA on it, as a ``qa`` job would."""
    user_id = TenantRepository(env.db).get_user(tenant_id=env.tenant_id, external_id=user).id
    if (
        env.registry.find_adapter(tenant_id=env.tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER)
        is None
    ):
        c = env.config
        env.registry.create_adapter(
            tenant_id=env.tenant_id,
            owner_user_id=user_id,
            name=PERSONAL_ADAPTER,
            target_config={
                "rank": c.rank,
                "alpha": c.alpha,
                "dropout": c.dropout,
                "target_modules": c.target_modules,
            },
        )
    records = list_feedback(env.db, tenant_id=env.tenant_id, user_external_id=user, limit=1000)
    version = register(env, user=user, folder=folder, record_ids=[r.id for r in records])
    report = runner.run_candidate(tenant_id=env.tenant_id, version_id=version)
    assert report is not None
    return decision_row(env, report.id)


#: seconds spent decoding answers since the last decision (``lorafleet.qa.matrix._answers``, timed by a wrapper)
_DECODING = {"seconds": 0.0}


def time_decoding() -> None:
    """Wrap QA's answer decoding with a timer (measurement only: the wrapped function runs unchanged)."""
    original = qa_matrix._answers

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _DECODING["seconds"] += time.perf_counter() - started

    qa_matrix._answers = timed


def decision_row(env: World, report_id: int) -> dict[str, Any]:
    """One decision: the kind (its user's name prefix), the verdict, the failed rules, the answers' figures."""
    report, document = load_report(env.db, env.registry, report_id=report_id)
    version = env.registry.get_version_by_id(tenant_id=report.tenant_id, version_id=report.version_id)
    adapter = env.registry.get_adapter(tenant_id=report.tenant_id, adapter_id=version.adapter_id)
    users = TenantRepository(env.db).list_users(tenant_id=report.tenant_id, limit=100)
    user = next(u.external_id for u in users if u.id == adapter.owner_user_id)
    answers = report.summary.get("answers") or {}
    decode, _DECODING["seconds"] = _DECODING["seconds"], 0.0
    return {
        "kind": user.split("-")[0],
        "user": user,
        "decision": str(report.decision),
        "failed": sorted(r["rule"] for r in document["rules"] if not r["passed"])
        or [p.split(":")[0] for p in document["sanity"]["problems"]],
        "reasons": list(report.reasons),
        "f1": answers.get("answer_f1"),
        "reference_f1": answers.get("reference_answer_f1"),
        "p": answers.get("p_value"),
        "better": answers.get("better"),
        "worse": answers.get("worse"),
        "wrong": answers.get("wrong_answers"),
        # every holdout answer (prompt, target, candidate and reference outputs), to rescore offline
        "items": ((document.get("matrix") or {}).get("answers") or {}).get("items"),
        # the candidate's answers on its own training examples (the training-answers rule's evidence)
        "training": ((document.get("matrix") or {}).get("answers") or {}).get("training"),
        "training_n": answers.get("training_answers"),
        "training_wrong": answers.get("training_wrong_answers"),
        "training_f1": answers.get("training_answer_f1"),
        "seconds": report.summary.get("seconds"),
        "decode_seconds": decode,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"QA decisions on {args.backbone} ({args.quantization}), seeds {args.seeds}, {args.users} users per kind "
        f"and seed, default QAPolicy, {seconds:.0f} s in all",
        "",
        "| candidates | n | promoted | rejected | other | failed rules (count) | answer F1: candidate / reference "
        "| s per decision (median) | decoding share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        failed = Counter(rule for r in group for rule in r["failed"] if r["decision"] != "promote")
        promoted = sum(r["decision"] == "promote" for r in group)
        rejected = sum(r["decision"] == "reject" for r in group)
        secs = [r["seconds"] for r in group if r["seconds"] is not None]
        decode = [r["decode_seconds"] / r["seconds"] for r in group if r["decode_seconds"] and r["seconds"]]
        lines.append(
            f"| {kind} | {len(group)} | {promoted} | {rejected} | {len(group) - promoted - rejected} "
            f"| {', '.join(f'{k} ({v})' for k, v in sorted(failed.items())) or '-'} "
            f"| {_mean(group, 'f1')} / {_mean(group, 'reference_f1')} "
            f"| {statistics.median(secs):.1f} | {statistics.mean(decode):.0%} |"
            if secs and decode
            else f"| {kind} | {len(group)} | {promoted} | {rejected} | {len(group) - promoted - rejected} "
            f"| {', '.join(f'{k} ({v})' for k, v in sorted(failed.items())) or '-'} "
            f"| {_mean(group, 'f1')} / {_mean(group, 'reference_f1')} | - | - |"
        )
    bad = [r for r in rows if r["kind"] in BAD]
    good = [r for r in rows if r["kind"] == "good"]
    lines += [
        "",
        f"bad rejected: {sum(r['decision'] == 'reject' for r in bad)}/{len(bad)} (target 100 %); good promoted: "
        f"{sum(r['decision'] == 'promote' for r in good)}/{len(good)} (target >= 95 %)",
    ]
    for r in rows:
        if (r["kind"] == "good") != (r["decision"] == "promote"):
            lines.append(f"- seed {r['seed']} {r['kind']}: {r['decision']}: {'; '.join(r['reasons'])}")
    lines += ["", *by_wrong_answer_weight(rows), "", *by_training_wrong_share(rows)]
    return "\n".join(lines)


def by_training_wrong_share(
    rows: list[dict[str, Any]], shares: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 1.0)
) -> list[str]:
    """The decisions again at other ``QAPolicy.max_training_wrong_share`` values: the training-answers rule reread
    from each decision's stored counts; every other rule's outcome as it was. Also each kind's shares."""
    kinds, lines = _rerun_table(rows, "max_training_wrong_share", "the same training answers")
    for share in shares:
        cells = []
        for kind in kinds:
            group = [r for r in rows if r["kind"] == kind]
            promoted = sum(
                not [rule for rule in r["failed"] if rule != "training-answers"]
                and r["decision"] != "hold"
                and (r.get("training_n") or 0) > 0
                and r["training_wrong"] / r["training_n"] <= share + 1e-12
                for r in group
            )
            cells.append(f"{promoted} of {len(group)}")
        lines.append(f"| {share:g} | " + " | ".join(cells) + " |")
    lines += ["", "share of training answers answering another question, per decision:"]
    for kind in kinds:
        found = [
            f"{r['training_wrong']}/{r['training_n']}"
            for r in rows
            if r["kind"] == kind and r.get("training_n")
        ]
        lines.append(f"- {kind}: {', '.join(found) or '-'}")
    return lines


def by_wrong_answer_weight(
    rows: list[dict[str, Any]], weights: tuple[float, ...] = (0.0, 0.5, 1.0)
) -> list[str]:
    """The decisions again at other ``QAPolicy.wrong_answer_weight`` values, from the same decoded answers: the
    answer rule rerun on each stored holdout (``answer_rule``); every other rule's outcome as it was."""
    kinds, lines = _rerun_table(rows, "wrong_answer_weight", "the same answers rescored")
    for weight in weights:
        policy = QAPolicy(wrong_answer_weight=weight)
        cells = []
        for kind in kinds:
            group = [r for r in rows if r["kind"] == kind]
            promoted = 0
            for r in group:
                others_failed = [rule for rule in r["failed"] if rule != "answers"]
                if not r.get("items") or others_failed:
                    continue
                items = tuple(
                    AnswerItem(
                        i["prompt"],
                        i["expected"],
                        {CANDIDATE: i["outputs"][CANDIDATE], BASE: i["outputs"][BASE]},
                    )
                    for i in r["items"]
                )
                n = len(items)
                matrix = Matrix(
                    (RowInfo("holdout", "user-holdout", n, n, own=True),),
                    (ColumnInfo(BASE, "base"), ColumnInfo(CANDIDATE, "candidate")),
                    {},
                    Answers("holdout", CANDIDATE, BASE, items),
                )
                promoted += answer_rule(matrix, policy).passed
            cells.append(f"{promoted} of {len(group)}")
        lines.append(f"| {weight:g} | " + " | ".join(cells) + " |")
    return lines


def _rerun_table(rows: list[dict[str, Any]], setting: str, how: str) -> tuple[list[str], list[str]]:
    """The kinds present in ``rows`` and the title and header of a table of decisions rerun at each ``setting``."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    header = [f"promoted at each {setting} ({how})", "", f"| {setting} | " + " | ".join(kinds) + " |"]
    return kinds, [*header, "| --- |" + " --- |" * len(kinds)]


def _mean(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.mean(values):.2f}" if values else "-"


if __name__ == "__main__":
    main()
