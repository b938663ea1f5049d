"""Helpers for the continual-learning tests: a tiny training config (and tenants whose jobs get it), synthetic
feedback, and row counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from tests.tiny import (
    TINY_TRAINING as TINY_TRAINING,  # re-exported: the tests here import it from this module
)

from lorafleet.domain import Job
from lorafleet.jobs import JobQueue, Scheduler
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapterVersion, SqlDatasetSnapshot, SqlJob
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.overrides import set_tenant_training
from lorafleet.training.synthetic import make_user_records
from lorafleet.workflows.feedback import ingest_feedback


def tiny_tenant(db: Database, name: str = "acme") -> int:
    """A new tenant whose training config is ``TINY_TRAINING`` (so every job queued for it carries it); its id."""
    tenant_id = TenantRepository(db).create_tenant(name=name)[0].id
    set_tenant_training(db, tenant_id=tenant_id, overrides=TINY_TRAINING)
    return tenant_id


def queue_legacy_train_job(db: Database, *, tenant_id: int, user: str) -> Job:
    """A train job for ``user`` as code before per-job configs queued it (no ``payload["training"]``): each
    trainer runs it with its own default config, so two attempts can differ (one endless, one short)."""
    job = Scheduler(db).train_now(tenant_id=tenant_id, user_external_id=user).job
    with db.session() as session:
        row = session.get(SqlJob, job.id)
        assert row is not None
        row.payload = {k: v for k, v in row.payload.items() if k != "training"}
    return get_job(db, job.id)


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


def get_job(db: Database, job_id: int) -> Job:
    return JobQueue(db).get(tenant_id=None, job_id=job_id)
