"""The adapter registry: immutable versions, the movable ``live`` alias with history, rollback, lineage, GC.

A version is written blob first, then row: the two PEFT files are packed into one deterministic tar (same
folder content, same sha256), put in the object store, and only then is the row inserted, in a transaction
that also takes the next gap-free number. A crash in between leaves at most an orphan blob, which ``gc``
removes after a grace period; a row never points at a missing blob. Every method is tenant-scoped: another
tenant's ids raise ``NotFoundError`` with the same message as ids that do not exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters.peft_format import (
    CONFIG_FILE,
    DEFAULT_MAX_HEADER_BYTES,
    WEIGHTS_FILE,
    AdapterFiles,
    inspect_adapter_dir,
    load_adapter_tensors,
    read_safetensors_header,
)
from lorafleet.domain import (
    Adapter,
    AdapterVersion,
    AliasEvent,
    DatasetSnapshot,
    Job,
    JobState,
    LineageEdge,
    LineageRelation,
    VersionStatus,
)
from lorafleet.domain.enums import values as enum_values
from lorafleet.errors import (
    AdapterFormatError,
    AlreadyExistsError,
    BlobNotFoundError,
    InvalidStateError,
    NonFiniteError,
    ValidationError,
)
from lorafleet.store.blob.base import BlobRef, BlobStore, sha256_file
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QAReport, QARepository
from lorafleet.store.sql.registry_repository import NewVersion, RegistryRepository

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

ARCHIVE_MEMBERS = (CONFIG_FILE, WEIGHTS_FILE)
MAX_ROUTING_KEY_LENGTH = 65536
#: Statuses a version may be registered with or set to directly; ``live`` only comes from ``promote``.
SETTABLE_STATUSES = frozenset({VersionStatus.CANDIDATE, VersionStatus.REJECTED, VersionStatus.ARCHIVED})
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")


@dataclass(frozen=True)
class JobSummary:
    """The job that produced a version, without its payload (which may name other users)."""

    id: int
    kind: str
    state: JobState
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class LineageNode:
    """One version in a lineage, ``distance`` edges from the queried version, with what produced it."""

    version: AdapterVersion
    distance: int
    dataset_snapshot: DatasetSnapshot | None
    job: JobSummary | None
    #: the QA runs on this version, oldest first (``lorafleet.qa``)
    qa_reports: tuple[QAReport, ...] = ()


@dataclass(frozen=True)
class Lineage:
    """A version's ancestors and descendants (nearest first) and the edges between all of them."""

    root: LineageNode
    ancestors: tuple[LineageNode, ...]
    descendants: tuple[LineageNode, ...]
    edges: tuple[LineageEdge, ...]


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
        """Mark a version candidate, rejected (QA) or archived; the live version only moves via the alias.
        With ``session`` (a job's fenced transaction) it runs there and the caller commits."""
        if status not in SETTABLE_STATUSES:
            raise ValidationError(f"status {str(status)!r} cannot be set directly (use promote for live)")
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            version = self._repo.get_version(s, tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            live = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            if live is not None and live.id == version.id:
                raise InvalidStateError(f"version {number} is live; move the alias first")
            self._repo.update_status(s, version_id=version.id, status=status)
        return replace(version, status=status)

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
    ) -> AliasEvent:
        """Move ``live`` to version ``number`` (previous live becomes archived) and record the move; with
        ``session`` (a job's fenced transaction) it runs there and the caller commits."""
        _check_actor(actor)
        with self._session(session) as s:
            self._repo.get_adapter(s, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
            target = self._repo.get_version(s, tenant_id=tenant_id, adapter_id=adapter_id, number=number)
            current = self._repo.live_version(s, tenant_id=tenant_id, adapter_id=adapter_id)
            _check_target(target=target, current=current)
            return self._repo.move_live(
                s, adapter_id=adapter_id, current=current, target=target, actor=actor, reason=reason
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
        old = {info.sha256 for info in self._blobs.list() if _aware(info.modified_at) < cutoff}
        with self._db.session() as s:
            unreferenced = old - self._repo.referenced_sha256s(s, digests=old)
        return sorted(sha for sha in unreferenced if self._delete_if_unreferenced(sha))

    def _delete_if_unreferenced(self, sha256: str) -> bool:
        with self._db.session() as s:
            self._repo.lock_blobs(s, exclusive=True)
            if self._repo.referenced_sha256s(s, digests=[sha256]):
                return False
            try:
                self._blobs.delete(sha256)
            except BlobNotFoundError:
                return False
        return True


# --- the archive format ----------------------------------------------------------------------------------
def pack_adapter_archive(*, files: AdapterFiles, dest: Path) -> Path:
    """Write the two PEFT files as an uncompressed ustar archive with sorted names, mtime 0 and owner 0,
    so the same folder content always yields the same bytes (and the same sha256)."""
    with tarfile.open(dest, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(ARCHIVE_MEMBERS):
            path = files.directory / name
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)
    return dest


def unpack_adapter_archive(*, archive: Path, dest_dir: Path) -> None:
    """Extract exactly the two expected regular files (no paths, links or extras), each atomically."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            _extract_members(tar, dest_dir)
    except tarfile.TarError as exc:
        raise AdapterFormatError(f"adapter archive cannot be read ({exc})") from exc


def _extract_members(tar: tarfile.TarFile, dest_dir: Path) -> None:
    members = tar.getmembers()
    names = [m.name for m in members]
    if sorted(names) != sorted(ARCHIVE_MEMBERS) or not all(m.isreg() for m in members):
        raise AdapterFormatError(f"adapter archive holds unexpected entries {names!r}")
    for member in members:
        source = tar.extractfile(member)
        if source is None:
            raise AdapterFormatError(f"adapter archive entry {member.name!r} is not a file")
        partial = dest_dir / f".{member.name}.partial"
        with source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(partial, dest_dir / member.name)


# --- checks and small helpers ----------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if not name or len(name) > 128 or name != name.strip():
        raise ValidationError("adapter name must be 1-128 characters without surrounding spaces")


def _check_actor(actor: str) -> None:
    if not actor or len(actor) > 256:
        raise ValidationError("actor must be 1-256 characters")


def _check_version_args(
    *, base_fingerprint: str, parents: Sequence[tuple[int, LineageRelation]], status: str
) -> None:
    if not base_fingerprint or len(base_fingerprint) > 128:
        raise ValidationError("base_fingerprint must be 1-128 characters")
    if status not in SETTABLE_STATUSES:
        raise ValidationError(f"a new version cannot be {str(status)!r} (register, then promote)")
    relations = enum_values(LineageRelation)
    for _, relation in parents:
        if relation not in relations:
            raise ValidationError(f"lineage relation {str(relation)!r} is not one of {relations}")
    if len({parent for parent, _ in parents}) != len(parents):
        raise ValidationError("a parent version is listed twice")


def _check_routing_key(key: Sequence[float]) -> tuple[float, ...]:
    """A non-empty, finite, non-zero vector of at most ``MAX_ROUTING_KEY_LENGTH`` floats."""
    try:
        values = tuple(float(v) for v in key)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"routing key must be a sequence of numbers: {exc}") from exc
    if not 0 < len(values) <= MAX_ROUTING_KEY_LENGTH:
        raise ValidationError(f"routing key must have 1-{MAX_ROUTING_KEY_LENGTH} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values) or not any(values):
        raise ValidationError("routing key must be finite and not all zero")
    return values


def _check_weights_file(path: Path, *, max_header_bytes: int) -> None:
    """A safetensors file (never pickle) with at least one tensor, all floating values finite."""
    import torch
    from safetensors.torch import load_file

    header = read_safetensors_header(path, max_header_bytes=max_header_bytes)
    if not [k for k in header if k != "__metadata__"]:
        raise AdapterFormatError(f"{path.name} holds no tensors")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise AdapterFormatError(f"{path.name}: cannot be read ({exc})") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} contains NaN or infinity")


def _check_target(*, target: AdapterVersion, current: AdapterVersion | None) -> None:
    if target.status == VersionStatus.REJECTED:
        raise InvalidStateError(f"version {target.number} was rejected and cannot go live")
    if current is not None and current.id == target.id:
        raise InvalidStateError(f"version {target.number} is already live")


def _json_dict(what: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (no NaN/inf, string keys), refused up front rather than failing in the database."""
    try:
        return dict(json.loads(json.dumps(dict(value), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be JSON (finite numbers, string keys): {exc}") from exc


def _target_modules(files: AdapterFiles) -> tuple[str, ...]:
    """The config's list, or for a regex ``target_modules`` the module names the tensors actually adapt."""
    configured = files.target_modules
    if isinstance(configured, list):
        return tuple(str(m) for m in configured)
    found = set()
    for key in files.tensor_index:
        for marker in _LORA_MARKERS:
            if marker in key:
                found.add(key.split(marker)[0].rsplit(".", 1)[-1])
    return tuple(sorted(found)) or (configured,)


def _distances(root: int, links: Iterable[tuple[int, int]], depth: int | None) -> dict[int, int]:
    """Breadth-first distance from ``root`` over ``(from, to)`` links, up to ``depth``."""
    nexts: dict[int, list[int]] = {}
    for src, dst in links:
        nexts.setdefault(src, []).append(dst)
    dist, queue = {root: 0}, deque([root])
    while queue:
        here = queue.popleft()
        if depth is not None and dist[here] >= depth:
            continue
        for there in nexts.get(here, ()):
            if there not in dist:
                dist[there] = dist[here] + 1
                queue.append(there)
    return dist


def _nodes(
    nodes: Mapping[int, tuple[AdapterVersion, DatasetSnapshot | None, Job | None]],
    dist: Mapping[int, int],
    *,
    exclude: int,
) -> tuple[LineageNode, ...]:
    ids = sorted((d, i) for i, d in dist.items() if i != exclude and i in nodes)
    return tuple(_node(nodes[i], d) for d, i in ids)


def _node(row: tuple[AdapterVersion, DatasetSnapshot | None, Job | None], distance: int) -> LineageNode:
    version, snapshot, job = row
    summary = (
        None if job is None else JobSummary(job.id, job.kind, job.state, job.created_at, job.finished_at)
    )
    return LineageNode(version=version, distance=distance, dataset_snapshot=snapshot, job=summary)


def _with_qa_reports(lineage: Lineage, reports: Mapping[int, Sequence[QAReport]]) -> Lineage:
    def attach(node: LineageNode) -> LineageNode:
        return replace(node, qa_reports=tuple(reports.get(node.version.id, ())))

    return replace(
        lineage,
        root=attach(lineage.root),
        ancestors=tuple(attach(n) for n in lineage.ancestors),
        descendants=tuple(attach(n) for n in lineage.descendants),
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


__all__ = [
    "JobSummary",
    "Lineage",
    "LineageNode",
    "Registry",
    "pack_adapter_archive",
    "unpack_adapter_archive",
]
