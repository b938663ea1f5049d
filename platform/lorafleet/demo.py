"""``make demo``: lorafleet end to end on the embedded defaults and the real backbone (SmolLM2-135M-Instruct).

The demo starts the service in this process (the API on 127.0.0.1 and a free port, the continual-learning
scheduler, one local Ray trainer actor; SQLite and a blob directory under ``.lorafleet/``) and then uses only the
SDK (``lorafleet.Client``). It creates a tenant and submits feedback for four users, each with personal facts
the base model cannot know (a pet's name, a home city, a diet, a favourite sport; ``training.personal_facts``),
phrased in varied ways, and for a shared task adapter (customer-support replies in a house style;
``demo_data``). The scheduler trains all five adapters in one batched job, with the project's default training
settings, while the demo shows the job's progress; QA decides on each version. The demo then prints base and
personalised answers side by side on paraphrases the users never sent, with a score per user, checks that a
general question keeps its answer, enrols one user in the task adapter and shows the gate's weights, trains a
second round for one user, rolls it back (answers change, the alias history records it) and prints its lineage.
It stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import uvicorn
from services.api.app import create_app
from services.api.runtime import ApiOptions, usable_cpus
from tqdm import tqdm

from lorafleet.backbone import resolve_backbone_path
from lorafleet.config import Settings, load_settings
from lorafleet.demo_data import TASK, held_out_examples, in_house_style, task_records
from lorafleet.errors import LorafleetError
from lorafleet.jobs import SchedulerPolicy
from lorafleet.runtime.ray_runtime import init_ray
from lorafleet.sdk import Client
from lorafleet.sdk.errors import NotFound
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS
from lorafleet.training.personal_facts import (
    Fact,
    PersonalUser,
    answer_has_fact,
    fact_records,
    make_users,
    personal_values_in,
    split_questions,
)

log = logging.getLogger("lorafleet.demo")

ADAPTER = "personal"
NAMES = ("ada", "bruno", "chiara", "dmitri", "eun", "farah", "gus", "hana")
#: unseen paraphrases asked per fact in the score (the table shows one per fact)
PROBES_PER_FACT = 2
GENERAL_QUESTION = "What is the capital of France?"
MAX_TOKENS = 40
#: concurrent requests: the engine batches them into one forward per step
PARALLEL_REQUESTS = 32


class DemoError(LorafleetError):
    """A step of the demo did not finish in time or went wrong (the message says which; exit status 2)."""

    code = "demo_failed"


@dataclass
class UserRun:
    name: str
    person: PersonalUser
    probes: list[tuple[str, Fact]] = field(default_factory=list)
    version: Any = None  # the SDK's VersionDetail of the version the scheduler made
    outcome: str = "waiting"


class _Server:
    """uvicorn in a thread of this process on 127.0.0.1 and a free port; ``stop`` runs the app's shutdown
    (the scheduler loop and the Ray trainer actors are stopped there)."""

    def __init__(self, app: Any) -> None:
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
def _service(settings: Settings, timeout: float) -> Iterator[_Server]:
    policy = SchedulerPolicy(
        min_new_records=8, max_staleness=timedelta(seconds=5), users_per_job=5, max_active_jobs=2
    )
    options = ApiOptions(
        run_scheduler=True,
        scheduler_interval=2.0,
        scheduler_policy=policy,
        run_workers=1,
        worker_poll_seconds=0.5,
        migrate=True,
        preload_engine=True,
        engine_slots=8,
        max_batch_size=PARALLEL_REQUESTS,
        training=SERVICE_TRAINING_DEFAULTS,  # what `lorafleet serve` trains with
        serving_threads=usable_cpus(),  # the story serves and trains in turn (see run_demo)
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
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        log.info("stopping the local Ray")
        ray.shutdown()


# --- asking ----------------------------------------------------------------------------------------------------
def _answers(client: Client, asks: Sequence[tuple[str, str]]) -> list[str]:
    """Greedy answers to ``(user, prompt)`` pairs, sent concurrently so the engine serves them in shared batches."""
    return [answer for answer, _ in _served_answers(client, asks)]


def _served_answers(client: Client, asks: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """As ``_answers``, each with what served it: the adapters' names, or "the base" when the gate chose none."""

    def one(ask: tuple[str, str]) -> tuple[str, str]:
        out = client.generate(ask[0], ask[1], max_tokens=MAX_TOKENS, temperature=0.0)
        served = ", ".join(s.adapter for s in out.served_by if s.weight > 0) or "the base"
        return " ".join(out.text.split()), served

    with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
        return list(pool.map(one, asks))


