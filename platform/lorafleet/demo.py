"""``make demo``: lorafleet end to end on the embedded defaults (SQLite + local blobs under ``.lorafleet/``).

The demo starts the service in this process (the API on 127.0.0.1 and a free port, the continual-learning
scheduler, one local Ray trainer actor) and then uses only the SDK (``lorafleet.Client``): it creates a tenant,
submits feedback for a few synthetic users (each has private preferences a base model can only guess, see
``lorafleet.training.synthetic``), lets the scheduler train them and QA decide, generates for each user on
prompts they never submitted (base answer against personalised answer), trains a shared task adapter from task
feedback in the same batched job, enrols one user in it and shows the gate's weights, rolls one user back and
shows their answers change and the alias history records it, and prints one lineage. It stops everything it started.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    import uvicorn

    from lorafleet.sdk import Client

log = logging.getLogger("lorafleet.demo")

ADAPTER = "personal"
RECORDS_PER_USER = 64
PROBES_PER_USER = 8
#: small enough for ~1-2 minutes on 2 CPU cores, enough to learn 4 preferences per user
TRAINING: dict[str, Any] = {
    "rank": 8,
    "alpha": 16.0,
    "target_modules": "all-linear",
    "learning_rate": 3e-3,
    "max_steps": 300,
    "batch_size": 8,
    "max_seq_len": 48,
    "holdout_fraction": 0.2,
    "dropout": 0.0,
}
#: the shared task adapter the demo trains from task feedback and enrols one user in
TASK = "pig-latin"
TASK_RECORDS = 48
NAMES = ("ada", "bruno", "chiara", "dmitri", "eun", "farah", "gus", "hana")


class DemoError(LorafleetError):
    """A step of the demo did not finish in time or went wrong (the message says which; exit status 2)."""

    code = "demo_failed"


@dataclass
class UserRun:
    name: str
    preferences: dict[str, str]
    probes: list[str] = field(default_factory=list)
    version: Any = None  # the SDK's VersionDetail of the version the scheduler made
    outcome: str = "waiting"


class _Server:
    """uvicorn in a thread of this process on 127.0.0.1 and a free port; ``stop`` runs the app's shutdown
    (the scheduler loop and the Ray trainer actors are stopped there)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server: uvicorn.Server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorafleet-demo-api", daemon=True)
        self.url = ""

    def start(self, timeout: float) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise DemoError("the API server exited while starting (see the log above)")
            if time.monotonic() > deadline:
                raise DemoError(f"the API server did not start within {timeout:g} s")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise DemoError(f"the API server did not stop within {timeout:g} s")


class _Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []
        self._last = self.start

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.marks.append((step, now - self._last))
        self._last = now

    def report(self) -> str:
        parts = [f"{step} {seconds:.0f}s" for step, seconds in self.marks]
        return f"timings: {', '.join(parts)}; total {time.monotonic() - self.start:.0f}s"


@contextmanager
def _service(settings: Any, timeout: float) -> Iterator[_Server]:
    from datetime import timedelta

    from services.api.app import create_app
    from services.api.runtime import ApiOptions

    from lorafleet.jobs import SchedulerPolicy

    policy = SchedulerPolicy(
        min_new_records=8, max_staleness=timedelta(seconds=5), users_per_job=4, max_active_jobs=2
    )
    options = ApiOptions(
        run_scheduler=True,
        scheduler_interval=2.0,
        scheduler_policy=policy,
        run_workers=1,
        worker_poll_seconds=0.5,
        training=TRAINING,
        migrate=True,
        engine_slots=8,
        engine_max_rank=8,
    )
    server = _Server(create_app(settings, options=options))
    server.start(timeout)
    try:
        yield server
    finally:
        log.info("stopping the API server, the scheduler and the trainer actor")
        server.stop()
        _stop_local_ray()


