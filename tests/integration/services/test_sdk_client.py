"""The SDK against stand-in transports: retries with backoff on 5xx and connection errors reuse one
idempotency key, a 4xx is never retried, errors are typed, ``wait_for_job`` polls and times out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest

from lorafleet import errors as lib
from lorafleet.sdk import AsyncClient, Client, errors
from lorafleet.sdk.errors import error_for

NOW = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
SUBMITTED = {"ids": [1], "created": 1, "duplicates": 0}


def _job(state: str) -> dict[str, object]:
    return {"id": 7, "kind": "train", "state": state, "users": ["u"], "attempts": 1, "max_attempts": 3,
            "created_at": NOW}  # fmt: skip


class Script:
    """Answers requests from a list of (status, body) or exceptions, recording what was sent."""

    def __init__(self, *answers: tuple[int, object] | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body)

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]


def _client(script: Callable[[httpx.Request], httpx.Response], **kwargs: object) -> Client:
    return Client("http://sdk.test", "lf_key", transport=httpx.MockTransport(script), backoff=0.001, **kwargs)  # type: ignore[arg-type]


def test_5xx_and_connection_errors_are_retried_with_the_same_idempotency_key() -> None:
    script = Script((503, {"error": {"code": "capacity_exhausted", "message": "busy"}}),
                    httpx.ConnectError("refused"), (500, None), (200, SUBMITTED))  # fmt: skip
    with _client(script, max_retries=3) as client:
        result = client.submit_feedback("u", [{"kind": "sft", "prompt": "p", "completion": "c"}])
    assert result.ids == [1] and len(script.requests) == 4
    assert len(set(script.keys)) == 1 and script.keys[0]
    assert script.requests[0].headers["authorization"] == "Bearer lf_key"
    assert json.loads(script.requests[0].content)["records"][0]["prompt"] == "p"


def test_a_4xx_is_raised_at_once_as_its_typed_error() -> None:
    body = {
        "error": {
            "code": "validation_error",
            "message": "records[0].prompt: bad",
            "field": "records[0].prompt",
        }
    }
    script = Script((422, body))
    with _client(script) as client, pytest.raises(errors.ValidationFailed) as caught:
        client.submit_feedback("u", [{"kind": "sft", "prompt": "p", "completion": "c"}])
    assert len(script.requests) == 1
    assert caught.value.field == "records[0].prompt" and caught.value.status == 422
    assert isinstance(caught.value, lib.ValidationError)  # the library's class catches it too


def test_retries_give_up_after_max_retries_with_the_last_error() -> None:
    script = Script((502, {"error": {"code": "blob_integrity_error", "message": "bad blob"}}))
    with _client(script, max_retries=2) as client, pytest.raises(errors.BadGateway):
        client.get_job(7)
    assert len(script.requests) == 3


def test_create_tenant_is_not_resent_after_it_may_have_arrived() -> None:
    script = Script(httpx.ReadTimeout("slow"), (201, {}))
    with _client(script, max_retries=3) as client, pytest.raises(errors.ConnectionFailed):
        client.create_tenant("acme")
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (401, "unauthorized", errors.Unauthorized),
        (403, "forbidden", errors.Forbidden),
        (404, "not_found", errors.NotFound),
        (409, "already_exists", errors.AlreadyExists),
        (409, "invalid_state", errors.InvalidState),
        (413, "payload_too_large", errors.PayloadTooLarge),
        (422, "idempotency_key_reused", errors.IdempotencyKeyReused),
        (418, "teapot", errors.ApiError),
        (500, "internal_error", errors.ServerError),
    ],
)
def test_errors_are_typed_by_code_then_status(status: int, code: str, expected: type[Exception]) -> None:
    error = error_for(status=status, body={"error": {"code": code, "message": "m"}})
    assert type(error) is expected and error.code == code


def test_wait_for_job_polls_until_finished_and_times_out() -> None:
    script = Script((200, _job("queued")), (200, _job("running")), (200, _job("succeeded")))
    with _client(script) as client:
        assert client.wait_for_job(7, timeout=5, poll=0.01).state == "succeeded"
    stuck = Script((200, _job("running")))
    with _client(stuck) as client, pytest.raises(errors.JobTimeout):
        client.wait_for_job(7, timeout=0.05, poll=0.01)


def test_the_async_client_retries_and_parses_the_same_way() -> None:
    script = Script((503, None), (200, _job("succeeded")))

    async def run() -> str:
        transport = httpx.MockTransport(script)
        async with AsyncClient("http://sdk.test", "lf_key", transport=transport, backoff=0.001) as client:
            return (await client.wait_for_job(7, timeout=5, poll=0.01)).state

    assert asyncio.run(run()) == "succeeded" and len(script.requests) == 2
