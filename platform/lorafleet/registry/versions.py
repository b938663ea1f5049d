"""The registry's version API (``Registry``): immutable versions, the movable ``live`` alias with history, rollback, lineage, GC.

A version is written blob first, then row: the two PEFT files are packed into one deterministic tar (same
folder content, same sha256), put in the object store, and only then is the row inserted, in a transaction
that also takes the next gap-free number. A crash in between leaves at most an orphan blob, which ``gc``
removes after a grace period; a row never points at a missing blob. Every method is tenant-scoped: another
tenant's ids raise ``NotFoundError`` with the same message as ids that do not exist.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.domain import (
    Adapter,
    AdapterVersion,
    AliasEvent,
    LineageRelation,
    VersionStatus,
)
from lorafleet.errors import (
    AlreadyExistsError,
    InvalidStateError,
    NotFoundError,
    ValidationError,
)
from lorafleet.registry.archive import ARCHIVE_MEMBERS, pack_adapter_archive, unpack_adapter_archive
from lorafleet.registry.gc import collect_unreferenced_blobs
from lorafleet.registry.lineage import Lineage, _distances, _node, _nodes, _with_qa_reports
from lorafleet.registry.peft_format import (
    DEFAULT_MAX_HEADER_BYTES,
    AdapterFiles,
    inspect_adapter_dir,
    load_adapter_tensors,
)
from lorafleet.registry.validation import (
    SETTABLE_STATUSES,
    _check_actor,
    _check_name,
    _check_routing_key,
    _check_target,
    _check_version_args,
    _check_weights_file,
    _json_dict,
    _target_modules,
)
from lorafleet.store.blob.base import BlobRef, BlobStore, sha256_file
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.store.sql.registry_repository import NewVersion, RegistryRepository, VersionLocation

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Registry:
    """Versions, the ``live`` alias and lineage over one metadata database and one object store.

    The object store holds adapter archives and QA report blobs: ``gc`` deletes every blob that no version
    row and no QA report references.
    """

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        gc_grace_seconds: int = 86400,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if gc_grace_seconds < 0:
            raise ValidationError("gc_grace_seconds must be >= 0")
        self._db = db
        self._blobs = blobs
        self._repo = RegistryRepository(dialect=db.dialect)
        self._gc_grace = timedelta(seconds=gc_grace_seconds)
        self._max_header_bytes = max_header_bytes

    @property
    def blobs(self) -> BlobStore:
        """The object store (QA writes its report blobs there, protected from ``gc`` by their rows)."""
        return self._blobs

    # --- adapters -----------------------------------------------------------------------------------------
    def create_adapter(
        self, *, tenant_id: int, owner_user_id: int | None, name: str, target_config: Mapping[str, Any]
    ) -> Adapter:
        """A new adapter of a user (or of the tenant, ``owner_user_id`` None); ``AlreadyExistsError`` if taken."""
        _check_name(name)
        config = _json_dict("target_config", target_config)
        with self._db.session() as s:
            self._repo.require_tenant(s, tenant_id=tenant_id)
            if owner_user_id is not None:
                self._repo.require_user(s, tenant_id=tenant_id, user_id=owner_user_id)
            return self._repo.insert_adapter(
                s, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name, target_config=config
            )

    def get_or_create_adapter(
        self, *, tenant_id: int, owner_user_id: int | None, name: str, target_config: Mapping[str, Any]
    ) -> Adapter:
        """The existing adapter of that owner and name, or a new one (safe against a concurrent create)."""
        found = self.find_adapter(tenant_id=tenant_id, owner_user_id=owner_user_id, name=name)
        if found is not None:
            return found
        try:
            return self.create_adapter(
                tenant_id=tenant_id, owner_user_id=owner_user_id, name=name, target_config=target_config
            )
        except AlreadyExistsError:
            found = self.find_adapter(tenant_id=tenant_id, owner_user_id=owner_user_id, name=name)
            if found is None:
                raise
            return found

    def get_adapter(self, *, tenant_id: int, adapter_id: int) -> Adapter:
        with self._db.session() as s:
            return self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id)

    def find_adapter(self, *, tenant_id: int, owner_user_id: int | None, name: str) -> Adapter | None:
        """The adapter by owner and name (``owner_user_id`` None = a task adapter), or None."""
        with self._db.session() as s:
            return self._repo.find_adapter(s, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name)

    def list_adapters(self, *, tenant_id: int, owner_user_id: int | None = None) -> list[Adapter]:
        """The tenant's adapters, or one user's (``NotFoundError`` for a user of another tenant)."""
        with self._db.session() as s:
            if owner_user_id is not None:
                self._repo.require_user(s, tenant_id=tenant_id, user_id=owner_user_id)
            return self._repo.list_adapters(s, tenant_id=tenant_id, owner_user_id=owner_user_id)

    # --- versions -----------------------------------------------------------------------------------------
    def register_version(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        adapter_dir: Path,
        base_fingerprint: str,
        parents: Sequence[tuple[int, LineageRelation]] = (),
        training_config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        job_id: int | None = None,
        dataset_snapshot_id: int | None = None,
        status: VersionStatus = VersionStatus.CANDIDATE,
        session: Session | None = None,
        routing_key: Sequence[float] | None = None,
    ) -> AdapterVersion:
        """Validate a PEFT folder, store it as one blob, then insert the next-numbered version row.

        ``parents`` are ``(parent_version_id, relation)`` pairs of the same tenant. Bad input is refused
        before anything is written; a crash after the blob write leaves only an orphan blob.

        With ``session`` (e.g. a job's fenced transaction) the checks and the row insert run in it and the
        caller commits, so the version commits together with whatever else that transaction writes. A
        version with ``job_id`` is registered at most once per adapter: registering it again returns the
        existing version (a re-run job), backed by a unique index on ``(adapter_id, job_id)``.
        ``routing_key`` is the centroid gate's key (``lorafleet.routing.routing_key``), stored with the row.
        """
        _check_version_args(base_fingerprint=base_fingerprint, parents=parents, status=status)
        key = None if routing_key is None else _check_routing_key(routing_key)
        config_json = _json_dict("training_config", training_config or {})
        metrics_json = _json_dict("metrics", metrics or {})
        with tempfile.TemporaryDirectory(prefix="lorafleet-register-") as tmp:
            files = self._stage(adapter_dir=Path(adapter_dir), staging=Path(tmp) / "adapter")
            archive = pack_adapter_archive(files=files, dest=Path(tmp) / "adapter.tar")
            sha256, size = sha256_file(archive)
            new = NewVersion(
                blob_uri=self._blobs.uri_for(sha256),
                sha256=sha256,
                size_bytes=size,
                base_fingerprint=base_fingerprint,
                rank=files.rank,
                target_modules=_target_modules(files),
                training_config=config_json,
                metrics=metrics_json,
                status=status,
                job_id=job_id,
                dataset_snapshot_id=dataset_snapshot_id,
                parents=tuple(parents),
                routing_key=key,
            )
            with self._session(session) as s:  # refuse foreign or missing ids before writing anything
                self._repo.check_references(s, tenant_id=tenant_id, adapter_id=adapter_id, new=new)
                self._repo.require_kind(s, tenant_id=tenant_id, adapter_id=adapter_id, kind="lora")
            self._blobs.put_file(archive)
            with self._session(session) as s:
                return self._insert_version(
                    s, tenant_id=tenant_id, adapter_id=adapter_id, new=new, archive=archive
                )

    def register_file_version(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        weights_file: Path,
        base_fingerprint: str,
        training_config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        job_id: int | None = None,
        dataset_snapshot_id: int | None = None,
    ) -> AdapterVersion:
        """Register one safetensors file (a learned gate's weights) as a version of a ``gate`` adapter.

        The rules of ``register_version``: the file is checked (header, finite values) before anything is
        written, the file itself is the blob (blob first, then row) and numbers are gap-free. The row has rank 0
        and no target modules; it is promoted, rolled back and garbage-collected like any version.
        """
        _check_version_args(base_fingerprint=base_fingerprint, parents=(), status=VersionStatus.CANDIDATE)
        with tempfile.TemporaryDirectory(prefix="lorafleet-register-") as tmp:
            staged = Path(tmp) / "weights.safetensors"
            shutil.copyfile(weights_file, staged)
            _check_weights_file(staged, max_header_bytes=self._max_header_bytes)
            sha256, size = sha256_file(staged)
            new = NewVersion(
                blob_uri=self._blobs.uri_for(sha256),
                sha256=sha256,
                size_bytes=size,
                base_fingerprint=base_fingerprint,
                rank=0,
                target_modules=(),
                training_config=_json_dict("training_config", training_config or {}),
                metrics=_json_dict("metrics", metrics or {}),
                status=VersionStatus.CANDIDATE,
                job_id=job_id,
                dataset_snapshot_id=dataset_snapshot_id,
                parents=(),
            )
            with self._db.session() as s:
                self._repo.check_references(s, tenant_id=tenant_id, adapter_id=adapter_id, new=new)
                self._repo.require_kind(s, tenant_id=tenant_id, adapter_id=adapter_id, kind="gate")
            self._blobs.put_file(staged)
            with self._db.session() as s:
                return self._insert_version(
                    s, tenant_id=tenant_id, adapter_id=adapter_id, new=new, archive=staged
                )

    def fetch_file_version(self, *, version: AdapterVersion, dest: Path) -> Path:
        """Download a file version's blob (sha256 and size verified) to ``dest``, atomically."""
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        return self._blobs.download(version.sha256, Path(dest), expected_size=version.size_bytes)

    def set_routing_key(self, *, tenant_id: int, version_id: int, key: Sequence[float]) -> None:
        """Store or replace a version's routing key (derived metadata, e.g. computed after an import)."""
        values = _check_routing_key(key)
        with self._db.session() as s:
            self._repo.set_routing_key(s, tenant_id=tenant_id, version_id=version_id, key=values)

    def put_adapter_blob(self, *, adapter_dir: Path) -> BlobRef:
        """Validate a PEFT folder and store its archive ahead of ``register_version``, which then finds the
        blob present: a caller can upload outside a short transaction and register inside it."""
        with tempfile.TemporaryDirectory(prefix="lorafleet-register-") as tmp:
            files = self._stage(adapter_dir=Path(adapter_dir), staging=Path(tmp) / "adapter")
            return self._blobs.put_file(pack_adapter_archive(files=files, dest=Path(tmp) / "adapter.tar"))

    @contextmanager
    def _session(self, session: Session | None) -> Iterator[Session]:
        """The caller's session (which the caller commits), or a new one that commits on exit."""
        if session is not None:
            yield session
            return
        with self._db.session() as own:
            yield own

    def _stage(self, *, adapter_dir: Path, staging: Path) -> AdapterFiles:
        """Check the folder, copy its two files aside and validate the copy fully (header, finite tensors),
        so the bytes archived are exactly the bytes validated even if the folder changes meanwhile."""
        inspect_adapter_dir(adapter_dir, max_header_bytes=self._max_header_bytes)  # refuses pickle files
        staging.mkdir()
        for name in ARCHIVE_MEMBERS:
            shutil.copyfile(adapter_dir / name, staging / name)
        files = inspect_adapter_dir(staging, max_header_bytes=self._max_header_bytes)
        load_adapter_tensors(files)
        return files

    def _insert_version(
        self, s: Session, *, tenant_id: int, adapter_id: int, new: NewVersion, archive: Path
    ) -> AdapterVersion:
        self._repo.lock_blobs(s, exclusive=False)
        if not self._blobs.exists(new.sha256):  # a GC removed an old identical orphan meanwhile
            self._blobs.put_file(archive)
        self._repo.check_references(s, tenant_id=tenant_id, adapter_id=adapter_id, new=new)
        if new.job_id is not None:  # the adapter's lock orders concurrent registrations of one job
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            existing = self._repo.version_for_job(s, adapter_id=adapter_id, job_id=new.job_id)
            if existing is not None:
                return existing
        number = self._repo.next_version_number(s, tenant_id=tenant_id, adapter_id=adapter_id)
        return self._repo.insert_version(s, adapter_id=adapter_id, number=number, new=new)

    def get_version(self, *, tenant_id: int, adapter_id: int, number: int) -> AdapterVersion:
        with self._db.session() as s:
            return self._repo.get_version(s, tenant_id=tenant_id, adapter_id=adapter_id, number=number)

    def get_version_by_id(self, *, tenant_id: int, version_id: int) -> AdapterVersion:
        with self._db.session() as s:
            return self._repo.get_version_by_id(s, tenant_id=tenant_id, version_id=version_id)

    def find_version_by_job(self, *, tenant_id: int, adapter_id: int, job_id: int) -> AdapterVersion | None:
        """The version a job registered for the adapter, or None (there is at most one)."""
        with self._db.session() as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id)
            return self._repo.version_for_job(s, adapter_id=adapter_id, job_id=job_id)

    def list_versions(
        self, *, tenant_id: int, adapter_id: int, status: VersionStatus | None = None
    ) -> list[AdapterVersion]:
        """The adapter's versions by number, optionally only those with ``status``."""
        with self._db.session() as s:
            return self._repo.list_versions(s, tenant_id=tenant_id, adapter_id=adapter_id, status=status)

    def set_status(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        number: int,
        status: VersionStatus,
        session: Session | None = None,
    ) -> AdapterVersion:
        """Mark a version candidate, rejected (QA) or archived; the live version only moves via the alias, and a
        ``corrupt`` version keeps its status (``mark_corrupt``). With ``session`` (a job's fenced transaction) it
        runs there and the caller commits."""
        if status not in SETTABLE_STATUSES:
            raise ValidationError(f"status {str(status)!r} cannot be set directly (use promote for live)")
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            version = self._repo.get_version(s, tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            if version.status == VersionStatus.CORRUPT:
                raise InvalidStateError(
                    f"version {number} is corrupt (quarantined); its status cannot change"
                )
            live = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            if live is not None and live.id == version.id:
                raise InvalidStateError(f"version {number} is live; move the alias first")
            self._repo.update_status(s, version_id=version.id, status=status)
        return replace(version, status=status)

    def mark_corrupt(
        self, *, tenant_id: int, adapter_id: int, version_id: int, session: Session | None = None
    ) -> AdapterVersion:
        """Quarantine a version whose blob failed verification: its status becomes ``corrupt`` for good, so it is
        never served and never a promote or rollback target. A live version is refused (``InvalidStateError``):
        move the alias off it first, in the same transaction (``lorafleet.workflows.blob_verify`` does both).
        With ``session`` it runs there and the caller commits."""
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            version = self._repo.get_version_by_id(s, tenant_id=tenant_id, version_id=version_id)
            if version.adapter_id != adapter_id:
                raise NotFoundError(f"version {version_id} not found")
            live = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            if live is not None and live.id == version.id:
                raise InvalidStateError(f"version {version.number} is live; move the alias first")
            self._repo.update_status(s, version_id=version.id, status=VersionStatus.CORRUPT)
        return replace(version, status=VersionStatus.CORRUPT)

    def scan_versions(
        self, *, tenant_id: int | None, after_id: int = 0, limit: int = 500
    ) -> list[VersionLocation]:
        """Versions with an id above ``after_id`` (by id, at most ``limit``) with their tenant, adapter and owner:
        one tenant's, or with ``tenant_id`` None every tenant's (an operator's scan, e.g. ``lorafleet verify``)."""
        if limit < 1:
            raise ValidationError("limit must be >= 1")
        with self._db.session() as s:
            if tenant_id is not None:
                self._repo.require_tenant(s, tenant_id=tenant_id)
            return self._repo.scan_versions(s, tenant_id=tenant_id, after_id=after_id, limit=limit)

    # --- the live alias -----------------------------------------------------------------------------------
    def live_version(self, *, tenant_id: int, adapter_id: int) -> AdapterVersion | None:
        """The version ``live`` points at, or None for "no adapter" (one indexed query)."""
        with self._db.session() as s:
            return self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)

    def promote(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        number: int,
        actor: str,
        reason: str = "",
        session: Session | None = None,
        forced: bool = False,
    ) -> AliasEvent:
        """Move ``live`` to version ``number`` (previous live becomes archived) and record the move; with
        ``session`` (a job's fenced transaction) it runs there and the caller commits. ``forced`` is recorded
        in the history: a person made live a version QA had not passed (the rule that needs it is the
        workflow's, ``lorafleet.workflows.live_alias.promote_manually``; the registry only records it)."""
        _check_actor(actor)
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            target = self._repo.get_version(s, tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            current = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            _check_target(target=target, current=current)
            return self._repo.move_live(
                s,
                adapter_id=adapter_id,
                current=current,
                target=target,
                actor=actor,
                reason=reason,
                forced=forced,
            )

    def rollback(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        to_number: int | None,
        actor: str,
        reason: str = "",
        session: Session | None = None,
    ) -> AliasEvent:
        """Move ``live`` back to an earlier version than the current live one, or to None (no adapter); with
        ``session`` it runs in the caller's transaction."""
        _check_actor(actor)
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            current = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            if current is None:
                raise InvalidStateError(f"adapter {adapter_id} has no live version to roll back from")
            target = None
            if to_number is not None:
                target = self._repo.get_version(
                    s, tenant_id=tenant_id, adapter_id=adapter_id, number=to_number
                )
                if target.number >= current.number:
                    raise InvalidStateError(
                        f"rollback must go to a version earlier than live ({current.number}); use promote"
                    )
                _check_target(target=target, current=current)
            return self._repo.move_live(
                s, adapter_id=adapter_id, current=current, target=target, actor=actor, reason=reason
            )

    def alias_history(self, *, tenant_id: int, adapter_id: int) -> list[AliasEvent]:
        """Every move of ``live``, oldest first."""
        with self._db.session() as s:
            return self._repo.alias_history(s, tenant_id=tenant_id, adapter_id=adapter_id)

    # --- lineage ------------------------------------------------------------------------------------------
    def lineage(self, *, tenant_id: int, version_id: int, depth: int | None = None) -> Lineage:
        """Ancestors and descendants of a version (up to ``depth`` edges away; None = all), with the edges
        between them and each node's dataset snapshot, job and QA reports."""
        if depth is not None and depth < 0:
            raise ValidationError("depth must be >= 0")
        with self._db.session() as s:
            self._repo.get_version_by_id(s, tenant_id=tenant_id, version_id=version_id)
            up = self._repo.lineage_edges(s, version_id=version_id, direction="ancestors")
            down = self._repo.lineage_edges(s, version_id=version_id, direction="descendants")
            up_dist = _distances(version_id, ((e.child_version_id, e.parent_version_id) for e in up), depth)
            down_dist = _distances(
                version_id, ((e.parent_version_id, e.child_version_id) for e in down), depth
            )
            rows = self._repo.lineage_nodes(s, tenant_id=tenant_id, version_ids={**up_dist, **down_dist})
            reports = QARepository(dialect=self._db.dialect).reports_for_versions(
                s, tenant_id=tenant_id, version_ids=[v.id for v, _, _ in rows]
            )
        nodes = {v.id: (v, snap, job) for v, snap, job in rows}
        kept = set(nodes)
        edges = {e for e in (*up, *down) if e.child_version_id in kept and e.parent_version_id in kept}
        lineage = Lineage(
            root=_node(nodes[version_id], 0),
            ancestors=_nodes(nodes, up_dist, exclude=version_id),
            descendants=_nodes(nodes, down_dist, exclude=version_id),
            edges=tuple(sorted(edges, key=lambda e: (e.child_version_id, e.parent_version_id))),
        )
        return _with_qa_reports(lineage, reports)

    # --- blobs --------------------------------------------------------------------------------------------
    def fetch_version(self, *, version: AdapterVersion, dest_dir: Path) -> Path:
        """Download a version's blob (sha256 and size verified) and unpack its two files into ``dest_dir``."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lorafleet-fetch-") as tmp:
            archive = self._blobs.download(
                version.sha256, Path(tmp) / "adapter.tar", expected_size=version.size_bytes
            )
            unpack_adapter_archive(archive=archive, dest_dir=dest_dir)
        return dest_dir

    def gc(self, *, now: datetime | None = None) -> list[str]:
        """Delete blobs that no version row or QA report references and that are older than the grace period;
        returns their digests. Each deletion re-checks under the blob lock, so a registration is never undercut."""
        cutoff = (now or datetime.now(UTC)) - self._gc_grace
        return collect_unreferenced_blobs(self._db, self._blobs, self._repo, cutoff=cutoff)


__all__ = [
    "Registry",
]