def _stop_local_ray() -> None:
    """Shut down the local Ray this process started (its raylet and agents), not only at interpreter exit."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        log.info("stopping the local Ray")
        ray.shutdown()


def _probes(submitted: list[dict[str, Any]], *, seed: int, round: int = 1) -> list[str]:
    """Prompts about the trained topics in phrasings the user never submitted (held out from training)."""
    from lorafleet.training.synthetic import OPENERS, TEMPLATES, prompt_for, round_topics

    seen = {r["prompt"] for r in submitted}
    combos = list(itertools.product(round_topics(round), range(len(TEMPLATES)), range(len(OPENERS))))
    random.Random(seed).shuffle(combos)
    unseen = [p for t, tm, o in combos if (p := prompt_for(t, template=tm, opener=o)) not in seen]
    # one of each topic first, so every preference shows in the table
    by_topic: dict[str, list[str]] = {}
    for p in unseen:
        by_topic.setdefault(_topic(p), []).append(p)
    ordered = [p for group in itertools.zip_longest(*by_topic.values()) for p in group if p]
    return ordered[:PROBES_PER_USER]


def _topic(prompt: str) -> str:
    from lorafleet.training.synthetic import topic_of

    return topic_of(prompt)


def _answer(client: Client, user: str, prompt: str) -> tuple[str, Any]:
    out = client.generate(user, prompt, max_tokens=6, temperature=0.0, stop=["\n"])
    return out.text.strip(), out


def _show(text: str, width: int = 9) -> str:
    """An answer for the table: the untrained tiny backbone emits arbitrary bytes, shown as '?'."""
    shown = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)[:width]
    return shown or "''"


def _pct(value: Any) -> str:
    return f"{100 * value:5.1f}%" if isinstance(value, int | float) else "    - "


def _wait_for_versions(client: Client, runs: list[UserRun], timeout: float, *, number: int = 1) -> None:
    """Poll until every user's version ``number`` (or a later one) is decided (live or rejected) or its
    training job failed for good."""
    from tqdm import tqdm

    from lorafleet.sdk.errors import NotFound

    deadline = time.monotonic() + timeout
    pending = {r.name: r for r in runs}
    for r in runs:
        r.outcome = "waiting"
    with tqdm(total=len(runs), desc="training + QA", unit="user", mininterval=1.0) as bar:
        while pending:
            for name, run in list(pending.items()):
                try:
                    versions = client.list_versions(name, ADAPTER)
                except NotFound:
                    versions = []
                decided = [v for v in versions if v.number >= number and v.status in ("live", "rejected")]
                if decided:
                    run.version = client.get_version(name, ADAPTER, decided[-1].number)
                    run.outcome = decided[-1].status
                elif failed := [j for j in client.list_jobs(user=name) if j.state == "failed"]:
                    run.outcome = f"job {failed[0].id} failed: {failed[0].error}"
                if run.outcome != "waiting":
                    del pending[name]
                    bar.update(1)
                    bar.set_postfix_str(f"{name}: {run.outcome}")
            if not pending:
                break
            if time.monotonic() > deadline:
                states = {n: [(j.kind, j.state) for j in client.list_jobs(user=n)] for n in pending}
                raise DemoError(f"no QA decision within {timeout:g} s for {sorted(pending)}; jobs: {states}")
            time.sleep(1.0)


def run_demo(*, users: int = 4, timeout: float = 600.0) -> int:
    from lorafleet.config import load_settings
    from lorafleet.sdk import Client
    from lorafleet.training.synthetic import CHANCE, make_user_records, user_preferences

    if not 1 <= users <= len(NAMES):
        raise DemoError(f"--users must be in 1..{len(NAMES)}")
    for noisy in ("httpx", "lorafleet.jobs.scheduler"):  # a line per request / per tick would drown the demo
        logging.getLogger(noisy).setLevel(logging.WARNING)
    clock = _Clock()
    admin_key = "demo-admin-" + secrets.token_hex(16)
    # one slot per user and one for the shared task: the scheduler trains them all in one batched job
    settings = load_settings(admin_key=admin_key, ray_address="", trainer_slots=users + 1)
    print(
        f"lorafleet demo: database {settings.resolved_database_url}, blobs {settings.resolved_object_store_url}, "
        f"promotion rule {settings.promote_rule!r}"
    )
    with _service(settings, timeout=300.0) as server:
        clock.mark("start service")
        print(f"service up at {server.url} (API + scheduler + 1 Ray trainer actor)")
        with Client(server.url, admin_key, timeout=120.0) as admin:
            tenant = admin.create_tenant(f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
        print(f"tenant {tenant.name!r} created (its API key is shown once: {tenant.api_key[:8]}...)")
        with Client(server.url, tenant.api_key, timeout=300.0) as client:
            runs = [UserRun(name, user_preferences(name)) for name in NAMES[:users]]
            for i, run in enumerate(runs):
                records = make_user_records(run.name, round=1, n_records=RECORDS_PER_USER, seed=0)
                client.submit_feedback(run.name, records)
                run.probes = _probes(records, seed=i)
                likes = ", ".join(f"{t}={run.preferences[t]}" for t in ("color", "pet", "drink", "fruit"))
                print(f"  {run.name}: {len(records)} feedback records submitted (secretly likes {likes})")
            task_records = _submit_task_feedback(client)
            clock.mark("feedback")
            print("waiting for the scheduler to train these users and the task, and QA to decide ...")
            _wait_for_versions(client, runs, timeout)
            task_live = _wait_for_task(client, timeout)
            clock.mark("train + QA")
            _show_results(client, runs, chance=CHANCE)
            clock.mark("generate")
            # the last user joins the task (the first one's adapter is the one rolled back below)
            _task_adapter_step(client, runs[-1], task_live=task_live, n_records=task_records, timeout=timeout)
            clock.mark("shared task adapter")
            _rollback_and_lineage(client, runs, timeout)
            clock.mark("round 2 + rollback + lineage")
    clock.mark("stop service")
    print(clock.report())
    return 0


def _submit_task_feedback(client: Client) -> int:
    """Feedback for the shared task adapter (the first batch creates it), trained with the users' adapters."""
    from lorafleet.routing.synthetic import task_split

    train, _ = task_split(TASK, n_train=TASK_RECORDS, n_holdout=1, seed=0)
    records = [{"kind": "sft", "prompt": e.prompt, "completion": e.completion} for e in train]
    client.submit_task_feedback(TASK, records)
    print(f"  task {TASK!r}: {len(records)} feedback records submitted (e.g. {train[0].prompt.strip()!r})")
    return len(records)


