"""Feedback ingestion on SQLite and PostgreSQL: validation of whole batches, dedupe, all-or-nothing writes,
the "users with new feedback" query and dataset snapshots."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select
from tests.unit.version_rows import add_version_row

from lorafleet.errors import NotFoundError, PayloadTooLargeError, StoreError, ValidationError
from lorafleet.feedback import FeedbackLimits, FeedbackRecordError, IngestResult
from lorafleet.store.sql import feedback as feedback_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import create_snapshot, get_snapshot, snapshot_hash
from lorafleet.store.sql.models import SqlFeedback, SqlUser
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.feedback import ingest_feedback, list_feedback, users_with_new_feedback

SFT = {"kind": "sft", "prompt": "2+2?", "completion": "4"}
PREFERENCE = {"kind": "preference", "prompt": "greet", "chosen": "Hello!", "rejected": "Go away."}
RATING = {"kind": "rating", "prompt": "joke", "response": "knock knock", "score": 0.75}


@pytest.fixture
def tenant_id(database: Database) -> int:
    tenant, _ = TenantRepository(database).create_tenant(name="acme")
    return tenant.id


def _ingest(db: Database, tenant_id: int, records: list[Any], user: str = "alice", **kw: Any) -> IngestResult:
    return ingest_feedback(db, tenant_id=tenant_id, user_external_id=user, records=records, **kw)


def _count(db: Database, model: type[Any]) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _sft(i: int) -> dict[str, str]:
    return {"kind": "sft", "prompt": f"q{i}", "completion": f"a{i}"}


def test_each_kind_is_stored_with_metadata(database: Database, tenant_id: int) -> None:
    records = [SFT, PREFERENCE, RATING | {"metadata": {"session": "s1", "tags": ["a", 1]}}]
    result = _ingest(database, tenant_id, records)
    assert result.created == 3 and result.duplicates == 0 and len(set(result.ids)) == 3

    stored = list_feedback(database, tenant_id=tenant_id, user_external_id="alice", limit=10)
    assert [r.id for r in stored] == result.ids
    assert [r.kind for r in stored] == ["sft", "preference", "rating"]
    assert stored[1].payload == {k: v for k, v in PREFERENCE.items() if k != "kind"} | {"metadata": {}}
    assert stored[2].payload["metadata"] == {"session": "s1", "tags": ["a", 1]}
    assert stored[2].payload["score"] == 0.75 and stored[0].created_at.tzinfo is not None
    canonical = json.dumps(SFT, sort_keys=True, separators=(",", ":")).encode()
    assert stored[0].content_hash == hashlib.sha256(canonical).hexdigest()


def test_integer_scores_0_and_1_are_the_same_as_floats(database: Database, tenant_id: int) -> None:
    first = _ingest(database, tenant_id, [RATING | {"score": 1}])
    again = _ingest(database, tenant_id, [RATING | {"score": 1.0}])
    assert again.ids == first.ids and again.duplicates == 1


BAD_RECORDS = [
    ({"kind": "essay", "prompt": "p"}, "kind", ValidationError),
    ({"prompt": "p", "completion": "c"}, "kind", ValidationError),
    ({"kind": "sft", "prompt": "p"}, "completion", ValidationError),
    ({"kind": "sft", "prompt": "", "completion": "c"}, "prompt", ValidationError),
    ({"kind": "sft", "prompt": "  \n", "completion": "c"}, "prompt", ValidationError),
    ({"kind": "sft", "prompt": 7, "completion": "c"}, "prompt", ValidationError),
    ({"kind": "sft", "prompt": "p", "completion": "c", "extra": 1}, "extra", ValidationError),
    (PREFERENCE | {"rejected": PREFERENCE["chosen"]}, "rejected", ValidationError),
    (RATING | {"score": 1.5}, "score", ValidationError),
    (RATING | {"score": -0.1}, "score", ValidationError),
    (RATING | {"score": 5}, "score", ValidationError),
    (RATING | {"score": "0.5"}, "score", ValidationError),
    (RATING | {"score": True}, "score", ValidationError),
    (RATING | {"score": float("nan")}, "score", ValidationError),
    (SFT | {"metadata": {"x": float("inf")}}, "metadata", ValidationError),
    (SFT | {"metadata": "not a dict"}, "metadata", ValidationError),
    (SFT | {"completion": "x" * 3000}, "completion", PayloadTooLargeError),
    ("not a record", "", ValidationError),
    (["kind", "sft"], "", ValidationError),
]


@pytest.mark.parametrize(("bad", "field", "error"), BAD_RECORDS)
def test_bad_record_refuses_the_whole_batch(
    database: Database, tenant_id: int, bad: Any, field: str, error: type[Exception]
) -> None:
    limits = FeedbackLimits(max_records=10, max_record_bytes=2048)
    with pytest.raises(error) as caught:
        _ingest(database, tenant_id, [SFT, PREFERENCE, bad, RATING], limits=limits)
    assert isinstance(caught.value, FeedbackRecordError)
    assert (caught.value.index, caught.value.field) == (2, field)
    assert str(caught.value).startswith(f"records[2]{'.' + field if field else ''}: ")
    assert _count(database, SqlFeedback) == 0 and _count(database, SqlUser) == 0


def test_first_bad_record_is_reported(database: Database, tenant_id: int) -> None:
    with pytest.raises(FeedbackRecordError, match=r"^records\[1\]\.completion"):
        _ingest(database, tenant_id, [SFT, {"kind": "sft", "prompt": "p"}, {"kind": "?"}])


@pytest.mark.parametrize("batch", [[], "sft", {"kind": "sft"}, None])
def test_batch_must_be_a_non_empty_list(database: Database, tenant_id: int, batch: Any) -> None:
    with pytest.raises(ValidationError, match="^records"):
        _ingest(database, tenant_id, batch)
    assert _count(database, SqlUser) == 0


def test_oversized_batch_is_refused(database: Database, tenant_id: int) -> None:
    limits = FeedbackLimits(max_records=3, max_record_bytes=4096)
    assert _ingest(database, tenant_id, [_sft(i) for i in range(3)], limits=limits).created == 3
    with pytest.raises(PayloadTooLargeError, match="max_feedback_batch=3"):
        _ingest(database, tenant_id, [_sft(i) for i in range(10, 14)], limits=limits)
    assert _count(database, SqlFeedback) == 3


def test_bad_external_id_writes_nothing(database: Database, tenant_id: int) -> None:
    with pytest.raises(ValidationError, match="external_id"):
        _ingest(database, tenant_id, [SFT], user="")
    with pytest.raises(NotFoundError):
        _ingest(database, tenant_id + 100, [SFT])
    assert _count(database, SqlUser) == 0


def test_dedupe_within_and_across_batches(database: Database, tenant_id: int) -> None:
    first = _ingest(database, tenant_id, [SFT, RATING, SFT | {"metadata": {"seen": 2}}, PREFERENCE])
    assert first.created == 3 and first.duplicates == 1
    assert first.ids[2] == first.ids[0] and first.ids[0] < first.ids[1] < first.ids[3]

    second = _ingest(database, tenant_id, [_sft(1), PREFERENCE, _sft(1), RATING])
    assert second.created == 1 and second.duplicates == 3
    assert second.ids[1] == first.ids[3] and second.ids[3] == first.ids[1] and second.ids[0] == second.ids[2]
    assert _count(database, SqlFeedback) == 4

    kept = list_feedback(database, tenant_id=tenant_id, user_external_id="alice")
    assert kept[0].payload["metadata"] == {}  # the first copy's metadata is kept

    bob = _ingest(database, tenant_id, [SFT], user="bob")  # dedupe is per user
    assert bob.created == 1 and bob.ids[0] not in first.ids


def test_all_or_nothing_when_the_insert_fails(
    database: Database, tenant_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ingest(database, tenant_id, [SFT])
    records = [_sft(i) for i in range(5)] + [{"kind": "sft", "prompt": "p", "completion": "bad\ud800"}]
    with pytest.raises(ValidationError, match=r"records\[5\]\.completion"):
        _ingest(database, tenant_id, records)

    real_insert = feedback_store._insert_new

    def insert_then_fail(session: Any, **kwargs: Any) -> dict[str, int]:
        created = real_insert(session, **kwargs)
        assert len(created) == 5  # rows (and the new user) are in the transaction...
        raise StoreError("connection lost")  # ...when it fails

    monkeypatch.setattr(feedback_store, "_insert_new", insert_then_fail)
    with pytest.raises(StoreError):
        _ingest(database, tenant_id, [_sft(i) for i in range(5)], user="bob")
    assert _count(database, SqlFeedback) == 1 and _count(database, SqlUser) == 1


def test_list_feedback_pages_by_id_and_hides_other_tenants(database: Database, tenant_id: int) -> None:
    ids = _ingest(database, tenant_id, [_sft(i) for i in range(5)]).ids
    page = list_feedback(database, tenant_id=tenant_id, user_external_id="alice", after_id=ids[1], limit=2)
    assert [r.id for r in page] == ids[2:4]
    other, _ = TenantRepository(database).create_tenant(name="globex")
    with pytest.raises(NotFoundError):
        list_feedback(database, tenant_id=other.id, user_external_id="alice")


def test_users_with_new_feedback(database: Database, tenant_id: int) -> None:
    alice_ids = _ingest(database, tenant_id, [_sft(i) for i in range(4)], user="alice").ids
    bob_ids = _ingest(database, tenant_id, [_sft(i) for i in range(2)], user="bob").ids
    carol_ids = _ingest(database, tenant_id, [_sft(0)], user="carol").ids
    users = TenantRepository(database).list_users(tenant_id=tenant_id)
    alice, bob, carol = (u.id for u in users)

    snapshot = create_snapshot(database, user_id=alice, record_ids=alice_ids[:3], details={})
    add_version_row(database, user_id=alice, tenant_id=tenant_id, snapshot_id=snapshot.id)
    snapshot = create_snapshot(database, user_id=bob, record_ids=bob_ids, details={})
    add_version_row(database, user_id=bob, tenant_id=tenant_id, snapshot_id=snapshot.id)
    add_version_row(database, user_id=bob, tenant_id=tenant_id, snapshot_id=None)  # an import: no reset

    backlog = users_with_new_feedback(database, tenant_id=tenant_id)
    assert [(b.user_id, b.new_records, b.last_record_id, b.trained_through_id) for b in backlog] == [
        (alice, 1, alice_ids[3], alice_ids[2]),
        (carol, 1, carol_ids[0], None),
    ]
    assert [b.user_id for b in users_with_new_feedback(database, min_new_records=2)] == []
    _ingest(database, tenant_id, [_sft(7)], user="bob")
    assert [b.external_id for b in users_with_new_feedback(database)] == ["alice", "bob", "carol"]
    assert users_with_new_feedback(database, tenant_id=tenant_id + 100) == []


def test_snapshot_hash_is_stable_and_content_addressed(database: Database, tenant_id: int) -> None:
    ids = _ingest(database, tenant_id, [_sft(i) for i in range(4)]).ids
    user_id = TenantRepository(database).get_user(tenant_id=tenant_id, external_id="alice").id

    first = create_snapshot(database, user_id=user_id, record_ids=ids[:3], details={"epochs": 2})
    again = create_snapshot(
        database, user_id=user_id, record_ids=[ids[2], ids[0], ids[1], ids[0]], details={}
    )
    other = create_snapshot(database, user_id=user_id, record_ids=ids[1:], details={})
    assert first.content_hash == again.content_hash != other.content_hash
    assert (first.min_record_id, first.max_record_id, first.record_ids) == (ids[0], ids[2], tuple(ids[:3]))
    assert first.record_count == 3 and get_snapshot(database, snapshot_id=first.id) == first

    stored = list_feedback(database, tenant_id=tenant_id, user_external_id="alice")
    expected = json.dumps([[r.id, r.content_hash] for r in stored[:3]], separators=(",", ":"))
    assert first.content_hash == hashlib.sha256(expected.encode()).hexdigest()
    assert snapshot_hash((r.id, r.content_hash) for r in reversed(stored[:3])) == first.content_hash


def test_snapshot_refuses_unknown_or_foreign_records(database: Database, tenant_id: int) -> None:
    alice_ids = _ingest(database, tenant_id, [SFT], user="alice").ids
    bob_id = _ingest(database, tenant_id, [SFT], user="bob").ids[0]
    alice = TenantRepository(database).get_user(tenant_id=tenant_id, external_id="alice").id
    with pytest.raises(NotFoundError, match=str(bob_id)):
        create_snapshot(database, user_id=alice, record_ids=alice_ids + [bob_id], details={})
    with pytest.raises(ValidationError):
        create_snapshot(database, user_id=alice, record_ids=[], details={})
    with pytest.raises(NotFoundError):
        get_snapshot(database, snapshot_id=12345)
    shared = create_snapshot(database, user_id=None, record_ids=alice_ids + [bob_id], details={})
    assert shared.record_count == 2


def test_schemas_import_without_sqlalchemy() -> None:
    code = "import sys, lorafleet.feedback; assert 'sqlalchemy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_concurrent_ingest_of_the_same_batch_stores_it_once(pg_database: Database) -> None:
    tenants = TenantRepository(pg_database)
    tenant, _ = tenants.create_tenant(name="acme")
    tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")  # so the inserts themselves race
    batch = [_sft(i) for i in range(20)]
    start = threading.Barrier(6)

    def ingest(_: int) -> IngestResult:
        start.wait(timeout=10)
        return _ingest(pg_database, tenant.id, batch)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ingest, range(6)))

    assert len({tuple(r.ids) for r in results}) == 1
    assert sum(r.created for r in results) == 20 and _count(pg_database, SqlFeedback) == 20


# --- sft records as OpenAI-style messages ------------------------------------------------------------------------
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
CHAT = {"kind": "sft", "messages": TURNS}


def _chat(*turns: Any, **extra: Any) -> dict[str, Any]:
    return {"kind": "sft", "messages": list(turns), **extra}


def test_a_conversation_is_stored_as_messages_and_hashed_by_them(database: Database, tenant_id: int) -> None:
    as_developer = _chat({"role": "developer", "content": "Be brief."}, *TURNS[1:], metadata={"app": "chat"})
    result = _ingest(database, tenant_id, [CHAT, as_developer, SFT])
    assert (result.created, result.duplicates) == (2, 1)
    assert result.ids[0] == result.ids[1]  # developer is stored as system: the same record
    stored, sft = list_feedback(database, tenant_id=tenant_id, user_external_id="alice", limit=10)
    assert stored.kind == "sft" and stored.payload == {"messages": TURNS, "metadata": {}}
    canonical = json.dumps(CHAT, sort_keys=True, separators=(",", ":")).encode()
    assert stored.content_hash == hashlib.sha256(canonical).hexdigest()
    assert set(sft.payload) == {"prompt", "completion", "metadata"}  # the prompt form keeps its shape


BAD_CONVERSATIONS = [
    (_chat(*TURNS[:2], {"role": "bot", "content": "x"}), "messages[2].role"),
    (_chat(TURNS[1], {"role": "assistant", "content": " "}), "messages[1].content"),
    (_chat(TURNS[1], {"role": "assistant", "content": 3}), "messages[1].content"),
    (_chat(TURNS[1], {"role": "assistant"}), "messages[1].content"),
    (_chat({**TURNS[1], "name": "bob"}, TURNS[2]), "messages[0].name"),
    (_chat(TURNS[1], "Paris."), "messages[1]"),
    (_chat(TURNS[0], TURNS[2]), "messages"),  # no user turn
    (_chat(*TURNS[:2]), "messages"),  # no target
    (_chat(*TURNS, TURNS[1]), "messages"),  # ends with the user
    (_chat(), "messages"),
    ({"kind": "sft", "messages": "user: hi"}, "messages"),
    (_chat(*TURNS, prompt="p"), "prompt"),
    (_chat(*TURNS, completion="c"), "completion"),
    ({"kind": "preference", "messages": TURNS, "chosen": "a", "rejected": "b"}, "prompt"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_CONVERSATIONS)
def test_a_bad_conversation_refuses_the_whole_batch_naming_the_field(
    database: Database, tenant_id: int, bad: dict[str, Any], field: str
) -> None:
    with pytest.raises(FeedbackRecordError) as caught:
        _ingest(database, tenant_id, [SFT, CHAT, PREFERENCE, bad])
    assert (caught.value.index, caught.value.field) == (3, field)
    assert str(caught.value).startswith(f"records[3].{field}: ")
    assert _count(database, SqlFeedback) == 0 and _count(database, SqlUser) == 0
