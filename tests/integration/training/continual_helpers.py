"""Helpers for the continual-learning tests: a tiny training config, synthetic feedback, and row counts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select

from lorafleet.domain import Job
from lorafleet.feedback import ingest_feedback
from lorafleet.jobs import JobQueue
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapterVersion, SqlDatasetSnapshot
from lorafleet.training.synthetic import make_user_records

#: a few steps on two projections: enough to move the holdout loss, fast on two CPU cores
TINY_TRAINING: dict[str, Any] = {
    "rank": 4,
    "alpha": 8.0,
    "target_modules": ["q_proj", "v_proj"],
    "learning_rate": 5e-3,
    "max_steps": 8,
    "batch_size": 4,
    "max_seq_len": 64,
    "holdout_fraction": 0.3,
    "replay_ratio": 0.5,
    "seed": 0,
}


def feed_users(
    db: Database, *, tenant_id: int, users: Sequence[str], round: int, n_records: int
) -> dict[str, list[int]]:
    """Ingest ``n_records`` synthetic records of ``round`` for each user; their ids by user."""
    ids: dict[str, list[int]] = {}
    for user in users:
        records = make_user_records(user, round=round, n_records=n_records, seed=0)
        ids[user] = ingest_feedback(db, tenant_id=tenant_id, user_external_id=user, records=records).ids
    return ids


def count_rows(db: Database, model: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def count_versions_and_snapshots(db: Database) -> tuple[int, int]:
    return count_rows(db, SqlAdapterVersion), count_rows(db, SqlDatasetSnapshot)


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def get_job(db: Database, job_id: int) -> Job:
    return JobQueue(db).get(tenant_id=None, job_id=job_id)
