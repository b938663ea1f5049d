"""Feedback load for the process-fault tests: client threads each submitting batches of new records under
Idempotency-Keys until told to stop (or until the service goes away), then the checks after a restart: every
batch retried with its key either replays the answer it had or runs once, and the stored rows are exactly the
records sent (counts and content hashes)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from api_helpers import ADMIN_KEY, Library
from service_process import ServiceProcess
from sqlalchemy import select

from lorafleet.feedback import validate_feedback_batch
from lorafleet.store.sql.models import SqlFeedback, SqlIdempotencyKey, SqlUser

RECORDS_PER_BATCH = 5
USERS = 4
#: how long a retry may keep meeting 409 ``idempotency_key_in_flight`` before it counts as lingering (before
#: finding 4 was fixed, a crashed request's reservation lingered for five minutes)
IN_FLIGHT_GIVE_UP_S = 60.0


@dataclass
class Batch:
    key: str
    user: str
    records: list[dict[str, Any]]
    #: the answer the client got (None: none, the connection broke or was refused)
    status: int | None = None
    body: dict[str, Any] | None = None


@dataclass
class Load:
    """``threads`` client threads submitting batches until ``stop``; every batch they tried, answered or not."""

    url: str
    api_key: str
    threads: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    batches: list[Batch] = field(default_factory=list)
    _running: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._running = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for t in self._running:
            t.start()
        return self

    def join(self) -> list[Batch]:
        self.stop.set()
        for t in self._running:
            t.join(timeout=120)
        return list(self.batches)

    def answered(self) -> int:
        with self.lock:
            return sum(b.status is not None for b in self.batches)

    def _run(self, thread: int) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for seq in range(100_000):
                if self.stop.is_set():
                    return
                batch = new_batch(thread, seq)
                with self.lock:
                    self.batches.append(batch)
                try:
                    answer = http.post(
                        f"/v1/users/{batch.user}/feedback",
                        json={"records": batch.records},
                        headers={**headers, "Idempotency-Key": batch.key},
                    )
                except httpx.HTTPError:
                    return  # the service is gone or going: this batch is in doubt, the retry settles it
                with self.lock:
                    batch.status, batch.body = answer.status_code, answer.json()


def new_batch(thread: int, seq: int) -> Batch:
    marker = uuid.uuid4().hex[:8]
    records = [
        {
            "kind": "sft",
            "prompt": f"t{thread} s{seq} r{i} {marker}: what is {i}+{seq}?",
            "completion": f"{i + seq}",
        }
        for i in range(RECORDS_PER_BATCH)
    ]
    return Batch(key=f"load-{thread}-{seq}-{marker}", user=f"u{thread % USERS}", records=records)


def start_with_tenant(
    start_service: Callable[..., ServiceProcess], prefix: str
) -> tuple[ServiceProcess, int, str]:
    """``start_service()`` started, and a new tenant on it named ``<prefix>-…``: the service, the tenant's id and
    its API key."""
    service = start_service()
    service.start()
    tenant_id, api_key = make_tenant(service.url, prefix)
    return service, tenant_id, api_key


def answered_ok(batches: list[Batch]) -> list[Batch]:
    """The batches that got an answer before the fault; each answer must be a 200."""
    answered = [b for b in batches if b.status is not None]
    assert all(b.status == 200 for b in answered), [(b.status, b.body) for b in answered if b.status != 200]
    return answered


def make_tenant(url: str, prefix: str) -> tuple[int, str]:
    answer = httpx.post(
        f"{url}/v1/tenants",
        json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    return int(answer.json()["id"]), str(answer.json()["api_key"])


@dataclass
class Settled:
    """How the retry of every batch went, by the names the ``FAULT-RECOVERY`` line gives them."""

    replayed: int = 0
    ran_on_retry: int = 0
    in_flight_409s: int = 0


def retry_every_batch(url: str, api_key: str, batches: list[Batch]) -> Settled:
    """Each batch again with its key: one answered before must replay that very answer; one in doubt must be
    stored exactly once now (replayed, or run with every record created). 409 in flight is retried (counted) for
    up to ``IN_FLIGHT_GIVE_UP_S``; anything else but 200 fails."""
    settled = Settled()
    with httpx.Client(base_url=url, timeout=60) as http:
        for batch in batches:
            headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": batch.key}
            deadline = time.monotonic() + IN_FLIGHT_GIVE_UP_S
            while True:
                answer = http.post(
                    f"/v1/users/{batch.user}/feedback", json={"records": batch.records}, headers=headers
                )
                if answer.status_code != 409 or time.monotonic() > deadline:
                    break
                settled.in_flight_409s += 1
                time.sleep(0.5)
            assert answer.status_code == 200, (batch.key, answer.status_code, answer.text)
            body = answer.json()
            replayed = answer.headers.get("idempotent-replayed") == "true"
            if replayed:
                settled.replayed += 1
            else:
                settled.ran_on_retry += 1
            if batch.status == 200:  # answered before: the very same answer, replayed
                assert replayed and body == batch.body, (batch.key, body, batch.body)
            else:  # in doubt: either its commit made it (replayed) or it runs now; once, either way
                assert body["created"] == len(batch.records) and body["duplicates"] == 0, (batch.key, body)
    return settled


def tenant_feedback(library: Library, tenant_id: int, *columns: Any) -> list[tuple[Any, ...]]:
    """``columns`` (of ``SqlFeedback`` and ``SqlUser``) of every feedback row of the tenant's users."""
    with library.db.session() as s:
        query = (
            select(*columns)
            .join(SqlUser, SqlUser.id == SqlFeedback.user_id)
            .where(SqlUser.tenant_id == tenant_id)
        )
        return [tuple(row) for row in s.execute(query)]


def check_stored(library: Library, tenant_id: int, batches: list[Batch]) -> None:
    """The tenant's feedback is exactly the records of ``batches``, each once (by user and content hash, and by
    content), and every key has its response stored."""
    expected = {(b.user, p.content_hash) for b in batches for p in validate_feedback_batch(b.records)}
    rows = tenant_feedback(
        library, tenant_id, SqlUser.external_id, SqlFeedback.content_hash, SqlFeedback.payload
    )
    with library.db.session() as s:
        keys = s.execute(
            select(SqlIdempotencyKey.key, SqlIdempotencyKey.response_status).where(
                SqlIdempotencyKey.tenant_id == tenant_id
            )
        ).all()
    stored = [(user, content_hash) for user, content_hash, _ in rows]
    assert len(stored) == len(expected) == len(batches) * RECORDS_PER_BATCH  # nothing lost, nothing doubled
    assert set(stored) == expected
    sent = {(b.user, r["prompt"], r["completion"]) for b in batches for r in b.records}
    assert {(user, payload["prompt"], payload["completion"]) for user, _, payload in rows} == sent
    assert sorted(k for k, _ in keys) == sorted(b.key for b in batches)
    assert all(status == 200 for _, status in keys)  # no key left without its response
