"""SIGTERM to the service while requests are in flight: a generation that is still loading the serving engine
and many concurrent feedback batches under Idempotency-Keys.

Every request in flight finishes (200) or gets a clean refusal (the connection is refused or closed before an
answer, never a 500), the process exits 0 after its shutdown, and after a restart every batch retried with its key
replays its answer or runs once: every record stored exactly once (row counts and content hashes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import httpx
from api_helpers import Library
from feedback_load import Load, answered_ok, check_stored, new_batch, retry_every_batch, start_with_tenant
from service_process import ServiceProcess, fault_recovery

THREADS = 8
ANSWERED_BEFORE_SIGTERM = 30


def test_sigterm_mid_request_finishes_or_refuses_cleanly_and_exits_0(
    start_service: Callable[..., ServiceProcess], library: Library
) -> None:
    service, tenant_id, api_key = start_with_tenant(start_service, "sigterm")
    headers = {"Authorization": f"Bearer {api_key}"}
    seed = new_batch(THREADS, 0)  # the generating user's feedback (so the user exists), checked with the rest
    seeded = httpx.post(
        f"{service.url}/v1/users/{seed.user}/feedback",
        json={"records": seed.records},
        headers={**headers, "Idempotency-Key": seed.key},
        timeout=30,
    )
    assert seeded.status_code == 200, seeded.text
    seed.status, seed.body = seeded.status_code, seeded.json()
    generated: dict[str, Any] = {}

    def generate() -> None:  # the first inference request: it loads the engine, which takes a while
        try:
            answer = httpx.post(
                f"{service.url}/v1/users/{seed.user}/generate",
                json={"prompt": "Say something.", "max_tokens": 16},
                headers=headers,
                timeout=300,
            )
            generated.update(status=answer.status_code, body=answer.json())
        except httpx.HTTPError as exc:
            generated.update(error=repr(exc))

    generation = threading.Thread(target=generate, daemon=True)
    generation.start()
    load = Load(service.url, api_key, threads=THREADS).start()
    deadline = time.monotonic() + 120
    while load.answered() < ANSWERED_BEFORE_SIGTERM or _engine(service) != "loading":
        assert time.monotonic() < deadline, f"the load or the engine load did not start:\n{service.log()}"
        time.sleep(0.05)

    signalled_at = time.monotonic()
    exit_status = service.terminate(timeout=120)
    shutdown_s = time.monotonic() - signalled_at
    batches = [seed, *load.join()]
    generation.join(timeout=120)
    assert exit_status == 0, service.log()
    # the generation in flight finished, or was refused cleanly (a 503 naming the shutdown, never a 500)
    assert generated.get("status") == 200 or (
        generated.get("status") == 503 and "shutting down" in generated["body"]["error"]["message"]
    ), generated
    assert "Traceback" not in service.log().rsplit("===== start", 1)[-1], service.log()
    answered = answered_ok(batches)

    restart_s = service.start()
    settled = retry_every_batch(service.url, api_key, batches)
    check_stored(library, tenant_id, batches)
    fault_recovery(
        "sigterm-mid-request",
        generation=generated.get("status", generated.get("error")),
        batches=len(batches),
        answered_before_exit=len(answered),
        refused=len(batches) - len(answered),
        **asdict(settled),
        sigterm_to_exit=shutdown_s,
        restart_to_healthy=restart_s,
    )


def _engine(service: ServiceProcess) -> str:
    try:
        return str(httpx.get(f"{service.url}/readyz", timeout=5).json().get("engine"))
    except (httpx.HTTPError, ValueError):
        return "?"
