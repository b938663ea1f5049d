"""``lorafleet jobs watch`` and ``lorafleet jobs cancel`` against a temp SQLite data dir; a stand-in worker
(the library's queue and lease) moves the jobs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lorafleet.config import load_settings
from lorafleet.domain import Job
from lorafleet.entrypoints.cli import main
from lorafleet.entrypoints.jobs import watch_job
from lorafleet.jobs import JobQueue, LeaseContext
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository

LEASE = 60.0
TOTAL = 4


@dataclass
class Setup:
    queue: JobQueue
    acme: int

    def submit(self) -> int:
        users = [{"external_id": "alice", "kind": "user"}]
        return self.queue.submit(
            tenant_id=self.acme, kind="train", payload={"users": users}, dedupe_key=None
        ).job.id

    def claim(self) -> LeaseContext:
        job = self.queue.claim(worker_id="w", lease_seconds=LEASE)
        assert job is not None
        return LeaseContext(queue=self.queue, job=job, worker_id="w", progress_interval=0)

    def run(self, *, outcome: str) -> int:
        """A job that reported every step and then ended ``outcome``."""
        job_id = self.submit()
        lease = self.claim()
        for step in range(1, TOTAL + 1):
            lease.report_step(step=step, total=TOTAL, losses={"alice": 1.0 / step}, loss=1.0 / step)
        if outcome == "succeeded":
            self.queue.complete(job_id=job_id, worker_id="w", result={"versions": [{"number": 1}]})
        elif outcome == "failed":
            self.queue.fail(job_id=job_id, worker_id="w", error="TrainingError: loss is nan", retryable=False)
        else:
            self.queue.cancel(tenant_id=self.acme, job_id=job_id, actor="api:acme")
            self.queue.acknowledge_cancel(job_id=job_id, worker_id="w")
        return job_id


@pytest.fixture
def setup(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Setup]:
    """A migrated data dir with tenants ``acme`` and ``other`` (made by the CLI)."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    assert main(["db", "upgrade"]) == 0
    assert main(["tenants", "create", "acme"]) == 0
    assert main(["tenants", "create", "other"]) == 0
    capsys.readouterr()
    db = Database(load_settings().resolved_database_url)
    yield Setup(JobQueue(db), TenantRepository(db).get_tenant(name="acme").id)
    db.dispose()


def test_cancel_a_queued_job(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = setup.submit()
    assert main(["jobs", "cancel", str(job_id), "--tenant", "acme", "--actor", "ops:kim"]) == 0
    assert f"job {job_id} cancelled (by ops:kim)" in capsys.readouterr().out
    job = setup.queue.get(tenant_id=None, job_id=job_id)
    assert (job.state, job.cancelled_by) == ("cancelled", "ops:kim")
    assert main(["jobs", "cancel", str(job_id), "--tenant", "acme"]) == 0  # again: nothing changes
    assert setup.queue.get(tenant_id=None, job_id=job_id).cancelled_by == "ops:kim"


def test_cancel_a_running_job_asks_its_worker(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = setup.submit()
    setup.claim()
    assert main(["jobs", "cancel", str(job_id), "--tenant", "acme"]) == 0
    assert "cancel requested by cli" in capsys.readouterr().out
    job = setup.queue.get(tenant_id=None, job_id=job_id)
    assert (job.state, job.cancelled_by) == ("running", "cli") and job.cancel_requested_at is not None


def test_cancel_refuses_another_tenants_job_and_a_finished_one(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    queued = setup.submit()
    assert main(["jobs", "cancel", str(queued), "--tenant", "other"]) == 2
    assert "error [not_found]" in capsys.readouterr().err
    assert setup.queue.get(tenant_id=None, job_id=queued).state == "queued"
    setup.queue.cancel(tenant_id=setup.acme, job_id=queued, actor="test")

    done = setup.run(outcome="succeeded")
    assert main(["jobs", "cancel", str(done), "--tenant", "acme"]) == 2
    err = capsys.readouterr().err
    assert "error [job_finished]" in err and "succeeded" in err


@pytest.mark.parametrize(
    ("outcome", "status", "line"),
    [
        ("succeeded", 0, "succeeded: 1 version(s) (last losses: alice 0.2500)"),
        ("failed", 1, "failed: TrainingError: loss is nan"),
        ("cancelled", 1, "cancelled by api:acme"),
    ],
)
def test_watch_shows_the_bar_and_ends_with_the_jobs_state(
    setup: Setup, capsys: pytest.CaptureFixture[str], outcome: str, status: int, line: str
) -> None:
    job_id = setup.run(outcome=outcome)
    assert main(["jobs", "watch", str(job_id), "--tenant", "acme", "--poll", "0.01"]) == status
    captured = capsys.readouterr()
    assert f"job {job_id} {line}" in captured.out
    assert f"job {job_id}" in captured.err and f"{TOTAL}/{TOTAL}" in captured.err and outcome in captured.err


def test_watch_follows_a_running_job_step_by_step(setup: Setup) -> None:
    job_id = setup.submit()
    lease = setup.claim()
    seen: list[tuple[str, int | None]] = []
    step = 0

    def next_step(_poll: float) -> None:  # the stand-in worker moves on whenever the watcher waits
        nonlocal step
        step += 1
        if step <= TOTAL:
            lease.report_step(step=step, total=TOTAL, losses={"alice": 1.0})
        else:
            setup.queue.complete(job_id=job_id, worker_id="w", result={})

    def on_change(job: Job) -> None:
        seen.append((job.state, (job.progress or {}).get("step")))

    ended = watch_job(
        setup.queue,
        tenant_id=setup.acme,
        job_id=job_id,
        poll=1.0,
        timeout=None,
        on_change=on_change,
        sleep=next_step,
    )
    assert ended.state == "succeeded"
    assert seen == [("running", None), *[("running", n) for n in range(1, TOTAL + 1)], ("succeeded", TOTAL)]


def test_watch_gives_up_after_its_timeout(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = setup.submit()
    assert (
        main(["jobs", "watch", str(job_id), "--tenant", "acme", "--poll", "0.01", "--timeout", "0.01"]) == 2
    )
    assert "did not finish" in capsys.readouterr().err
    assert main(["jobs", "watch", str(job_id), "--tenant", "acme", "--poll", "0"]) == 2
    assert "--poll" in capsys.readouterr().err
    assert main(["jobs", "watch", "999", "--tenant", "acme"]) == 2
    assert "error [not_found]" in capsys.readouterr().err
