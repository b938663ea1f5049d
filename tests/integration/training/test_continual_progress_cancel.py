"""Progress and cancel of real train jobs, run in this process by a ``JobWorker`` and a ``ContinualTrainer`` on
the nf4 tiny backbone, over SQLite and PostgreSQL: a job's row shows its phases and each subject's loss (a user
and a shared task, labelled as the jobs listing names them), and a job cancelled mid-training stops at its next
step, registers nothing and ends ``cancelled`` with who cancelled it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from continual_helpers import TINY_TRAINING, count_versions_and_snapshots, feed_users, get_job

from lorafleet.adapters import AdapterBank
from lorafleet.jobs import JobQueue, JobWorker
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import find_user, task_subject_id
from lorafleet.training.config import TrainingConfig
from lorafleet.training.resident import Resident
from lorafleet.training.synthetic import make_user_records
from lorafleet.training.trainer import SlotTraining, train_slots
from lorafleet.workflows.continual import ContinualTrainer
from lorafleet.workflows.tasks import ingest_task_feedback

Step = tuple[int, int]


class Steps:
    """The trainer's per-step callback: remembers each step and the job row's phase, and may request a
    cancel (as the API would) once a given step is done."""

    def __init__(self, queue: JobQueue, *, cancel_at: int | None = None) -> None:
        self.queue = queue
        self.cancel_at = cancel_at
        self.job_id = 0
        self.seen: list[Step] = []
        self.phases: list[str | None] = []

    def __call__(self, step: int, total: int, values: dict[str, Any]) -> None:
        self.seen.append((step, total))
        progress = self.queue.get(tenant_id=None, job_id=self.job_id).progress or {}
        self.phases.append(progress.get("phase"))
        if step == self.cancel_at:
            self.queue.cancel(tenant_id=None, job_id=self.job_id, actor="api:acme")


def _submit(database: Database, *, tenant_id: int, subjects: dict[tuple[str, str], int]) -> int:
    """A train job for ``{(kind, external id): watermark}`` with the tiny config, queued directly."""
    users = []
    with database.session() as s:
        for (kind, external_id), watermark in subjects.items():
            row = find_user(s, tenant_id=tenant_id, external_id=external_id, kind=kind)
            assert row is not None
            users.append(
                {"user_id": row.id, "external_id": external_id, "kind": kind, "watermark": watermark}
            )
    payload = {"training": TINY_TRAINING, "users": users}
    pairs = [(u["user_id"], u["watermark"]) for u in users]
    return (
        JobQueue(database)
        .submit(tenant_id=tenant_id, kind="train", payload=payload, user_ids=pairs, dedupe_key=None)
        .job.id
    )


@pytest.fixture
def run_one(resident: Resident) -> Iterator[Any]:
    """``run_one(job_id, steps)``: a worker (progress written every step) runs the job on the shared bank."""

    def run(job_id: int, steps: Steps) -> None:
        steps.job_id = job_id
        trainer = ContinualTrainer(
            resident, config=TrainingConfig(**TINY_TRAINING), promote_rule="always", progress=steps
        )
        handlers = {"train": trainer.run_job}
        worker = JobWorker(
            steps.queue, worker_id="w1", handlers=handlers, lease_seconds=30, progress_interval=0
        )
        assert worker.run_once() is not None

    yield run
    assert resident.bank.occupied() == {}, "a job left slots loaded in the bank"


def test_a_job_row_shows_phases_and_each_subjects_loss(
    database: Database, tenant_id: int, run_one: Any
) -> None:
    ann = feed_users(database, tenant_id=tenant_id, users=["ann"], round=1, n_records=10)["ann"]
    task_records = make_user_records("pig-latin", round=1, n_records=10, seed=3)
    task = ingest_task_feedback(
        database, tenant_id=tenant_id, task_name="pig-latin", records=task_records
    ).ids
    subjects = {("user", "ann"): max(ann), ("task", task_subject_id("pig-latin")): max(task)}
    job_id = _submit(database, tenant_id=tenant_id, subjects=subjects)
    steps = Steps(JobQueue(database))
    run_one(job_id, steps)

    done = get_job(database, job_id)
    assert done.state == "succeeded", done.error
    total = TINY_TRAINING["max_steps"]
    assert steps.seen == [(n, total) for n in range(1, total + 1)]
    assert steps.phases[0] == "training" and steps.phases[1:] == ["training"] * (total - 1)
    progress = done.progress
    assert progress is not None
    assert (progress["phase"], progress["step"], progress["total_steps"]) == ("registering", total, total)
    assert (progress["fraction"], progress["eta_seconds"]) == (1.0, 0.0)
    assert set(progress["losses"]) == {"ann", "task:pig-latin"}
    assert all(loss > 0 for loss in progress["losses"].values())


def test_a_job_cancelled_mid_training_registers_nothing(
    database: Database, tenant_id: int, run_one: Any
) -> None:
    fed = feed_users(database, tenant_id=tenant_id, users=["ann", "ben"], round=1, n_records=10)
    subjects = {("user", user): max(ids) for user, ids in fed.items()}
    job_id = _submit(database, tenant_id=tenant_id, subjects=subjects)
    queue = JobQueue(database)
    steps = Steps(queue, cancel_at=3)
    run_one(job_id, steps)

    done = get_job(database, job_id)
    assert (done.state, done.cancelled_by, done.attempts) == ("cancelled", "api:acme", 1)
    assert done.result is None and done.cancel_requested_at is not None
    assert steps.seen == [(1, 8), (2, 8), (3, 8)]  # stopped at the step after the request, of 8
    assert done.progress is not None and done.progress["step"] == 2  # the report that found the request
    assert count_versions_and_snapshots(database) == (0, 0)
    assert queue.claim(worker_id="w2", lease_seconds=30) is None  # never retried


def test_a_worker_that_lost_its_lease_stops_at_its_first_report(
    database: Database, tenant_id: int, resident: Resident
) -> None:
    skew = [timedelta()]
    queue = JobQueue(database, clock=lambda: datetime.now(UTC) + skew[0])
    fed = feed_users(database, tenant_id=tenant_id, users=["cy"], round=1, n_records=8)
    job_id = _submit(database, tenant_id=tenant_id, subjects={("user", "cy"): max(fed["cy"])})
    config = TrainingConfig(**TINY_TRAINING)

    def taken_over(
        bank: AdapterBank, tokenizer: Any, tasks: Sequence[SlotTraining], *args: Any, **kw: Any
    ) -> Any:
        """Before training, "pauses" past its lease (the queue's clock jumps) and another worker takes the job."""
        skew[0] += timedelta(seconds=120)
        assert queue.claim(worker_id="new", lease_seconds=30) is not None
        return train_slots(bank, tokenizer, tasks, *args, **kw)

    trainer = ContinualTrainer(resident, config=config, promote_rule="always", train_slots=taken_over)
    steps = Steps(queue)
    trainer.progress = steps
    steps.job_id = job_id
    stale = JobWorker(queue, worker_id="old", handlers={"train": trainer.run_job}, lease_seconds=30)

    stale.run_once()

    assert steps.seen == [(1, 8)]  # the first report found the lease gone: training stopped there
    job = get_job(database, job_id)
    assert (job.state, job.lease_owner, job.attempts) == ("running", "new", 2)
    assert job.progress is not None and job.progress["phase"] == "training" and "step" not in job.progress
    assert count_versions_and_snapshots(database) == (0, 0)
    assert list(resident.registry._blobs.list()) == []  # it stopped before writing any blob
    assert resident.bank.occupied() == {}