def _wait_for_task(client: Client, timeout: float) -> bool:
    """Until the task's first version is decided (live or rejected) or its job failed; True if live."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        decided = [v for v in client.list_task_versions(TASK) if v.status in ("live", "rejected")]
        if decided:
            return decided[0].status == "live"
        if any(j.state == "failed" and f"task:{TASK}" in j.users for j in client.list_jobs(state="failed")):
            return False
        time.sleep(1.0)
    raise DemoError(f"no QA decision on task {TASK!r} within {timeout:g} s")


def _task_adapter_step(
    client: Client, run: UserRun, *, task_live: bool, n_records: int, timeout: float
) -> None:
    """Enrol one user in the shared task adapter, show how the gate weights it against their own adapter, and
    what QA's recheck of their live adapter in the grown bank decided."""
    from lorafleet.routing.synthetic import task_split

    print()
    [task] = [t for t in client.list_tasks() if t.name == TASK]
    print(f"shared task adapter {TASK!r}: version {task.live_version} live, trained on {n_records} records")
    if not task_live:
        print("  QA rejected its first version, so there is nothing live to enrol in (see its QA report)")
        return
    client.enrol(run.name, TASK)
    print(f"{run.name} enrolled in {TASK!r}: their bank is now their personal adapter + {TASK!r}")
    _, holdout = task_split(TASK, n_train=TASK_RECORDS, n_holdout=2, seed=0)
    prompts = [e.prompt for e in holdout] + run.probes[:2]
    print(f"{'prompt':40} {'answer':20} gate weights")
    for prompt in prompts:
        text, info = _answer(client, run.name, prompt)
        weights = ", ".join(f"{b.adapter}={b.weight:.2f}" for b in info.served_by) or "base only"
        print(f"{' '.join(prompt.split())[:40]:40} {_show(text, 20):20} {weights}")
    if run.version is not None and run.version.status == "live":
        report = _wait_for_recheck(client, run.name, run.version.number, timeout)
        print(
            f"QA recheck of {run.name}'s v{run.version.number} in the grown bank: {report.decision}"
            f" ({report.reasons[0] if report.reasons else '-'})"
        )


