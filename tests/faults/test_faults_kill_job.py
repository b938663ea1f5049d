"""``kill -9`` of the service while its trainer actor trains a job on the tiny backbone; then a restart.

The job is neither lost nor doubled: its lease (held by the dead actor) expires, the restarted service's actor
claims it again (attempt 2) and exactly one version results, its blob intact; the feedback it trains on is all
there (row counts and content hashes); the ``train`` request, retried with its ``Idempotency-Key``, replays the
same job. The restart also ends what the kill left (finding 11 of issue 18): the dead Ray session's agents and the
job's scratch folder. No request along the way is a 500.

The trainer actor's process is killed right after the service's: left alone it notices that its raylet is gone
and exits a second or two later, in which time the tiny job might just finish under its still valid lease (also
one version, but not the take-over this test is about).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from api_helpers import ADMIN_KEY, TINY_TRAINING, Library
from feedback_load import tenant_feedback
from service_process import ServiceProcess, fault_recovery

from lorafleet.store.sql.models import SqlFeedback

#: two service starts with a trainer actor each: ``make test-extended``, not ``make test`` (CI time); the lease
#: take-over itself is also checked in ``make test`` (tests/integration/training/test_continual_ray.py)
pytestmark = pytest.mark.extended

RECORDS = 24
#: enough steps that the kill lands while the actor trains (the tiny backbone does hundreds of steps a second)
TRAINING = {**TINY_TRAINING, "max_steps": 400}
LEASE_SECONDS = 6


class Calls:
    """An HTTP client that remembers every status, so the test can say: no 500 anywhere."""

    def __init__(self, url: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {api_key}"})
        self.statuses: list[tuple[str, int]] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = self.http.request(method, path, **kwargs)
        self.statuses.append((f"{method} {path}", answer.status_code))
        return answer


def _job(calls: Calls, job_id: int) -> dict[str, Any]:
    answer = calls("GET", f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _orphans_of(session_dirs: set[str]) -> list[str]:
    """Processes still holding files in the given Ray session folders."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(f.path.startswith(tuple(session_dirs)) for f in proc.open_files()):
                found.append(f"{' '.join(proc.info['cmdline'] or []).strip()} ({proc.pid})")
        except psutil.Error:
            continue
    return found


def _is_trainer(proc: psutil.Process) -> bool:
    try:
        return " ".join(proc.cmdline()).startswith("ray::TrainerHost")
    except psutil.Error:
        return False


def _ray_sessions_of(pid: int) -> set[str]:
    """The Ray session folders the service's processes have open (its raylet's and agents')."""
    sessions = set()
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            for f in proc.open_files():
                if "/session_" in f.path:
                    head, _, rest = f.path.partition("/session_")
                    sessions.add(f"{head}/session_{rest.split('/', 1)[0]}")
        except psutil.Error:
            continue
    return sessions


def test_kill9_mid_job_then_the_job_is_reclaimed_and_one_version_results(
    start_service: Callable[..., ServiceProcess], library: Library
) -> None:
    service = start_service(workers=1, lease_seconds=str(LEASE_SECONDS), ray_num_cpus="1")
    service.start(timeout=300)
    tmp_dir = Path(service.env["TMPDIR"])
    created = httpx.post(
        f"{service.url}/v1/tenants",
        json={"name": f"kill-job-{uuid.uuid4().hex[:8]}"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    ).json()
    tenant_id, calls = int(created["id"]), Calls(service.url, created["api_key"])
    records = [
        {"kind": "sft", "prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(RECORDS)
    ]
    sent = calls(
        "POST", "/v1/users/kim/feedback", json={"records": records}, headers={"Idempotency-Key": "fb-1"}
    )
    assert sent.status_code == 200, sent.text
    train_key = {"Idempotency-Key": "train-1"}
    train = calls("POST", "/v1/users/kim/train", json={"training": TRAINING}, headers=train_key)
    assert train.status_code == 202, train.text
    job_id = int(train.json()["job"]["id"])

    deadline = time.monotonic() + 300
    while True:  # until the actor is in the training loop (progress is written every ~2 s)
        job = _job(calls, job_id)
        progress = job.get("progress") or {}
        if job["state"] == "running" and progress.get("phase") == "training":
            break
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"the job never started training: {job}\n{service.log()}"
        time.sleep(0.2)
    sessions = _ray_sessions_of(service.pid)
    trainers = [p for p in psutil.Process(service.pid).children(recursive=True) if _is_trainer(p)]
    assert trainers, "no trainer actor process"
    service.kill9()
    for trainer in trainers:  # right after the service: see the module's docstring
        trainer.kill()
    killed_at = time.monotonic()
    left = sorted(tmp_dir.glob(f"lorafleet-job-{job_id}-pid*"))
    assert left, "the job's scratch folder was not there at the kill"
    before = _job_rows(library, tenant_id)

    restart_s = service.start(timeout=300)
    assert _orphans_of(sessions) == []  # the dead session's agents were ended by the start
    assert not any(p.exists() for p in left)  # and the dead actor's scratch folder removed

    deadline = time.monotonic() + 300
    while True:
        job = _job(calls, job_id)
        if job["state"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, f"the job was not taken over: {job}\n{service.log()}"
        time.sleep(0.5)
    reclaimed_s = time.monotonic() - killed_at
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    again = calls("POST", "/v1/users/kim/train", json={"training": TRAINING}, headers=train_key)
    assert again.status_code == 202 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["job"]["id"] == job_id  # the same job, not a second one

    versions = calls("GET", "/v1/users/kim/adapters/personal/versions")
    assert versions.status_code == 200, versions.text
    assert [v["number"] for v in versions.json()] == [1]  # exactly one version
    adapter = library.registry.list_adapters(tenant_id=tenant_id)
    (version,) = library.registry.list_versions(tenant_id=tenant_id, adapter_id=adapter[0].id)
    assert version.job_id == job_id
    assert library.registry.blobs.get_bytes(
        version.sha256, expected_size=version.size_bytes
    )  # sha256-checked
    assert _job_rows(library, tenant_id) == before == RECORDS  # nothing lost, nothing doubled
    assert [s for s in calls.statuses if s[1] >= 500] == []
    fault_recovery(
        "kill9-mid-job",
        step_at_kill=progress.get("step"),
        restart_to_healthy=restart_s,
        kill_to_job_succeeded=reclaimed_s,
        lease_seconds=LEASE_SECONDS,
        attempts=job["attempts"],
        versions=1,
        leftovers_ended_at_start="crashed local Ray session" in service.log(),
    )


def _job_rows(library: Library, tenant_id: int) -> int:
    """The tenant's feedback rows, checked against their content hashes (recomputed) as they are counted."""
    from lorafleet.feedback import validate_feedback_batch

    rows = tenant_feedback(
        library, tenant_id, SqlFeedback.kind, SqlFeedback.payload, SqlFeedback.content_hash
    )
    for kind, payload, content_hash in rows:
        (prepared,) = validate_feedback_batch([{"kind": kind, **payload}])
        assert prepared.content_hash == content_hash, payload
    return len(rows)
