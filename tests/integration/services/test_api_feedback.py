"""Feedback through HTTP (a real uvicorn server, PostgreSQL): submit and list through the SDK, idempotent
retries, malformed, oversized and duplicated submissions."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from api_helpers import ApiServer, Library, TenantHandle, count_rows, sft

from lorafleet.sdk import AsyncClient, Client, errors
from lorafleet.sdk.schemas import FeedbackMessage, RatingFeedback, SftFeedback
from lorafleet.store.sql.models import SqlFeedback, SqlIdempotencyKey, SqlUser


def _chat(*turns: dict[str, Any]) -> dict[str, Any]:
    """An sft record as a conversation: a user turn, then ``turns``."""
    return {"kind": "sft", "messages": [{"role": "user", "content": "Capital of France?"}, *turns]}


def _feedback_rows(library: Library, tenant: TenantHandle) -> int:
    users = [u.id for u in library.tenants.list_users(tenant_id=tenant.id)]
    return count_rows(library.db, SqlFeedback, SqlFeedback.user_id.in_(users)) if users else 0


def test_submit_and_list_feedback_through_the_sdk(tenant: TenantHandle) -> None:
    client = tenant.client
    records: list[Mapping[str, object] | RatingFeedback] = [
        sft("How do I reset my password?", "Settings > Security.", source="app"),
        {"kind": "preference", "prompt": "Greet me", "chosen": "Hello!", "rejected": "Go away."},
        RatingFeedback(kind="rating", prompt="Summarise", response="A summary.", score=0.75),
    ]
    submitted = client.submit_feedback("alice", records)
    assert (submitted.created, submitted.duplicates, len(submitted.ids)) == (3, 0, 3)

    listed = client.list_feedback("alice")
    assert [r.id for r in listed] == submitted.ids
    assert [r.kind for r in listed] == ["sft", "preference", "rating"]
    assert listed[0].payload["metadata"] == {"source": "app"} and listed[2].payload["score"] == 0.75
    assert [r.id for r in client.list_feedback("alice", after_id=submitted.ids[0], limit=1)] == submitted.ids[
        1:2
    ]
    with pytest.raises(errors.NotFound):
        client.list_feedback("nobody")


def test_messages_feedback_is_accepted_and_stored(tenant: TenantHandle, library: Library) -> None:
    turns = [
        FeedbackMessage(role="developer", content="Be brief."),
        FeedbackMessage(role="user", content="Capital of France?"),
        FeedbackMessage(role="assistant", content="Paris."),
    ]
    as_model = SftFeedback(kind="sft", messages=turns, metadata={"app": "chat"})
    as_dict = _chat({"role": "assistant", "content": "Paris."})
    submitted = tenant.client.submit_feedback("lena", [as_model, as_dict, as_dict])
    assert (submitted.created, submitted.duplicates) == (2, 1)
    first, second = tenant.client.list_feedback("lena")
    assert first.kind == "sft" and first.payload == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "metadata": {"app": "chat"},
    }
    assert second.payload["messages"] == as_dict["messages"] and "prompt" not in second.payload
    assert _feedback_rows(library, tenant) == 2


def test_duplicated_records_are_stored_once(tenant: TenantHandle, library: Library) -> None:
    first = tenant.client.submit_feedback("bob", [sft("a"), sft("b"), sft("a", source="other")])
    assert (first.created, first.duplicates) == (2, 1) and first.ids[0] == first.ids[2]
    again = tenant.client.submit_feedback("bob", [sft("b"), sft("c")])
    assert (again.created, again.duplicates) == (1, 1) and again.ids[0] == first.ids[1]
    assert _feedback_rows(library, tenant) == 3


def test_a_retry_with_the_same_key_replays_the_response_and_creates_nothing(
    api: ApiServer, tenant: TenantHandle, library: Library
) -> None:
    body = {"records": [sft("one"), sft("two")]}
    headers = {"Authorization": f"Bearer {tenant.api_key}", "Idempotency-Key": "retry-1"}
    with httpx.Client(base_url=api.url) as http:
        first = http.post("/v1/users/carol/feedback", json=body, headers=headers)
        second = http.post("/v1/users/carol/feedback", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"ids": first.json()["ids"], "created": 2, "duplicates": 0}
    assert second.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert _feedback_rows(library, tenant) == 2
    assert count_rows(library.db, SqlIdempotencyKey, SqlIdempotencyKey.tenant_id == tenant.id) == 1


def test_the_sdk_retries_a_lost_response_with_its_key_and_nothing_is_created_twice(
    api: ApiServer, tenant: TenantHandle, library: Library
) -> None:
    """The first answer is lost on the way back (the request did reach the server and commit): the SDK sends
    it again with the same key and gets the first response replayed."""

    class LoseFirstAnswer(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.keys: list[str] = []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            self.keys.append(request.headers["idempotency-key"])
            if len(self.keys) == 1:
                response.read()
                raise httpx.ReadError("connection dropped", request=request)
            return response

    transport = LoseFirstAnswer()
    with Client(api.url, tenant.api_key, transport=transport, backoff=0.01) as client:
        result = client.submit_feedback("dave", [sft("x"), sft("y"), sft("z")])
    assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
    assert (result.created, result.duplicates) == (3, 0)  # the first run's answer, not "3 duplicates"
    assert _feedback_rows(library, tenant) == 3


def test_the_same_key_with_another_body_is_refused(tenant: TenantHandle, library: Library) -> None:
    tenant.client.submit_feedback("erin", [sft("first")], idempotency_key="k-1")
    with pytest.raises(errors.IdempotencyKeyReused) as caught:
        tenant.client.submit_feedback("erin", [sft("second")], idempotency_key="k-1")
    assert caught.value.status == 422 and caught.value.field == "Idempotency-Key"
    with pytest.raises(errors.IdempotencyKeyReused):
        tenant.client.submit_feedback("frank", [sft("first")], idempotency_key="k-1")  # another path
    assert _feedback_rows(library, tenant) == 1


def test_a_failed_request_releases_its_key(tenant: TenantHandle) -> None:
    with pytest.raises(errors.NotFound):
        tenant.client.train("gina", idempotency_key="train-1")  # no such user yet
    tenant.client.submit_feedback("gina", [sft("q")])
    assert tenant.client.train("gina", idempotency_key="train-1").created


@pytest.mark.parametrize(
    ("records", "field"),
    [
        ([sft("ok"), {"kind": "sft", "prompt": 5, "completion": "c"}], "records[1].prompt"),
        ([{"kind": "sft", "prompt": "p"}], "records[0].completion"),
        ([{"kind": "essay", "prompt": "p"}], "records[0].kind"),
        ([{"prompt": "p", "completion": "c"}], "records[0].kind"),
        ([{"kind": "rating", "prompt": "p", "response": "r", "score": 4}], "records[0].score"),
        (
            [{"kind": "preference", "prompt": "p", "chosen": "same", "rejected": "same"}],
            "records[0].rejected",
        ),
        (
            [
                sft(
                    "ok",
                ),
                {**sft("typo"), "completoin": "x"},
            ],
            "records[1].completoin",
        ),
        ([], "records"),
        (
            [sft("ok"), sft("ok2"), sft("ok3"), _chat({"role": "bot", "content": "x"})],
            "records[3].messages[1].role",
        ),
        ([_chat()], "records[0].messages"),
        ([{**_chat({"role": "assistant", "content": "A"}), "prompt": "p"}], "records[0].prompt"),
    ],
)
def test_malformed_records_are_422_naming_the_field(
    tenant: TenantHandle, library: Library, records: list[dict[str, object]], field: str
) -> None:
    with pytest.raises(errors.ValidationFailed) as caught:
        tenant.client.submit_feedback("hal", records)
    assert caught.value.status == 422 and caught.value.field == field, caught.value
    assert caught.value.message.startswith(field)
    assert count_rows(library.db, SqlUser, SqlUser.tenant_id == tenant.id) == 0  # nothing written


def test_oversized_submissions_are_413(tenant: TenantHandle, library: Library) -> None:
    client = tenant.client
    with pytest.raises(errors.PayloadTooLarge) as record:  # one record over max_feedback_record_bytes
        client.submit_feedback("ivan", [sft("small"), sft("big", "x" * 70_000)])
    assert record.value.field == "records[1].completion"
    with pytest.raises(errors.PayloadTooLarge) as batch:  # more records than max_feedback_batch (50)
        client.submit_feedback("ivan", [sft(f"q{i}") for i in range(51)])
    assert batch.value.field == "records"
    with pytest.raises(errors.PayloadTooLarge) as body:  # a body over the server's 1 MiB limit
        client.submit_feedback("ivan", [sft(f"q{i}", "y" * 60_000) for i in range(20)])
    assert body.value.status == 413 and body.value.code == "payload_too_large"
    assert _feedback_rows(library, tenant) == 0


def test_a_chunked_body_over_the_limit_is_413(api: ApiServer, tenant: TenantHandle) -> None:

    def chunks() -> object:
        for _ in range(40):
            yield b" " * 65_536  # whitespace: the size limit stops it before it is parsed

    with httpx.Client(base_url=api.url) as http:
        answer = http.post(
            "/v1/users/judy/feedback",
            content=chunks(),  # type: ignore[arg-type]
            headers={"Authorization": f"Bearer {tenant.api_key}", "Content-Type": "application/json"},
        )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "payload_too_large"


def test_the_async_client_against_the_server(api: ApiServer, tenant: TenantHandle) -> None:

    async def run() -> tuple[list[int], list[int]]:
        async with AsyncClient(api.url, tenant.api_key) as client:
            submitted = await client.submit_feedback("kim", [sft("async one"), sft("async two")])
            listed = await client.list_feedback("kim")
            with pytest.raises(errors.NotFound):
                await client.list_adapters("nobody")
            return submitted.ids, [r.id for r in listed]

    submitted, listed = asyncio.run(run())
    assert submitted == listed and len(listed) == 2
