"""JobQueue on SQLite and PostgreSQL: dedupe, claims, leases and takeover, fencing, retries, cancel requests and
progress written through the fence."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from lorafleet.errors import (
    InvalidStateError,
    JobCancelledError,
    JobFinishedError,
    LeaseLostError,
    NotFoundError,
    ValidationError,
)
from lorafleet.jobs import JobQueue
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlDatasetSnapshot, SqlJob, SqlJobUser

LEASE = 30.0
Feed = Callable[..., list[int]]


def _submit(queue: JobQueue, *, key: str | None = "k", kind: str = "train", **kwargs: object) -> int:
    args: dict[str, object] = {"tenant_id": None, "kind": kind, "payload": {"n": 1}, "dedupe_key": key}
    args.update(kwargs)
    return queue.submit(**args).job.id  # type: ignore[arg-type]


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_same_dedupe_key_twice_is_one_job_until_it_finishes(queue: JobQueue, database: Database) -> None:
    first = queue.submit(tenant_id=None, kind="train", payload={"a": 1}, dedupe_key="train:x")
    again = queue.submit(tenant_id=None, kind="train", payload={"a": 2}, dedupe_key="train:x")
    assert first.created and not again.created
    assert again.job.id == first.job.id and again.job.payload == {"a": 1}

    job = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert job is not None and job.id == first.job.id
    queue.complete(job_id=job.id, worker_id="w", result={"ok": True})

    later = queue.submit(tenant_id=None, kind="train", payload={"a": 3}, dedupe_key="train:x")
    assert later.created and later.job.id != first.job.id
    assert _count(database, SqlJob) == 2


def test_submit_writes_the_users_and_their_watermarks(
    queue: JobQueue, tenant_id: int, feed: Feed, uid: Callable[[int, str], int]
) -> None:
    ids = feed(tenant_id, "alice", 2) + feed(tenant_id, "bob", 1)
    alice, bob = uid(tenant_id, "alice"), uid(tenant_id, "bob")
    job = queue.submit(
        tenant_id=tenant_id,
        kind="train",
        payload={},
        user_ids=[(alice, ids[1]), (bob, ids[2])],
        dedupe_key=None,
    ).job
    assert job.state == "queued" and job.attempts == 0 and job.max_attempts == 3
    assert queue.job_users(job_id=job.id) == {alice: ids[1], bob: ids[2]}
    assert queue.active_user_ids() == {alice, bob}
    assert queue.active_user_ids(tenant_id=tenant_id + 1) == set()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": ""}, "kind"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"payload": {"x": float("nan")}}, "payload"),
        ({"payload": {"x": object()}}, "payload"),
        ({"user_ids": [(1, 5), (1, 6)]}, "user_ids"),
        ({"key": "x" * 257}, "dedupe_key"),
    ],
)
def test_submit_refuses_bad_input(queue: JobQueue, database: Database, kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _submit(queue, **kwargs)
    assert _count(database, SqlJob) == 0


def test_submit_refuses_unknown_users(queue: JobQueue, database: Database) -> None:
    with pytest.raises(NotFoundError, match="user 999"):
        _submit(queue, user_ids=[(999, 1)])
    assert _count(database, SqlJob) == 0


def test_concurrent_submits_of_one_key_make_one_job(pg_database: Database) -> None:
    barrier = threading.Barrier(8)

    def submit(i: int) -> tuple[int, bool]:
        queue = JobQueue(pg_database)
        barrier.wait()
        result = queue.submit(tenant_id=None, kind="train", payload={"i": i}, dedupe_key="train:same")
        return result.job.id, result.created

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(submit, range(8)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert _count(pg_database, SqlJob) == 1


def test_claim_takes_the_oldest_due_job_of_the_asked_kinds(queue: JobQueue, clock: Callable) -> None:
    train_1 = _submit(queue, key="a")
    qa = _submit(queue, key="b", kind="qa")
    train_2 = _submit(queue, key="c")

    assert queue.claim(worker_id="w1", kinds=["qa"], lease_seconds=LEASE).id == qa  # type: ignore[union-attr]
    first = queue.claim(worker_id="w2", lease_seconds=LEASE)
    assert first is not None and first.id == train_1
    assert first.state == "running" and first.attempts == 1 and first.lease_owner == "w2"
    assert first.lease_expires_at == clock() + timedelta(seconds=LEASE) and first.heartbeat_at == clock()
    assert queue.claim(worker_id="w3", lease_seconds=LEASE).id == train_2  # type: ignore[union-attr]
    assert queue.claim(worker_id="w4", lease_seconds=LEASE) is None
    with pytest.raises(ValidationError, match="kinds"):
        queue.claim(worker_id="w4", kinds=[], lease_seconds=LEASE)


def test_expired_lease_is_taken_over_and_the_old_owner_is_fenced_out(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    old = queue.claim(worker_id="old", lease_seconds=LEASE)
    assert old is not None
    clock.advance(seconds=LEASE - 1)
    assert queue.claim(worker_id="new", lease_seconds=LEASE) is None  # lease still held

    clock.advance(seconds=2)
    new = queue.claim(worker_id="new", lease_seconds=LEASE)
    assert new is not None and new.id == job_id and new.attempts == 2 and new.lease_owner == "new"
    assert "taken over" in (new.error or "")
    with pytest.raises(LeaseLostError):
        queue.heartbeat(job_id=job_id, worker_id="old", lease_seconds=LEASE)
    with pytest.raises(LeaseLostError):
        queue.complete(job_id=job_id, worker_id="old", result={"by": "old"})
    with pytest.raises(LeaseLostError):
        queue.fail(job_id=job_id, worker_id="old", error="late")

    done = queue.complete(job_id=job_id, worker_id="new", result={"by": "new"})
    assert done.state == "succeeded" and done.result == {"by": "new"} and done.finished_at == clock()
    with pytest.raises(LeaseLostError):
        queue.complete(job_id=job_id, worker_id="new", result={"by": "again"})  # exactly one success
    assert queue.get(tenant_id=None, job_id=job_id).result == {"by": "new"}


def test_a_dead_workers_leases_are_released_at_once_and_it_stays_fenced_out(queue: JobQueue, clock) -> None:
    """A pool that saw its actor die ends that actor's leases: the job is claimable now, not when its lease
    runs out (finding 5 of issue 18), and the old owner still cannot finish it."""
    job_id = _submit(queue)
    other = _submit(queue, key="other")
    assert queue.claim(worker_id="dead", lease_seconds=LEASE) is not None
    assert queue.claim(worker_id="alive", lease_seconds=LEASE) is not None
    clock.advance(seconds=1)
    assert queue.claim(worker_id="new", lease_seconds=LEASE) is None  # both leases still held

    assert queue.release_leases_of("dead", reason="trainer actor dead died: killed") == [job_id]
    assert queue.release_leases_of("dead", reason="again") == []  # nothing left to release
    taken = queue.claim(worker_id="new", lease_seconds=LEASE)
    assert taken is not None and (taken.id, taken.attempts, taken.lease_owner) == (job_id, 2, "new")
    with pytest.raises(LeaseLostError):
        queue.complete(job_id=job_id, worker_id="dead", result={"by": "dead"})
    assert queue.get(tenant_id=None, job_id=other).lease_owner == "alive"  # other workers' leases stand


def test_attempt_number_fences_out_an_earlier_attempt_of_the_same_worker(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    first = queue.claim(worker_id="w", lease_seconds=LEASE)
    clock.advance(seconds=LEASE + 1)
    second = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert first is not None and second is not None and second.attempts == 2
    with pytest.raises(LeaseLostError, match="superseded"):
        queue.complete(job_id=job_id, worker_id="w", result={}, attempt=first.attempts)
    assert (
        queue.complete(job_id=job_id, worker_id="w", result={}, attempt=second.attempts).state == "succeeded"
    )


def test_heartbeat_keeps_the_lease(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="w", lease_seconds=LEASE)
    for _ in range(3):
        clock.advance(seconds=LEASE * 0.8)
        beat = queue.heartbeat(job_id=job_id, worker_id="w", lease_seconds=LEASE)
        assert beat.heartbeat_at == clock() and beat.lease_expires_at == clock() + timedelta(seconds=LEASE)
        assert queue.claim(worker_id="thief", lease_seconds=LEASE) is None
    clock.advance(seconds=LEASE)
    with pytest.raises(LeaseLostError, match="expired"):
        queue.heartbeat(job_id=job_id, worker_id="w", lease_seconds=LEASE)


def test_expired_job_out_of_attempts_fails_instead_of_being_claimed(queue: JobQueue, clock) -> None:
    stuck = _submit(queue, key="stuck", max_attempts=1)
    waiting = _submit(queue, key="waiting")
    queue.claim(worker_id="dead", kinds=["train"], lease_seconds=LEASE)
    clock.advance(seconds=LEASE + 1)

    claimed = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert claimed is not None and claimed.id == waiting
    failed = queue.get(tenant_id=None, job_id=stuck)
    assert failed.state == "failed" and failed.error == "lease expired after 1 attempts"
    assert failed.finished_at == clock()


def test_retries_back_off_exponentially_up_to_max_attempts(queue: JobQueue, clock) -> None:
    job_id = _submit(queue, max_attempts=4)  # backoff: base 10 s, capped at 25 s
    for attempt, delay in ((1, 10), (2, 20), (3, 25)):
        job = queue.claim(worker_id="w", lease_seconds=LEASE)
        assert job is not None and job.attempts == attempt
        retry = queue.fail(job_id=job_id, worker_id="w", error=f"boom {attempt}")
        assert retry.state == "queued" and retry.error == f"boom {attempt}"
        assert retry.run_after == clock() + timedelta(seconds=delay)
        clock.advance(seconds=delay - 1)
        assert queue.claim(worker_id="w", lease_seconds=LEASE) is None
        clock.advance(seconds=1)
    last = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert last is not None and last.attempts == 4
    final = queue.fail(job_id=job_id, worker_id="w", error="boom 4")
    assert final.state == "failed" and final.error == "boom 4" and final.finished_at == clock()
    assert queue.claim(worker_id="w", lease_seconds=LEASE) is None


def test_a_non_retryable_failure_fails_at_once(queue: JobQueue) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="w", lease_seconds=LEASE)
    failed = queue.fail(job_id=job_id, worker_id="w", error="bad input", retryable=False)
    assert failed.state == "failed" and failed.attempts == 1


@pytest.mark.parametrize("kind", ["train", "qa", "import"])
def test_cancel_ends_a_queued_job_at_once_and_frees_its_dedupe_key(
    queue: JobQueue, make_tenant: Callable[[str], int], clock, kind: str
) -> None:
    mine, other = make_tenant("mine"), make_tenant("other")
    queued = _submit(queue, key="q", tenant_id=mine, kind=kind)
    with pytest.raises(NotFoundError):
        queue.cancel(tenant_id=other, job_id=queued, actor="api:other")
    cancelled = queue.cancel(tenant_id=mine, job_id=queued, actor="api:mine")
    assert (cancelled.state, cancelled.cancelled_by) == ("cancelled", "api:mine")
    assert cancelled.finished_at == cancelled.cancel_requested_at == clock()
    again = queue.cancel(tenant_id=mine, job_id=queued, actor="someone else")  # idempotent
    assert (again.state, again.cancelled_by) == ("cancelled", "api:mine")
    assert queue.claim(worker_id="w", lease_seconds=LEASE) is None
    assert queue.submit(tenant_id=mine, kind=kind, payload={}, dedupe_key="q").created


def test_a_running_job_gets_a_cancel_request_its_worker_acts_on(
    queue: JobQueue, make_tenant: Callable[[str], int], database: Database
) -> None:
    mine = make_tenant("mine")
    job_id = _submit(queue, key="r", tenant_id=mine)
    claimed = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert claimed is not None
    requested = queue.cancel(tenant_id=mine, job_id=job_id, actor="cli")
    assert requested.state == "running" and requested.cancel_requested_at is not None
    assert queue.cancel(tenant_id=mine, job_id=job_id, actor="other").cancelled_by == "cli"

    beat = queue.heartbeat(job_id=job_id, worker_id="w", lease_seconds=LEASE, attempt=1)
    assert beat.cancel_requested_at is not None  # the lease is kept while the worker stops
    with pytest.raises(JobCancelledError):
        queue.record_progress(job_id=job_id, worker_id="w", attempt=1, progress={"step": 1})
    with pytest.raises(JobCancelledError), queue.fenced(job_id=job_id, worker_id="w", attempt=1):
        _write(database, _snapshot("never"))
    with pytest.raises(JobCancelledError):
        queue.complete(job_id=job_id, worker_id="w", result={}, attempt=1)
    assert _count(database, SqlDatasetSnapshot) == 0
    with pytest.raises(LeaseLostError):  # only the lease holder ends it
        queue.acknowledge_cancel(job_id=job_id, worker_id="stranger")

    ended = queue.acknowledge_cancel(job_id=job_id, worker_id="w", attempt=1)
    assert (ended.state, ended.cancelled_by, ended.progress) == ("cancelled", "cli", None)
    assert queue.claim(worker_id="w", lease_seconds=LEASE) is None


def test_a_failure_after_a_cancel_request_is_not_retried(queue: JobQueue) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="w", lease_seconds=LEASE)
    queue.cancel(tenant_id=None, job_id=job_id, actor="cli")
    ended = queue.fail(job_id=job_id, worker_id="w", error="OSError: stopped half-way")
    assert ended.state == "cancelled" and ended.attempts == 1
    assert queue.claim(worker_id="w", lease_seconds=LEASE) is None


def test_a_cancelled_job_whose_worker_died_is_ended_not_taken_over(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="dead", lease_seconds=LEASE)
    assert queue.cancel(tenant_id=None, job_id=job_id, actor="cli").state == "running"
    clock.advance(seconds=LEASE + 1)
    assert queue.claim(worker_id="w", lease_seconds=LEASE) is None
    ended = queue.get(tenant_id=None, job_id=job_id)
    assert (ended.state, ended.cancelled_by, ended.attempts) == ("cancelled", "cli", 1)

    expired = _submit(queue, key="e")
    queue.claim(worker_id="dead", lease_seconds=LEASE)
    clock.advance(seconds=LEASE + 1)  # nobody claimed it since: a cancel needs no worker to stop
    assert queue.cancel(tenant_id=None, job_id=expired, actor="cli").state == "cancelled"


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_cancelling_a_finished_job_is_refused_naming_its_state(queue: JobQueue, outcome: str) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="w", lease_seconds=LEASE)
    if outcome == "succeeded":
        queue.complete(job_id=job_id, worker_id="w", result={})
    else:
        queue.fail(job_id=job_id, worker_id="w", error="bad", retryable=False)
    with pytest.raises(JobFinishedError, match=outcome) as refused:
        queue.cancel(tenant_id=None, job_id=job_id, actor="cli")
    assert refused.value.state == outcome
    assert isinstance(refused.value, InvalidStateError)
    job = queue.get(tenant_id=None, job_id=job_id)
    assert (job.state, job.cancel_requested_at, job.cancelled_by) == (outcome, None, None)


def test_cancel_refuses_a_bad_actor_and_acknowledge_needs_a_request(queue: JobQueue) -> None:
    job_id = _submit(queue)
    with pytest.raises(ValidationError, match="actor"):
        queue.cancel(tenant_id=None, job_id=job_id, actor="")
    assert queue.get(tenant_id=None, job_id=job_id).state == "queued"
    queue.claim(worker_id="w", lease_seconds=LEASE)
    with pytest.raises(InvalidStateError):
        queue.acknowledge_cancel(job_id=job_id, worker_id="w")


def test_progress_is_written_through_the_lease_fence(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    stale = queue.claim(worker_id="stale", lease_seconds=LEASE)
    assert stale is not None
    stored = queue.record_progress(
        job_id=job_id, worker_id="stale", attempt=1, progress={"phase": "training", "step": 2}
    )
    assert stored.progress == {"phase": "training", "step": 2, "updated_at": clock().isoformat()}
    with pytest.raises(ValidationError, match="progress"):
        queue.record_progress(job_id=job_id, worker_id="stale", attempt=1, progress={"loss": float("nan")})

    clock.advance(seconds=LEASE + 1)
    assert queue.claim(worker_id="fresh", lease_seconds=LEASE) is not None
    with pytest.raises(LeaseLostError):
        queue.record_progress(job_id=job_id, worker_id="stale", attempt=1, progress={"step": 3})
    assert queue.get(tenant_id=None, job_id=job_id).progress == stored.progress


def test_fenced_transaction_commits_output_and_success_together(
    queue: JobQueue, database: Database, clock
) -> None:
    job_id = _submit(queue)
    stale = queue.claim(worker_id="stale", lease_seconds=LEASE)
    clock.advance(seconds=LEASE + 1)
    fresh = queue.claim(worker_id="fresh", lease_seconds=LEASE)
    assert stale is not None and fresh is not None

    with pytest.raises(LeaseLostError), queue.fenced(job_id=job_id, worker_id="stale"):
        _write(database, _snapshot("stale"))  # never reached
    with pytest.raises(RuntimeError), queue.fenced(job_id=job_id, worker_id="fresh") as fence:
        _write(database, _snapshot("crashed"))
        fence.succeed({"version": 1})
        raise RuntimeError("crash before commit")
    assert queue.get(tenant_id=None, job_id=job_id).state == "running"
    assert _count(database, SqlDatasetSnapshot) == 0  # half-done work left nothing behind

    with queue.fenced(job_id=job_id, worker_id="fresh", attempt=fresh.attempts) as fence:
        _write(database, _snapshot("fresh"))
        fence.succeed({"version": 1})
    assert queue.get(tenant_id=None, job_id=job_id).state == "succeeded"
    assert _count(database, SqlDatasetSnapshot) == 1


def test_no_takeover_while_a_fenced_transaction_is_open(queue: JobQueue, database: Database, clock) -> None:
    job_id = _submit(queue)
    queue.claim(worker_id="w", lease_seconds=LEASE)
    thief = JobQueue(database, clock=clock)
    claimed: list[object] = []
    with queue.fenced(job_id=job_id, worker_id="w") as fence:
        clock.advance(seconds=LEASE + 1)  # the lease runs out while the winner is writing
        thread = threading.Thread(
            target=lambda: claimed.append(thief.claim(worker_id="t", lease_seconds=LEASE))
        )
        thread.start()
        thread.join(timeout=0.5)  # PostgreSQL: SKIP LOCKED returns at once; SQLite: waits for the write lock
        fence.succeed({"ok": True})
    thread.join()
    assert claimed == [None]
    assert queue.get(tenant_id=None, job_id=job_id).state == "succeeded"


def _snapshot(tag: str) -> SqlDatasetSnapshot:
    return SqlDatasetSnapshot(user_id=None, record_count=0, content_hash=tag.ljust(64, "0"), details={})


def _write(database: Database, row: object) -> None:
    """Write ``row`` as a handler writes its output: in the transaction open on this thread (the fenced one)."""
    with database.session() as s:
        s.add(row)


def test_get_and_list_are_tenant_scoped(
    queue: JobQueue,
    database: Database,
    make_tenant: Callable[[str], int],
    feed: Feed,
    uid: Callable[[int, str], int],
) -> None:
    a, b = make_tenant("a"), make_tenant("b")
    [rec] = feed(a, "alice", 1)
    feed(b, "alice", 1)
    alice_a, alice_b = uid(a, "alice"), uid(b, "alice")
    j1 = _submit(queue, key="1", tenant_id=a, user_ids=[(alice_a, rec)])
    j2 = _submit(queue, key="2", tenant_id=a)
    j3 = _submit(queue, key="3", tenant_id=b, user_ids=[(alice_b, rec)])
    queue.claim(worker_id="w", lease_seconds=LEASE)

    assert queue.get(tenant_id=a, job_id=j1).id == j1
    with pytest.raises(NotFoundError):
        queue.get(tenant_id=b, job_id=j1)
    assert [j.id for j in queue.list_jobs(tenant_id=a)] == [j2, j1]
    assert [j.id for j in queue.list_jobs(tenant_id=a, user_external_id="alice")] == [j1]
    assert [j.id for j in queue.list_jobs(tenant_id=b, user_external_id="alice")] == [j3]
    assert [j.id for j in queue.list_jobs(tenant_id=a, state="running")] == [j1]
    assert [j.id for j in queue.list_jobs(tenant_id=None, limit=2)] == [j3, j2]
    with pytest.raises(ValidationError):
        queue.list_jobs(tenant_id=a, state="done")
    assert queue.counts_by_state() == {"queued": 2, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    with database.session() as s:  # job_users rows go with their job
        s.delete(s.get(SqlJob, j1))
    assert _count(database, SqlJobUser) == 1