def _short(text: str, width: int) -> str:
    text = text or "''"
    return text if len(text) <= width else text[: width - 1] + "…"


def _pct(value: Any) -> str:
    return f"{100 * value:3.0f}%" if isinstance(value, int | float) else "   -"


# --- waiting ---------------------------------------------------------------------------------------------------
def _watch_training(client: Client, timeout: float) -> None:
    """A progress bar over the scheduler's train jobs (step, loss, ETA) until none is queued or running."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < deadline:
        active = [j for j in client.list_jobs() if j.kind == "train" and not j.finished]
        if not active and seen:
            return
        for job in active:
            if job.id in seen:
                continue
            seen.add(job.id)
            subjects = ", ".join(job.users)
            with tqdm(total=1.0, desc=f"train job {job.id} ({subjects})", unit="", bar_format=_BAR) as bar:
                client.wait_for_job(job.id, timeout=timeout, poll=1.0, on_progress=_progress_to(bar))
        time.sleep(1.0)
    raise DemoError(f"training did not finish within {timeout:g} s")


_BAR = "{desc}: {percentage:3.0f}%|{bar:24}| {postfix}"


def _progress_to(bar: Any) -> Callable[[Any], None]:
    def update(progress: Any) -> None:
        bar.n = progress.fraction
        eta = f", about {progress.eta_seconds:.0f} s left" if progress.eta_seconds is not None else ""
        loss = f", mean loss {progress.loss:.2f}" if progress.loss is not None else ""
        steps = f"step {progress.step}/{progress.total_steps}" if progress.total_steps else progress.phase
        bar.set_postfix_str(f"{steps}{loss}{eta}")

    return update


def _wait_for_versions(client: Client, runs: list[UserRun], timeout: float, *, number: int = 1) -> None:
    """Until every user's version ``number`` (or later) is decided (live or rejected) or its job failed."""
    deadline = time.monotonic() + timeout
    pending = {r.name: r for r in runs}
    for r in runs:
        r.outcome = "waiting"
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
        if pending and time.monotonic() > deadline:
            states = {n: [(j.kind, j.state) for j in client.list_jobs(user=n)] for n in pending}
            raise DemoError(f"no QA decision within {timeout:g} s for {sorted(pending)}; jobs: {states}")
        time.sleep(1.0 if pending else 0)


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


# --- the demo --------------------------------------------------------------------------------------------------
def demo_command(args: argparse.Namespace) -> int:
    """``lorafleet demo``: the demo prints its own story, so without ``--verbose`` the services and libraries it
    runs speak up only for warnings (Ray only for errors)."""
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("ray").setLevel(logging.ERROR)
    return run_demo(users=args.users, timeout=args.timeout)


