"""Train jobs run in this process by a real ``JobWorker`` and ``ContinualTrainer`` on the nf4 tiny backbone,
over SQLite and PostgreSQL: continuing from the live version, a continuing job's own passes
(``continual_min_epochs``), a NaN that fails the job cleanly, a stale worker that cannot register, and one job for
the same submission twice."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import torch
from continual_helpers import TINY_TRAINING, count_versions_and_snapshots, feed_users, get_job

from lorafleet.adapters import AdapterBank
from lorafleet.config import Settings
from lorafleet.jobs import JobQueue, JobWorker, Scheduler
from lorafleet.qa.evalsets import training_config_of
from lorafleet.registry import Registry
from lorafleet.runtime.job_commands import train_now
from lorafleet.store.sql.database import Database
from lorafleet.training.trainer import SlotTraining, train_slots
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer


class MovableClock:
    """Real time plus an offset the test moves (feedback rows keep real timestamps)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def _worker(trainer: ContinualTrainer, queue: JobQueue, name: str) -> JobWorker:
    return JobWorker(queue, worker_id=name, handlers={"train": trainer.run_job}, lease_seconds=30)


def _recording(seen: list[list[SlotTraining]]) -> Callable[..., Any]:
    """``train_slots``, keeping each job's tasks in ``seen``."""

    def recording(
        bank: AdapterBank, tokenizer: Any, tasks: Sequence[SlotTraining], *args: Any, **kw: Any
    ) -> Any:
        seen.append(list(tasks))
        return train_slots(bank, tokenizer, tasks, *args, **kw)

    return recording


def _adapter_id(registry: Registry, tenant_id: int, user_id: int) -> int:
    adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER)
    assert adapter is not None
    return adapter.id


def test_a_second_job_continues_from_the_live_version_with_replay(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    queue = JobQueue(database)
    worker = _worker(make_trainer(promote_rule="always"), queue, "w1")
    first = feed_users(database, tenant_id=tenant_id, users=["ann"], round=1, n_records=10)["ann"]
    job1 = Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="ann").job
    assert worker.run_once() is not None and get_job(database, job1.id).state == "succeeded"
    second = feed_users(database, tenant_id=tenant_id, users=["ann"], round=2, n_records=6)["ann"]
    job2 = Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="ann").job
    worker.run_once()

    user_id = job2.payload["users"][0]["user_id"]
    adapter_id = _adapter_id(registry, tenant_id, user_id)
    v1, v2 = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)
    assert (v1.job_id, v2.job_id) == (job1.id, job2.id)
    assert (v1.status, v2.status) == ("archived", "live")  # "always" promoted both in turn
    lineage = registry.lineage(tenant_id=tenant_id, version_id=v2.id)
    assert [(e.parent_version_id, e.relation) for e in lineage.edges] == [(v1.id, "continued-from")]
    snapshot = lineage.root.dataset_snapshot
    assert snapshot is not None and snapshot.record_ids is not None
    replay = snapshot.details["replay_ids"]
    assert len(replay) == 3 and set(replay) <= set(first)  # 0.5 x 6 new records, from the parent's data
    assert set(snapshot.record_ids) == set(second) | set(replay)
    assert (snapshot.details["new_min_id"], snapshot.details["new_max_id"]) == (min(second), max(second))
    assert v2.metrics["new_records"] == 6 and v2.metrics["replay_records"] == 3

    # a stale job (the same watermark as job 2) finds nothing new: it succeeds, naming why, with no version
    stale = queue.submit(
        tenant_id=tenant_id,
        kind="train",
        payload=job2.payload,
        user_ids=[(user_id, max(second))],
        dedupe_key=None,
    ).job
    done = worker.run_once()
    assert done is not None and done.id == stale.id and done.state == "succeeded"
    assert done.result == {"versions": [], "skipped": {"ann": "no_new_records"}}
    assert len(registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)) == 2


