"""A request body that stalls is refused (finding 9 of issue 18): a client that declares 100 bytes and sends 10
gets 408 ``request_timeout`` once no bytes came for the body read timeout, nothing is stored, and the server
answers the next request as usual. Before, the connection was held for as long as the client liked.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from api_helpers import ADMIN_KEY, SERVING_OPTIONS, ApiServer
from services.api.app import create_app

from lorafleet.config import Settings


@pytest.fixture(scope="module")
def impatient_api(make_api_settings: Callable[..., Settings]) -> Iterator[ApiServer]:
    options = dataclasses.replace(SERVING_OPTIONS, body_read_timeout_seconds=0.5)
    server = ApiServer(create_app(make_api_settings(), options=options))
    server.start()
    yield server
    server.stop()


def _stalled_post(
    server: ApiServer, path: str, key: str, body: bytes, declared: int
) -> tuple[int, dict[str, object]]:
    """POST ``body`` with ``declared`` as its Content-Length (more than is sent) and wait for the answer."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        conn.sendall(head + body)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
            chunk = conn.recv(65536)
            if not chunk:
                break
            raw += chunk
    status = int(raw.split(b" ", 2)[1])
    return status, json.loads(raw.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_stalled_body_is_a_408_and_stores_nothing(impatient_api: ApiServer) -> None:
    with httpx.Client(base_url=impatient_api.url, timeout=60) as http:
        created = http.post(
            "/v1/tenants",
            json={"name": f"slow-{uuid.uuid4().hex[:8]}"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        key = created.json()["api_key"]
        record = {"records": [{"kind": "sft", "prompt": "Hi", "completion": "Hello"}]}
        whole = json.dumps(record).encode()
        status, answer = _stalled_post(impatient_api, "/v1/users/sam/feedback", key, whole[:10], len(whole))
        assert status == 408 and answer["error"]["code"] == "request_timeout", answer  # type: ignore[index]
        mine = {"Authorization": f"Bearer {key}"}
        assert (
            http.get("/v1/users/sam/feedback", headers=mine).status_code == 404
        )  # nothing, not even the user
        sent = http.post("/v1/users/sam/feedback", json=record, headers=mine)  # the server carries on
        assert sent.status_code == 200 and len(http.get("/v1/users/sam/feedback", headers=mine).json()) == 1