def run_demo(*, users: int = 4, timeout: float = 900.0) -> int:
    if not 1 <= users <= len(NAMES):
        raise DemoError(f"--users must be in 1..{len(NAMES)}")
    for noisy in ("httpx", "lorafleet.jobs.scheduler"):  # a line per request / per tick would drown the demo
        logging.getLogger(noisy).setLevel(logging.WARNING)
    clock = _Clock()
    admin_key = "demo-admin-" + secrets.token_hex(16)
    # one slot per user and one for the shared task: the scheduler trains them all in one batched job. The story
    # trains, then serves, then trains again, so training and serving each take every core (a service that does
    # both at once keeps the defaults: one core for its trainer actor, the rest for serving; `trainer_threads`)
    settings = load_settings(
        admin_key=admin_key, ray_address="", trainer_slots=users + 1, trainer_threads=usable_cpus()
    )
    print(
        f"lorafleet demo: backbone {settings.backbone} ({settings.backbone_quantization}), "
        f"database {settings.resolved_database_url}, blobs {settings.resolved_object_store_url}"
    )
    # a fresh data dir converts the built-in backbone once (about half a minute, with its own progress bar):
    # done here, before the service's trainer actor and engine load it, so it is not interleaved with them
    resolve_backbone_path(settings.backbone, data_dir=settings.data_dir)
    clock.mark("backbone")
    # the local Ray is started here, on the main thread, not by the service's start-up, which runs in the API
    # server's thread: Ray's processes die with the thread that started them (PR_SET_PDEATHSIG), so they were
    # killed when that thread ended, and ray.shutdown() then sat 15 s in its flush timeouts on a dead GCS
    init_ray(settings)
    with _service(settings, timeout=600.0) as server:
        clock.mark("start service")
        print(f"service up at {server.url} (API + scheduler + 1 Ray trainer actor)")
        with Client(server.url, admin_key, timeout=120.0) as admin:
            tenant = admin.create_tenant(f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
        print(f"tenant {tenant.name!r} created (its API key is shown once: {tenant.api_key[:8]}...)")
        with Client(server.url, tenant.api_key, timeout=300.0) as client:
            people = make_users(users, seed=0)
            runs = [UserRun(NAMES[i], person) for i, person in enumerate(people)]
            _submit_feedback(client, runs)
            clock.mark("feedback")
            print("the scheduler trains these users and the task in one batched job; QA then decides:")
            _watch_training(client, timeout)
            _wait_for_versions(client, runs, timeout)
            task_live = _wait_for_task(client, timeout)
            clock.mark("train + QA")
            _show_results(client, runs)
            _general_question(client, runs)
            clock.mark("answers")
            _task_adapter_step(client, runs[-1], task_live=task_live, timeout=timeout)
            clock.mark("shared task adapter")
            _rollback_and_lineage(client, runs, timeout)
            clock.mark("round 2 + rollback + lineage")
    clock.mark("stop service")
    print(clock.report())
    return 0


def _submit_feedback(client: Client, runs: list[UserRun]) -> None:
    for run in runs:
        records = fact_records(run.person, rounds=[1])
        client.submit_feedback(run.name, records)
        facts = run.person.facts_of([1])
        for fact in facts:
            _, unseen = split_questions(fact.kind)
            run.probes += [(q, fact) for q in unseen[:PROBES_PER_FACT]]
        shown = ", ".join(f"{f.kind.replace('_', ' ')}: {f.value}" for f in facts)
        print(f"  {run.name}: {len(records)} feedback records ({shown})")
        print(f"      e.g. {records[0]['prompt']!r} -> {records[0]['completion']!r}")
    records = task_records()
    client.submit_task_feedback(TASK, records)
    print(f"  task {TASK!r}: {len(records)} feedback records, e.g. {records[0]['prompt']!r}")
    print(f"      -> {records[0]['completion']!r}")


def _show_results(client: Client, runs: list[UserRun]) -> None:
    """Base against personalised answers on paraphrases each user never sent, and a score per user."""
    base_user = "demo-nobody"  # a user with no adapters: the same backbone, an empty bank
    asks = [(who, q) for run in runs for q, _ in run.probes for who in (base_user, run.name)]
    answers = iter(_answers(client, asks))
    print()
    print("questions the users never asked in these words (greedy answers):")
    print(f"{'user':7} {'question':42} {'base model':34} {'personalised':34}")
    scores: dict[str, tuple[int, int]] = {}
    for run in runs:
        base_right = personal_right = 0
        shown: set[str] = set()
        for question, fact in run.probes:
            base, personal = next(answers), next(answers)
            base_right += answer_has_fact(base, fact)
            personal_right += answer_has_fact(personal, fact)
            if fact.kind not in shown:
                shown.add(fact.kind)
                print(
                    f"{run.name:7} {_short(question, 42):42} {_short(base, 34):34} {_short(personal, 34):34}"
                )
        scores[run.name] = (base_right, personal_right)
    print()
    print(f"{'user':7} {'version':8} {'QA':24} {'facts right: base':>18} {'personalised':>13}")
    for run in runs:
        v = run.version
        number = f"v{v.number}" if v is not None else "-"
        decision = run.outcome if v is None else f"{v.status} ({v.qa_decision or 'no QA report'})"
        base_right, personal_right = scores[run.name]
        n = len(run.probes)
        print(
            f"{run.name:7} {number:8} {_short(decision, 24):24} {f'{base_right}/{n}':>18} "
            f"{f'{personal_right}/{n}':>13}"
        )
        if v is not None and v.status == "rejected":
            print(f"  QA rejected {run.name}'s v{v.number}: it is kept but not served (the base answers)")


def _general_question(client: Client, runs: list[UserRun]) -> None:
    """A general question whose answer must not change: no personal fact leaks into it. The gate's base side
    answers it with the base model when none of the user's adapters claims it (README, "General prompts go to
    the base")."""
    names = ["demo-nobody", *(r.name for r in runs)]
    answers = _served_answers(client, [(n, GENERAL_QUESTION) for n in names])
    people = [r.person for r in runs]
    print()
    print(f"a general question, {GENERAL_QUESTION!r} (served by):")
    for name, (answer, served) in zip(names, answers, strict=True):
        leaked = personal_values_in(answer, people)
        note = f"  <- mentions {leaked}" if leaked else ""
        label = "base model" if name == "demo-nobody" else name
        print(f"  {label:11} {_short(answer, 56):56} ({served}){note}")


def _task_adapter_step(client: Client, run: UserRun, *, task_live: bool, timeout: float) -> None:
    """Enrol one user in the shared task adapter, show how the gate weights it against their own adapter, and
    what QA's recheck of their live adapter in the grown bank decided."""
    print()
    [task] = [t for t in client.list_tasks() if t.name == TASK]
    print(f"shared task adapter {TASK!r}: version {task.live_version} live")
    if not task_live:
        print("  QA rejected its first version, so there is nothing live to enrol in (see its QA report)")
        return
    client.enrol(run.name, TASK)
    print(f"{run.name} enrolled in {TASK!r}: their bank is now their personal adapter + {TASK!r}")
    held_out = [e.prompt for e in held_out_examples()]
    prompts = held_out + [q for q, _ in run.probes[:2]]
    before = _answers(client, [("demo-nobody", p) for p in held_out])
    with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:  # concurrent: the engine batches them
        outs = list(
            pool.map(lambda p: client.generate(run.name, p, max_tokens=MAX_TOKENS, temperature=0.0), prompts)
        )
    print(f"{'message':36} {'answer':46} gate weights")
    for prompt, out in zip(prompts, outs, strict=True):
        weights = ", ".join(f"{b.adapter}={b.weight:.2f}" for b in out.served_by) or "base only"
        text = " ".join(out.text.split())
        print(f"{_short(prompt, 36):36} {_short(text, 46):46} {weights}")
    styled = sum(in_house_style(" ".join(o.text.split())) for o in outs[: len(held_out)])
    base_styled = sum(in_house_style(b) for b in before)
    print(
        f"house style on support messages about problems it never saw: {styled}/{len(held_out)} "
        f"(base model {base_styled}/{len(held_out)})"
    )
    if run.version is not None and run.version.status == "live":
        report = _wait_for_recheck(client, run.name, run.version.number, timeout)
        # a failing bank is pinned on the member that changed it (docs/qa.md, "Blame"): that reason says most
        blame = [r for r in report.reasons if r.startswith("blame: ")]
        detail = (blame or report.reasons or ["-"])[0]
        print(
            f"QA recheck of {run.name}'s v{run.version.number} in the grown bank: {report.decision} ({detail})"
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


def _rollback_and_lineage(client: Client, runs: list[UserRun], timeout: float) -> None:
    """A second round of feedback for one user (v2, continued from v1), a rollback, the history, the lineage."""
    live = [r for r in runs if r.version is not None and r.version.status == "live"]
    print()
    if not live:
        print("rollback: skipped - no user has a live version to roll back from")
        return
    run = live[0]
    first = run.version
    records = fact_records(run.person, rounds=[2])
    new_facts = run.person.facts_of([2])
    client.submit_feedback(run.name, records)
    shown = ", ".join(f"{f.kind.replace('_', ' ')}: {f.value}" for f in new_facts)
    print(
        f"{run.name} tells more: {len(records)} records ({shown}); the scheduler continues v{first.number} ..."
    )
    _watch_training(client, timeout)
    _wait_for_versions(client, [run], timeout, number=first.number + 1)
    second = run.version
    probes = [(split_questions(f.kind)[1][0], f) for f in new_facts]
    if second is None or second.status != "live":
        print(f"  {run.name}'s next version was not promoted ({run.outcome}); nothing to roll back from")
        return
    print(f"  v{second.number} is live (QA: {second.qa_decision or '-'})")
    before = _answers(client, [(run.name, q) for q, _ in probes])
    event = client.rollback(
        run.name, ADAPTER, first.number, reason="demo: the user asked to undo the last update"
    )
    after = _answers(client, [(run.name, q) for q, _ in probes])
    right_before = sum(answer_has_fact(a, f) for a, (_, f) in zip(before, probes, strict=True))
    right_after = sum(answer_has_fact(a, f) for a, (_, f) in zip(after, probes, strict=True))
    print(
        f"rolled back {run.name} from v{event.from_version} to v{event.to_version}: the new facts are answered "
        f"{right_before}/{len(probes)} before, {right_after}/{len(probes)} after"
    )
    print(f"  e.g. {probes[0][0]!r}: {_short(before[0], 40)!r} -> {_short(after[0], 40)!r}")
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