def test_a_continuing_job_trains_continual_min_epochs_passes(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    """A first version trains ``max_steps`` (``min_epochs`` 0); the next one, continuing it, makes
    ``continual_min_epochs`` passes over its rows (new records, replayed ones and anchors)."""
    queue = JobQueue(database)
    worker = _worker(make_trainer(promote_rule="always"), queue, "w1")
    passes = {"max_steps": 2, "min_epochs": 0.0, "continual_min_epochs": 3.0}
    versions = []
    for round_ in (1, 2):
        feed_users(database, tenant_id=tenant_id, users=["cy"], round=round_, n_records=8)
        job = (
            Scheduler(database, queue=queue)
            .train_now(tenant_id=tenant_id, user_external_id="cy", training=passes)
            .job
        )
        assert worker.run_once() is not None and get_job(database, job.id).state == "succeeded"
        adapter_id = _adapter_id(registry, tenant_id, job.payload["users"][0]["user_id"])
        versions = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)

    first, second = (v.metrics for v in versions)
    assert first["steps"] == 2  # a new adapter: 0 passes asked, max_steps decides
    rows = int(second["train_examples"] + second["anchor_examples"])
    config = training_config_of(versions[1])  # the job's resolved config
    assert (
        second["steps"]
        == config.steps_for(rows, continuing=True)
        == math.ceil(3.0 * rows / config.batch_size)
    )
    assert second["steps"] > 2


def nan_before_training(
    bank: AdapterBank, tokenizer: Any, tasks: Sequence[SlotTraining], *args: Any, **kw: Any
) -> Any:
    """``train_slots`` with a NaN put into every slot's LoRA A before training starts."""
    with torch.no_grad():
        for layer in bank.layers.values():
            for task in tasks:
                layer.lora_A[task.slot].fill_(float("nan"))
    return train_slots(bank, tokenizer, tasks, *args, **kw)


def test_a_nan_in_training_fails_the_job_and_registers_nothing(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    queue = JobQueue(database)
    feed_users(database, tenant_id=tenant_id, users=["bo"], round=1, n_records=8)
    Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="bo")
    _worker(make_trainer(promote_rule="always"), queue, "good").run_once()
    before = count_versions_and_snapshots(database)
    feed_users(database, tenant_id=tenant_id, users=["bo"], round=2, n_records=6)
    job = Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="bo").job

    ended = _worker(make_trainer(train_slots=nan_before_training), queue, "nan").run_once()

    assert ended is not None and ended.id == job.id
    assert ended.state == "failed" and ended.attempts == 1  # TrainingError: no retry
    assert ended.error is not None and "TrainingError" in ended.error and "non-finite" in ended.error
    assert count_versions_and_snapshots(database) == before == (1, 1)
    adapter_id = _adapter_id(registry, tenant_id, job.payload["users"][0]["user_id"])
    live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
    assert live is not None and live.number == 1
    assert [e.to_version_id for e in registry.alias_history(tenant_id=tenant_id, adapter_id=adapter_id)] == [
        live.id
    ]


class PausedTrainer(ContinualTrainer):
    """After training and writing its blobs, "pauses" past its lease: the clock jumps and another worker takes
    the job over before it registers (taken over earlier, it stops at its next progress report instead)."""

    clock: MovableClock
    takeover: Callable[[], None]

    def _register(self, **kwargs: Any) -> dict[str, Any]:
        self.clock.offset += timedelta(seconds=120)
        self.takeover()
        return super()._register(**kwargs)


def test_a_worker_that_lost_its_lease_writes_blobs_but_no_rows(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    clock = MovableClock()
    queue = JobQueue(database, clock=clock)
    feed_users(database, tenant_id=tenant_id, users=["cy"], round=1, n_records=8)
    job = Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="cy").job
    taken: list[int] = []
    trainer = make_trainer(cls=PausedTrainer)
    assert isinstance(trainer, PausedTrainer)
    trainer.clock = clock
    trainer.takeover = lambda: taken.append(queue.claim(worker_id="new", lease_seconds=30).attempts)  # type: ignore[union-attr]
    stale = JobWorker(
        queue, worker_id="old", handlers={"train": trainer.run_job}, lease_seconds=30, heartbeat_every=25
    )

    stale.run_once()

    assert taken == [2]
    current = get_job(database, job.id)
    assert (current.state, current.lease_owner, current.attempts) == ("running", "new", 2)
    assert count_versions_and_snapshots(database) == (0, 0)
    orphans = [b.sha256 for b in registry._blobs.list()]  # the stale worker's blob, written first
    assert len(orphans) == 1
    assert registry.gc(now=datetime.now(UTC) + timedelta(days=2)) == orphans


def test_the_same_submission_twice_is_one_job(
    database: Database, database_url: str, tenant_id: int, make_settings: Callable[..., Settings]
) -> None:
    feed_users(database, tenant_id=tenant_id, users=["di"], round=1, n_records=4)
    settings = make_settings(database_url=database_url, object_store_url="file:///unused")
    first = train_now(settings, tenant="acme", user="di")
    again = train_now(settings, tenant=tenant_id, user="di")
    assert first.created and not again.created and again.job.id == first.job.id
    assert JobQueue(database).counts_by_state()["queued"] == 1


