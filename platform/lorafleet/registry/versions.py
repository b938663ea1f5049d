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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lorafleet.domain import (
    FINAL_STATUSES,
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
from lorafleet.registry.gc import collect_unreferenced_blobs, delete_if_unreferenced
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
    def gc_grace(self) -> timedelta:
        """How long an unreferenced blob is kept before the gc deletes it (and a deletion's blobs are held)."""
        return self._gc_grace

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
        with self._db.unit_of_work():
            self._require_owner(tenant_id=tenant_id, owner_user_id=owner_user_id)
            return self._db.run(
                self._repo.insert_adapter,
                tenant_id=tenant_id,
                owner_user_id=owner_user_id,
                name=name,
                target_config=config,
            )

    def get_or_create_adapter(
        self, *, tenant_id: int, owner_user_id: int | None, name: str, target_config: Mapping[str, Any]
    ) -> Adapter:
        """The existing adapter of that owner and name, or a new one (safe against a concurrent create). A new
        row commits on its own, also inside an open transaction, so it outlives that transaction (an import's
        task adapter stays when its version is rolled back)."""
        with self._db.outside_transaction():
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
        return self._db.run(self._repo.get_adapter, tenant_id=tenant_id, adapter_id=adapter_id)

    def find_adapter(self, *, tenant_id: int, owner_user_id: int | None, name: str) -> Adapter | None:
        """The adapter by owner and name (``owner_user_id`` None = a task adapter), or None (a read-only
        transaction: the API looks adapters up per request)."""
        return self._db.read(
            self._repo.find_adapter, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name
        )

    def list_adapters(self, *, tenant_id: int, owner_user_id: int | None = None) -> list[Adapter]:
        """The tenant's adapters, or one user's (``NotFoundError`` for a user of another tenant)."""
        with self._db.unit_of_work():
            if owner_user_id is not None:
                self._db.run(self._repo.require_user, tenant_id=tenant_id, user_id=owner_user_id)
            return self._db.run(self._repo.list_adapters, tenant_id=tenant_id, owner_user_id=owner_user_id)

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
        routing_key: Sequence[float] | None = None,
        routing_claim: Sequence[float] | None = None,
    ) -> AdapterVersion:
        """Validate a PEFT folder, store it as one blob, then insert the next-numbered version row.

        ``parents`` are ``(parent_version_id, relation)`` pairs of the same tenant. Bad input is refused
        before anything is written; a crash after the blob write leaves only an orphan blob.

        Inside an open transaction (``Database.unit_of_work()``, e.g. a job's fenced block) the checks and the
        row insert join it, so the version commits together with whatever else that transaction writes. A
        version with ``job_id`` is registered at most once per adapter: registering it again returns the
        existing version (a re-run job), backed by a unique index on ``(adapter_id, job_id)``.
        ``routing_key`` is the centroid gate's key (``lorafleet.routing.routing_key``) and ``routing_claim`` the gate's
        probe for the base side (``routing.embeddings.fit_claim``), stored with the row.
        """
        _check_version_args(base_fingerprint=base_fingerprint, parents=parents, status=status)
        key = None if routing_key is None else _check_routing_key(routing_key)
        claim = None if routing_claim is None else _check_routing_key(routing_claim, what="routing claim")
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
                routing_claim=claim,
            )
            return self._store(tenant_id=tenant_id, adapter_id=adapter_id, kind="lora", new=new, blob=archive)

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
            return self._store(tenant_id=tenant_id, adapter_id=adapter_id, kind="gate", new=new, blob=staged)

    def fetch_file_version(self, *, version: AdapterVersion, dest: Path) -> Path:
        """Download a file version's blob (sha256 and size verified) to ``dest``, atomically."""
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        return self._blobs.download(version.sha256, Path(dest), expected_size=version.size_bytes)

    def set_routing_key(
        self,
        *,
        tenant_id: int,
        version_id: int,
        key: Sequence[float],
        claim: Sequence[float] | None = None,
    ) -> None:
        """Store or replace a version's routing key and, when given, its routing claim (derived metadata, e.g.
        computed after an import)."""
        values = _check_routing_key(key)
        claimed = None if claim is None else _check_routing_key(claim, what="routing claim")
        self._db.run(
            self._repo.set_routing_key, tenant_id=tenant_id, version_id=version_id, key=values, claim=claimed
        )

    def put_adapter_blob(self, *, adapter_dir: Path) -> BlobRef:
        """Validate a PEFT folder and store its archive ahead of ``register_version``, which then finds the
        blob present: a caller can upload outside a short transaction and register inside it."""
        with tempfile.TemporaryDirectory(prefix="lorafleet-register-") as tmp:
            files = self._stage(adapter_dir=Path(adapter_dir), staging=Path(tmp) / "adapter")
            return self._blobs.put_file(pack_adapter_archive(files=files, dest=Path(tmp) / "adapter.tar"))

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

    def _require_owner(self, *, tenant_id: int, owner_user_id: int | None) -> None:
        """``NotFoundError`` unless the tenant exists and ``owner_user_id`` (if any) is one of its users."""
        self._db.run(self._repo.require_tenant, tenant_id=tenant_id)
        if owner_user_id is not None:
            self._db.run(self._repo.require_user, tenant_id=tenant_id, user_id=owner_user_id)

    def _store(
        self, *, tenant_id: int, adapter_id: int, kind: str, new: NewVersion, blob: Path
    ) -> AdapterVersion:
        """Refuse foreign or missing ids (and an adapter of another ``kind``) before writing anything, then
        put the blob, then insert the row."""
        with self._db.unit_of_work():
            self._db.run(self._repo.check_references, tenant_id=tenant_id, adapter_id=adapter_id, new=new)
            self._db.run(self._repo.require_kind, tenant_id=tenant_id, adapter_id=adapter_id, kind=kind)
        self._blobs.put_file(blob)
        with self._db.unit_of_work():
            return self._insert_version(tenant_id=tenant_id, adapter_id=adapter_id, new=new, archive=blob)

    def _insert_version(
        self, *, tenant_id: int, adapter_id: int, new: NewVersion, archive: Path
    ) -> AdapterVersion:
        db, repo = self._db, self._repo
        db.run(repo.lock_blobs, exclusive=False)
        if not self._blobs.exists(new.sha256):  # a GC removed an old identical orphan meanwhile
            self._blobs.put_file(archive)
        db.run(repo.check_references, tenant_id=tenant_id, adapter_id=adapter_id, new=new)
        if new.job_id is not None:  # the adapter's lock orders concurrent registrations of one job
            db.run(repo.get_adapter, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            existing = db.run(repo.version_for_job, adapter_id=adapter_id, job_id=new.job_id)
            if existing is not None:
                return existing
        number = db.run(repo.next_version_number, tenant_id=tenant_id, adapter_id=adapter_id)
        return db.run(repo.insert_version, adapter_id=adapter_id, number=number, new=new)

    def get_version(self, *, tenant_id: int, adapter_id: int, number: int) -> AdapterVersion:
        return self._db.run(self._repo.get_version, tenant_id=tenant_id, adapter_id=adapter_id, number=number)

    def get_version_by_id(self, *, tenant_id: int, version_id: int) -> AdapterVersion:
        """A version by id (read-only: serving loads learned gates by it)."""
        return self._db.read(self._repo.get_version_by_id, tenant_id=tenant_id, version_id=version_id)

    def find_version_by_job(self, *, tenant_id: int, adapter_id: int, job_id: int) -> AdapterVersion | None:
        """The version a job registered for the adapter, or None (there is at most one)."""
        with self._db.unit_of_work():
            self._db.run(self._repo.get_adapter, tenant_id=tenant_id, adapter_id=adapter_id)
            return self._db.run(self._repo.version_for_job, adapter_id=adapter_id, job_id=job_id)

    def list_versions(
        self, *, tenant_id: int, adapter_id: int, status: VersionStatus | None = None
    ) -> list[AdapterVersion]:
        """The adapter's versions by number, optionally only those with ``status``."""
        return self._db.run(
            self._repo.list_versions, tenant_id=tenant_id, adapter_id=adapter_id, status=status
        )

    def set_status(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        number: int,
        status: VersionStatus,
    ) -> AdapterVersion:
        """Mark a version candidate, rejected (QA) or archived; the live version only moves via the alias, and a
        ``corrupt`` or ``revoked`` version keeps its status (final). Joins the open transaction, if any (e.g. a
        job's fenced block)."""
        if status not in SETTABLE_STATUSES:
            raise ValidationError(f"status {str(status)!r} cannot be set directly (use promote for live)")
        with self._db.unit_of_work():
            _adapter, live = self._db.run(self._repo.lock_live, tenant_id=tenant_id, adapter_id=adapter_id)
            version = self.get_version(tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            if version.status in FINAL_STATUSES:
                raise InvalidStateError(
                    f"version {number} is {version.status} (final); its status cannot change"
                )
            return self._update_status(version, live=live, status=status)

    def mark_corrupt(self, *, tenant_id: int, adapter_id: int, version_id: int) -> AdapterVersion:
        """Quarantine a version whose blob failed verification: its status becomes ``corrupt`` for good, so it is
        never served and never a promote or rollback target. A live version is refused (``InvalidStateError``):
        move the alias off it first, in the same transaction (``lorafleet.workflows.blob_verify`` does both).
        Joins the open transaction, if any."""
        with self._db.unit_of_work():
            _adapter, live = self._db.run(self._repo.lock_live, tenant_id=tenant_id, adapter_id=adapter_id)
            version = self._db.run(self._repo.get_version_by_id, tenant_id=tenant_id, version_id=version_id)
            if version.adapter_id != adapter_id:
                raise NotFoundError(f"version {version_id} not found")
            return self._update_status(version, live=live, status=VersionStatus.CORRUPT)

    def _update_status(
        self, version: AdapterVersion, *, live: AdapterVersion | None, status: VersionStatus
    ) -> AdapterVersion:
        """Store ``status`` on ``version``, which must not be the live one (checked under the adapter's lock)."""
        if live is not None and live.id == version.id:
            raise InvalidStateError(f"version {version.number} is live; move the alias first")
        self._db.run(self._repo.update_status, version_id=version.id, status=status)
        return replace(version, status=status)

    def scan_versions(
        self, *, tenant_id: int | None, after_id: int = 0, limit: int = 500
    ) -> list[VersionLocation]:
        """Versions with an id above ``after_id`` (by id, at most ``limit``) with their tenant, adapter and owner:
        one tenant's, or with ``tenant_id`` None every tenant's (an operator's scan, e.g. ``lorafleet verify``)."""
        if limit < 1:
            raise ValidationError("limit must be >= 1")
        with self._db.unit_of_work():
            if tenant_id is not None:
                self._db.run(self._repo.require_tenant, tenant_id=tenant_id)
            return self._db.run(self._repo.scan_versions, tenant_id=tenant_id, after_id=after_id, limit=limit)

    # --- the live alias -----------------------------------------------------------------------------------
    def live_version(self, *, tenant_id: int, adapter_id: int) -> AdapterVersion | None:
        """The version ``live`` points at, or None for "no adapter" (one indexed query)."""
        return self._db.run(self._repo.live_version, tenant_id=tenant_id, adapter_id=adapter_id)

    def promote(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        number: int,
        actor: str,
        reason: str = "",
        forced: bool = False,
    ) -> AliasEvent:
        """Move ``live`` to version ``number`` (previous live becomes archived) and record the move; joins the open
        transaction, if any (e.g. a job's fenced block). ``forced`` is recorded
        in the history: a person made live a version QA had not passed (the rule that needs it is the
        workflow's, ``lorafleet.workflows.live_alias.promote_manually``; the registry only records it)."""
        _check_actor(actor)

        def to_number(current: AdapterVersion | None) -> AdapterVersion:
            target = self.get_version(tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            _check_target(target=target, current=current)
            return target

        return self._move_live(
            tenant_id=tenant_id,
            adapter_id=adapter_id,
            target=to_number,
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
    ) -> AliasEvent:
        """Move ``live`` back to an earlier version than the current live one, or to None (no adapter); joins the
        open transaction, if any."""
        _check_actor(actor)

        def earlier(current: AdapterVersion | None) -> AdapterVersion | None:
            if current is None:
                raise InvalidStateError(f"adapter {adapter_id} has no live version to roll back from")
            if to_number is None:
                return None
            target = self.get_version(tenant_id=tenant_id, adapter_id=adapter_id, number=to_number)
            if target.number >= current.number:
                raise InvalidStateError(
                    f"rollback must go to a version earlier than live ({current.number}); use promote"
                )
            _check_target(target=target, current=current)
            return target

        return self._move_live(
            tenant_id=tenant_id, adapter_id=adapter_id, target=earlier, actor=actor, reason=reason
        )

    def _move_live(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        target: Callable[[AdapterVersion | None], AdapterVersion | None],
        actor: str,
        reason: str,
        forced: bool = False,
    ) -> AliasEvent:
        """Under the adapter's lock, move ``live`` from the current version to ``target(current)`` (which checks the
        move and raises to refuse it) and record the move, in one transaction (the caller's when one is open)."""
        with self._db.unit_of_work():
            _adapter, current = self._db.run(self._repo.lock_live, tenant_id=tenant_id, adapter_id=adapter_id)
            return self._db.run(
                self._repo.move_live,
                adapter_id=adapter_id,
                current=current,
                target=target(current),
                actor=actor,
                reason=reason,
                forced=forced,
            )

    def alias_history(self, *, tenant_id: int, adapter_id: int) -> list[AliasEvent]:
        """Every move of ``live``, oldest first."""
        return self._db.run(self._repo.alias_history, tenant_id=tenant_id, adapter_id=adapter_id)

    # --- lineage ------------------------------------------------------------------------------------------
    def lineage(self, *, tenant_id: int, version_id: int, depth: int | None = None) -> Lineage:
        """Ancestors and descendants of a version (up to ``depth`` edges away; None = all), with the edges
        between them and each node's dataset snapshot, job and QA reports."""
        if depth is not None and depth < 0:
            raise ValidationError("depth must be >= 0")
        db, repo = self._db, self._repo
        with db.unit_of_work():
            db.run(repo.get_version_by_id, tenant_id=tenant_id, version_id=version_id)
            up = db.run(repo.lineage_edges, version_id=version_id, direction="ancestors")
            down = db.run(repo.lineage_edges, version_id=version_id, direction="descendants")
            up_dist = _distances(version_id, ((e.child_version_id, e.parent_version_id) for e in up), depth)
            down_dist = _distances(
                version_id, ((e.parent_version_id, e.child_version_id) for e in down), depth
            )
            rows = db.run(repo.lineage_nodes, tenant_id=tenant_id, version_ids={**up_dist, **down_dist})
            reports = db.run(
                QARepository(dialect=db.dialect).reports_for_versions,
                tenant_id=tenant_id,
                version_ids=[v.id for v, _, _ in rows],
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
        """Delete blobs nothing needs any more that are older than the grace period, and those a deletion receipt
        held until a moment now passed (``lorafleet.registry.gc``); returns their digests. Each deletion re-checks
        under the blob lock, so a registration is never undercut."""
        now = now or datetime.now(UTC)
        return collect_unreferenced_blobs(
            self._db, self._blobs, self._repo, cutoff=now - self._gc_grace, now=now
        )

    def delete_unreferenced_now(self, digests: Iterable[str], *, now: datetime | None = None) -> list[str]:
        """Delete these blobs at once, each unless something still needs it (a deletion's ``purge``: its
        receipt's hold ends ``now``); returns the digests deleted."""
        now = now or datetime.now(UTC)
        return sorted(
            sha
            for sha in set(digests)
            if delete_if_unreferenced(self._db, self._blobs, self._repo, sha, now=now)
        )


__all__ = [
    "Registry",
]
