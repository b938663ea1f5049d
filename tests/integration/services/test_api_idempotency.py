"""The idempotency-key store behind the API (``lorafleet.store.sql.idempotency``) on SQLite and PostgreSQL: run
once and replay, reuse with another request, a failed operation keeps nothing, the response commits with the
operation's writes (finding 4 of issue 18), a duplicate while the first runs (409 on PostgreSQL, a wait and a
replay on SQLite), a process killed mid-operation blocks no retry, an earlier version's unfinished reservation,
pruning, and many concurrent requests with one key of which exactly one runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.feedback import IngestResult
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.idempotency import (
    IdempotencyKeyInFlightError,
    IdempotencyKeyReusedError,
    IdempotencyRepository,
    Outcome,
    StoredResponse,
    request_hash,
)
from lorafleet.store.sql.models import SqlFeedback, SqlIdempotencyKey, utcnow
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.feedback import ingest_feedback

H1 = request_hash(method="post", path="/v1/users/a/feedback", body={"records": [1]})
H2 = request_hash(method="POST", path="/v1/users/a/feedback", body={"records": [2]})


def _tenant(db: Database, name: str = "acme") -> int:
    return TenantRepository(db).create_tenant(name=name)[0].id


def _ingest(db: Database, tenant_id: int, prompt: str) -> IngestResult:
    record = {"kind": "sft", "prompt": prompt, "completion": "An answer."}
    return ingest_feedback(db, tenant_id=tenant_id, user_external_id="ann", records=[record])


def _ingest_once(
    store: IdempotencyRepository, db: Database, tenant_id: int, key: str, prompt: str
) -> Outcome:
    """``run_once`` under ``key`` (``H1``, status 200) of an operation that ingests one record ``prompt``."""
    return store.run_once(
        tenant_id=tenant_id,
        key=key,
        request_hash=H1,
        status=200,
        operation=lambda: {"created": _ingest(db, tenant_id, prompt).created},
    )


def _count(db: Database, model: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_run_once_then_replay_and_refusals(database: Database) -> None:
    tenant_id, other_id = _tenant(database), _tenant(database, "other")
    store = IdempotencyRepository(database)
    runs: list[str] = []

    def op(tag: str) -> dict[str, Any]:
        runs.append(tag)
        return {"ids": [len(runs)]}

    first = store.run_once(
        tenant_id=tenant_id, key="k", request_hash=H1, status=201, operation=lambda: op("a")
    )
    assert first.response == StoredResponse(201, {"ids": [1]}) and not first.replayed
    again = store.run_once(
        tenant_id=tenant_id, key="k", request_hash=H1, status=201, operation=lambda: op("b")
    )
    assert again.response == StoredResponse(201, {"ids": [1]}) and again.replayed
    theirs = store.run_once(
        tenant_id=other_id, key="k", request_hash=H2, status=200, operation=lambda: op("c")
    )
    assert not theirs.replayed  # keys are per tenant
    with pytest.raises(IdempotencyKeyReusedError):
        store.run_once(tenant_id=tenant_id, key="k", request_hash=H2, status=201, operation=lambda: op("d"))
    assert runs == ["a", "c"]
    for bad in ("", "x" * 256, "naïve", "tab\there"):
        with pytest.raises(ValidationError):
            store.run_once(tenant_id=tenant_id, key=bad, request_hash=H1, status=200, operation=lambda: {})
    assert runs == ["a", "c"]


def test_a_failed_operation_keeps_nothing_and_its_retry_runs(database: Database) -> None:
    """An operation that wrote and then failed: its writes and the key roll back together; the retry runs."""
    tenant_id = _tenant(database)
    store = IdempotencyRepository(database)

    def write_then_fail() -> dict[str, Any]:
        _ingest(database, tenant_id, "first")
        raise NotFoundError("something after the write was missing")

    with pytest.raises(NotFoundError):
        store.run_once(tenant_id=tenant_id, key="a", request_hash=H1, status=200, operation=write_then_fail)
    assert _count(database, SqlFeedback) == 0 and _count(database, SqlIdempotencyKey) == 0
    done = _ingest_once(store, database, tenant_id, "a", "first")
    assert done.response.body == {"created": 1} and not done.replayed
    assert _count(database, SqlFeedback) == 1 and _count(database, SqlIdempotencyKey) == 1


def test_the_write_commits_only_with_its_response(database: Database) -> None:
    """While the operation runs, its committed-looking write is invisible to everyone else: it commits in the
    transaction that stores the response (before, the write committed first and the response after)."""
    tenant_id = _tenant(database)
    store = IdempotencyRepository(database)
    observer = Database(database.url)  # another connection, as another request would have
    seen: list[int] = []

    def ingest_and_look() -> dict[str, Any]:
        created = _ingest(database, tenant_id, "hello").created  # its own db.session() joined the transaction
        if database.dialect == "postgresql":  # SQLite: a reader would wait on nothing, but sees the same
            seen.append(_count(observer, SqlFeedback))
        return {"created": created}

    try:
        done = store.run_once(
            tenant_id=tenant_id, key="w", request_hash=H1, status=200, operation=ingest_and_look
        )
        assert done.response.body == {"created": 1}
        assert seen == ([0] if database.dialect == "postgresql" else [])
        assert _count(observer, SqlFeedback) == 1
        with observer.session() as s:
            row = s.scalars(select(SqlIdempotencyKey)).one()
            assert (row.response_status, row.response_body) == (200, {"created": 1})
    finally:
        observer.dispose()


def test_a_duplicate_while_the_first_runs(database: Database) -> None:
    """PostgreSQL: 409 at once, then a replay once the first finished. SQLite (one writer at a time): the
    duplicate waits for the first and replays its response. Either way the operation ran once."""
    tenant_id = _tenant(database)
    store = IdempotencyRepository(database)
    entered, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow() -> dict[str, Any]:
        runs.append("first")
        entered.set()
        assert release.wait(30)
        return {"who": "first"}

    first = threading.Thread(
        target=store.run_once,
        kwargs={"tenant_id": tenant_id, "key": "d", "request_hash": H1, "status": 200, "operation": slow},
    )
    first.start()
    assert entered.wait(30)
    try:
        if database.dialect == "postgresql":
            with pytest.raises(IdempotencyKeyInFlightError):
                store.run_once(tenant_id=tenant_id, key="d", request_hash=H1, status=200, operation=dict)
            release.set()
            first.join(30)
            outcome = store.run_once(
                tenant_id=tenant_id, key="d", request_hash=H1, status=200, operation=dict
            )
        else:
            threading.Timer(0.5, release.set).start()
            outcome = store.run_once(
                tenant_id=tenant_id, key="d", request_hash=H1, status=200, operation=dict
            )
        assert outcome.replayed and outcome.response.body == {"who": "first"}
        assert runs == ["first"]
    finally:
        release.set()
        first.join(30)


_KILLED_MID_OPERATION = textwrap.dedent(
    """
    import sys, time
    from lorafleet.store.sql.database import Database
    from lorafleet.store.sql.idempotency import IdempotencyRepository
    from lorafleet.workflows.feedback import ingest_feedback

    url, tenant_id, request_hash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    db = Database(url)

    def ingest_then_hang():
        record = {"kind": "sft", "prompt": "from the killed one", "completion": "An answer."}
        ingest_feedback(db, tenant_id=tenant_id, user_external_id="ann", records=[record])
        print("WROTE", flush=True)
        time.sleep(600)

    IdempotencyRepository(db).run_once(
        tenant_id=tenant_id, key="crash", request_hash=request_hash, status=200, operation=ingest_then_hang
    )
    """
)


def test_a_process_killed_mid_operation_blocks_no_retry(database: Database, tmp_path: Path) -> None:
    """``kill -9`` of a process inside ``run_once``, after its write: nothing of it is kept and the retry runs at
    once (before, its reservation answered 409 for five minutes)."""
    tenant_id = _tenant(database)
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_MID_OPERATION)
    proc = subprocess.Popen(
        [sys.executable, str(script), database.url, str(tenant_id), H1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "WROTE", line + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(30)
    store = IdempotencyRepository(database, stale_after=timedelta(minutes=5))
    deadline = (
        time.monotonic() + 30
    )  # PostgreSQL ends the dead connection's transaction as soon as it sees EOF
    while True:
        try:
            outcome = _ingest_once(store, database, tenant_id, "crash", "from the retry")
            break
        except IdempotencyKeyInFlightError:
            assert time.monotonic() < deadline, "the killed request's key is still held"
            time.sleep(0.1)
    assert not outcome.replayed and outcome.response.body == {"created": 1}
    with database.session() as s:
        prompts = [p["prompt"] for p in s.scalars(select(SqlFeedback.payload))]
    assert prompts == ["from the retry"]


def test_an_earlier_versions_unfinished_reservation(database: Database) -> None:
    """A row without a response (reserved by a version before this one) is in flight until ``stale_after``,
    then taken over; pruning drops old keys."""
    tenant_id = _tenant(database)
    store = IdempotencyRepository(database, stale_after=timedelta(minutes=5))
    with database.session() as s:
        s.add(SqlIdempotencyKey(tenant_id=tenant_id, key="old", request_hash=H1, created_at=utcnow()))
    with pytest.raises(IdempotencyKeyInFlightError):
        store.run_once(tenant_id=tenant_id, key="old", request_hash=H1, status=200, operation=dict)
    with pytest.raises(IdempotencyKeyReusedError):
        store.run_once(tenant_id=tenant_id, key="old", request_hash=H2, status=200, operation=dict)
    with database.session() as s:  # the request holding "old" died ten minutes ago
        s.execute(update(SqlIdempotencyKey).values(created_at=utcnow() - timedelta(minutes=10)))
    taken = store.run_once(
        tenant_id=tenant_id, key="old", request_hash=H1, status=200, operation=lambda: {"x": 1}
    )
    assert not taken.replayed and taken.response.body == {"x": 1}
    assert store.run_once(
        tenant_id=tenant_id, key="old", request_hash=H1, status=200, operation=dict
    ).replayed
    assert _count(database, SqlIdempotencyKey) == 1
    assert store.prune(older_than=utcnow() + timedelta(seconds=1)) == 1


def test_concurrent_requests_with_one_key_run_once(pg_database: Database) -> None:
    tenant_id = _tenant(pg_database)
    store = IdempotencyRepository(pg_database)
    outcomes: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(8)

    def op() -> dict[str, Any]:
        time.sleep(0.5)  # long enough for every other attempt to arrive while it runs
        return {"ok": True}

    def attempt() -> None:
        start.wait()
        try:
            found = store.run_once(tenant_id=tenant_id, key="same", request_hash=H1, status=200, operation=op)
            outcome = "replayed" if found.replayed else "ran"
        except IdempotencyKeyInFlightError:
            outcome = "in flight"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["in flight"] * 7 + ["ran"]