def test_each_subject_trains_beside_a_share_of_anchor_rows(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    """``anchor_ratio`` 0.3 (the default) adds the base's own answers to general prompts: 3 anchors per 7 of
    the user's rows (ceil), none of them a user's record, and the version's metrics count them."""
    import math

    from lorafleet.training.general_prompts import ANCHOR_FIRST_ID, ANCHOR_PROMPTS
    from lorafleet.training.overrides import set_tenant_training

    set_tenant_training(database, tenant_id=tenant_id, overrides={**TINY_TRAINING, "anchor_ratio": 0.3})
    queue = JobQueue(database)
    seen: list[list[SlotTraining]] = []
    recording = _recording(seen)

    trainer = make_trainer(promote_rule="always", train_slots=recording)
    feed_users(database, tenant_id=tenant_id, users=["ann"], round=1, n_records=10)
    Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="ann")
    assert _worker(trainer, queue, "w1").run_once() is not None
    [[task]] = seen
    assert len(task.anchors) == math.ceil(0.3 / 0.7 * len(task.train)) > 0
    assert {a.prompt for a in task.anchors} <= set(ANCHOR_PROMPTS)
    assert all(a.record_id >= ANCHOR_FIRST_ID and a.completion for a in task.anchors)
    assert not {a.record_id for a in task.anchors} & {e.record_id for e in task.train}
    user_id = registry.list_adapters(tenant_id=tenant_id)[0].owner_user_id
    assert user_id is not None
    [version] = registry.list_versions(
        tenant_id=tenant_id, adapter_id=_adapter_id(registry, tenant_id, user_id)
    )
    assert version.metrics["anchor_examples"] == len(task.anchors)


def test_a_users_contrast_rows_ask_its_own_questions_about_someone_else_and_a_task_gets_none(
    database: Database, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    """``contrast_ratio`` 0.5: beside its anchors, a user trains on half as many contrast rows as it has rows (those
    of its sampled rows with a first-person word), each one of its own prompts moved to a third party with its own
    answer; a shared task's dataset in the same job gets anchors only."""
    from lorafleet.store.sql.tenants import find_user, task_subject_id
    from lorafleet.training.contrast import CONTRAST_KIND, CONTRAST_NAMES, third_person
    from lorafleet.training.synthetic import make_user_records
    from lorafleet.workflows.tasks import ingest_task_feedback

    ann = feed_users(database, tenant_id=tenant_id, users=["ann"], round=1, n_records=12)["ann"]
    task_records = make_user_records("pig-latin", round=1, n_records=12, seed=3)
    task = ingest_task_feedback(
        database, tenant_id=tenant_id, task_name="pig-latin", records=task_records
    ).ids
    users = []
    with database.session() as s:
        for kind, external_id, watermark in (("user", "ann", max(ann)), ("task", "pig-latin", max(task))):
            subject_id = external_id if kind == "user" else task_subject_id(external_id)
            row = find_user(s, tenant_id=tenant_id, external_id=subject_id, kind=kind)
            assert row is not None
            users.append({"user_id": row.id, "external_id": subject_id, "kind": kind, "watermark": watermark})
    training = {**TINY_TRAINING, "anchor_ratio": 0.3, "contrast_ratio": 0.5}
    queue = JobQueue(database)
    queue.submit(
        tenant_id=tenant_id,
        kind="train",
        payload={"training": training, "users": users},
        user_ids=[(u["user_id"], u["watermark"]) for u in users],
        dedupe_key=None,
    )
    seen: list[list[SlotTraining]] = []
    recording = _recording(seen)

    assert (
        _worker(make_trainer(promote_rule="always", train_slots=recording), queue, "w1").run_once()
        is not None
    )
    [tasks] = seen
    by_key = {t.key: t for t in tasks}
    person, shared = by_key["ann"], by_key["task:pig-latin"]
    contrast = [a for a in person.anchors if a.kind == CONTRAST_KIND]
    general = [a for a in person.anchors if a.kind != CONTRAST_KIND]
    assert len(general) == math.ceil(0.3 / 0.7 * len(person.train))
    assert 0 < len(contrast) <= math.ceil(0.5 * len(person.train))
    answers = {(e.prompt, e.completion) for e in person.train}
    for row in contrast:
        assert any(
            (third_person(p, name), c) == (row.prompt, row.completion)
            for p, c in answers
            for name in CONTRAST_NAMES
        ), row
    assert shared.anchors and not [a for a in shared.anchors if a.kind == CONTRAST_KIND]
