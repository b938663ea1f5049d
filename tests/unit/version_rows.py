"""A version row inserted directly (no blob, no registry), for tests of what reads versions and snapshots."""

from __future__ import annotations

from sqlalchemy import select

from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapter, SqlAdapterVersion


def add_version_row(db: Database, *, tenant_id: int, user_id: int, snapshot_id: int | None) -> None:
    """The next version of the user's ``default`` adapter (created when absent), trained on the dataset snapshot
    ``snapshot_id`` (None: a version with no snapshot, as an import registers)."""
    with db.session() as session:
        adapter = session.scalars(select(SqlAdapter).where(SqlAdapter.owner_user_id == user_id)).first()
        if adapter is None:
            adapter = SqlAdapter(tenant_id=tenant_id, owner_user_id=user_id, name="default")
            session.add(adapter)
            session.flush()
        adapter.version_count += 1
        session.add(
            SqlAdapterVersion(
                adapter_id=adapter.id,
                number=adapter.version_count,
                blob_uri="file:///dev/null",
                sha256="0" * 64,
                size_bytes=0,
                base_fingerprint="test",
                rank=4,
                target_modules=["q_proj"],
                dataset_snapshot_id=snapshot_id,
            )
        )
