"""``kill -9`` of the service in the middle of many concurrent feedback batches, each under its own
``Idempotency-Key`` (finding 4 of issue 18).

Before, a batch committed just before the kill left its idempotency row without a response, and every retry of
that key was 409 ``idempotency_key_in_flight`` for five minutes. Now the response is stored in the transaction of
the write, so after a restart every key either replays the response it was given, or (its request never
committed) runs once: every record stored exactly once (row counts and content hashes), no 409 left behind, no
500.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

from api_helpers import Library
from feedback_load import Load, answered_ok, check_stored, retry_every_batch, start_with_tenant
from service_process import ServiceProcess, fault_recovery

THREADS = 12
#: batches answered before the kill (the rest of the load is in flight when it hits)
ANSWERED_BEFORE_KILL = 40


def test_kill9_mid_ingest_then_every_key_replays_or_runs_once(
    start_service: Callable[..., ServiceProcess], library: Library
) -> None:
    service, tenant_id, api_key = start_with_tenant(start_service, "kill-ingest")
    load = Load(service.url, api_key, threads=THREADS).start()
    deadline = time.monotonic() + 120
    while load.answered() < ANSWERED_BEFORE_KILL:
        assert time.monotonic() < deadline, f"the load did not get going:\n{service.log()}"
        time.sleep(0.05)
    service.kill9()
    killed_at = time.monotonic()
    batches = load.join()
    answered = answered_ok(batches)

    restart_s = service.start()
    settled = retry_every_batch(service.url, api_key, batches)
    settled_s = time.monotonic() - killed_at
    check_stored(library, tenant_id, batches)
    fault_recovery(
        "kill9-mid-ingest",
        batches=len(batches),
        answered_before_kill=len(answered),
        in_doubt=len(batches) - len(answered),
        **asdict(settled),
        restart_to_healthy=restart_s,
        kill_to_all_keys_settled=settled_s,
    )