def _wait_for_recheck(client: Client, user: str, number: int, timeout: float) -> Any:
    """The QA recheck report on a user's version (queued by the enrolment), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rechecks = [r for r in client.get_version(user, ADAPTER, number).qa_reports if r.kind == "recheck"]
        if rechecks:
            return rechecks[-1]
        time.sleep(1.0)
    raise DemoError(f"no QA recheck of {user}'s v{number} within {timeout:g} s")


def _show_results(client: Client, runs: list[UserRun], *, chance: float) -> None:
    base_user = "demo-base-probe"  # a user with no adapters: the same backbone, an empty bank
    print()
    print(f"{'user':8} {'prompt':36} {'truth':9} {'base':9} {'personal':9} served by")
    served_acc: dict[str, tuple[float, float]] = {}
    for run in runs:
        base_right = personal_right = 0
        for i, prompt in enumerate(run.probes):
            truth = run.preferences[_topic(prompt)]
            base, _ = _answer(client, base_user, prompt)
            personal, out = _answer(client, run.name, prompt)
            base_right += base == truth
            personal_right += personal == truth
            if i < 2:
                served = ", ".join(f"{a} v{n}" for a, n in out.versions.items()) or "base"
                shown = prompt.replace("\n", " ").strip()
                print(f"{run.name:8} {shown[:36]:36} {truth:9} {_show(base):9} {_show(personal):9} {served}")
        served_acc[run.name] = (base_right / len(run.probes), personal_right / len(run.probes))
    print()
    print(
        f"{'user':8} {'version':8} {'QA decision':24} {'holdout acc before':>18} {'after':>7} "
        f"{'unseen prompts: base':>21} {'personal':>9}"
    )
    for run in runs:
        v = run.version
        number = f"v{v.number}" if v is not None else "-"
        decision = run.outcome if v is None else f"{v.status} ({v.qa_decision or 'no QA report'})"
        metrics = v.metrics if v is not None else {}
        base_acc, personal_acc = served_acc[run.name]
        print(
            f"{run.name:8} {number:8} {decision[:24]:24} "
            f"{_pct(metrics.get('holdout_sequence_accuracy_before')):>18} "
            f"{_pct(metrics.get('holdout_sequence_accuracy_after')):>7} "
            f"{_pct(base_acc):>21} {_pct(personal_acc):>9}"
        )
        if v is not None and v.status == "rejected":
            print(f"  QA rejected {run.name}'s v{v.number}: it is kept but not served (the base answers)")
    print(f"(chance for a guess is {100 * chance:.1f}%; answers are greedy, max 6 tokens)")


def _accuracy(client: Client, run: UserRun, prompts: list[str]) -> tuple[float, list[str]]:
    answers = [_answer(client, run.name, p)[0] for p in prompts]
    right = sum(a == run.preferences[_topic(p)] for a, p in zip(answers, prompts, strict=True))
    return right / len(prompts), answers


def _rollback_and_lineage(client: Client, runs: list[UserRun], timeout: float) -> None:
    """A second round of feedback for one user (v2, continued from v1), a rollback, the history, the lineage."""
    from lorafleet.training.synthetic import make_user_records, round_topics

    live = [r for r in runs if r.version is not None and r.version.status == "live"]
    print()
    if not live:
        print("rollback: skipped - no user has a live version to roll back from")
        return
    run = live[0]
    first = run.version
    records = make_user_records(run.name, round=2, n_records=RECORDS_PER_USER, seed=0)
    client.submit_feedback(run.name, records)
    print(
        f"{run.name}: {len(records)} more feedback records about new topics {', '.join(round_topics(2))}; "
        f"waiting for the scheduler to continue v{first.number} ..."
    )
    _wait_for_versions(client, [run], timeout, number=first.number + 1)
    second = run.version
    probes = _probes(records, seed=7, round=2)
    if second is not None and second.status == "live":
        print(f"  v{second.number} is live (QA: {second.qa_decision or '-'})")
        target: int | None = first.number
    else:
        print(
            f"  {run.name}'s next version was not promoted ({run.outcome}); rolling back to no adapter instead"
        )
        probes, target = run.probes, None
    [adapter] = [a for a in client.list_adapters(run.name) if a.name == ADAPTER]
    if target is None and adapter.live_version is None:
        print(f"  {run.name} has no live version any more: nothing to roll back")
        return
    acc_before, before = _accuracy(client, run, probes)
    event = client.rollback(run.name, ADAPTER, target, reason="demo: user reported odd answers")
    acc_after, after = _accuracy(client, run, probes)
    to = f"v{event.to_version}" if event.to_version else "no adapter"
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    print(
        f"rolled back {run.name} from v{event.from_version} to {to}: {changed}/{len(probes)} answers changed, "
        f"accuracy on unseen prompts about those topics {_pct(acc_before).strip()} -> {_pct(acc_after).strip()}"
    )
    print(f"  e.g. {probes[0].strip()!r}: {_show(before[0], 12)!r} -> {_show(after[0], 12)!r}")
    print(f"alias history of {run.name}/{ADAPTER} (when, from -> to, actor, reason):")
    for e in client.alias_history(run.name, ADAPTER):
        frm = f"v{e.from_version}" if e.from_version else "none"
        dest = f"v{e.to_version}" if e.to_version else "none"
        print(f"  {e.created_at:%H:%M:%S} {frm:>4} -> {dest:<4} {e.actor:28} {e.reason}")
    latest = max(v.number for v in client.list_versions(run.name, ADAPTER))
    lineage = client.lineage(run.name, ADAPTER, latest)
    chain = [n.version.number for n in reversed(lineage.ancestors)] + [lineage.root.version.number]
    root = lineage.root
    snapshot = root.dataset_snapshot
    relations = sorted({e.relation for e in lineage.edges})
    print(
        f"lineage of {run.name}/{ADAPTER} v{latest}: {' -> '.join(f'v{n}' for n in chain)} "
        f"({', '.join(relations) or 'no parents'}); v{latest}: job {root.job.id if root.job else '-'}, "
        f"dataset snapshot of {snapshot.record_count if snapshot else '-'} records, "
        f"sha256 {root.version.sha256[:12]}, QA {', '.join(root.qa_decisions) or '-'}"
    )
