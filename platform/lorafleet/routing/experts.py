"""A user's experts: the live versions of the user's own adapters plus the tenant's task adapters they are enrolled in.

The bank changes when a version is promoted or rolled back, when an enrolment changes, when a member's routing
key is set, or when the user's gate settings change; ``ExpertSet.revision`` (a hash of all of that) changes with
it, so a serving cache keyed by revision never routes over a stale bank.

An unknown user (no row yet) gets an empty bank and the default gate: a brand-new user is answered by the base
model rather than refused. Resolving a bank is two indexed queries, in a read-only transaction (on SQLite it does
not wait for a writer: ``store.sql.database``). This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypeVar

from lorafleet.errors import AlreadyExistsError, ModelNotFoundError, NotFoundError, ValidationError
from lorafleet.routing.spec import GateDecision, GateSpec
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.registry_repository import RegistryRepository
from lorafleet.store.sql.routing_repository import (
    Enrolment,
    EnrolmentEvent,
    LiveAdapterRow,
    RoutingRepository,
)
from lorafleet.store.sql.tenants import get_or_create_user_id, user_id_of, validate_external_id

MemberKind = Literal["personal", "task"]
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class Expert:
    """One adapter of a user's experts at its live version (what a serving cache loads, by ``sha256``)."""

    adapter_id: int
    adapter_name: str
    kind: MemberKind
    version_id: int
    version_number: int
    sha256: str
    size_bytes: int
    rank: int
    #: unit vector (the backbone's hidden size) for the centroid gate; None when never computed
    routing_key: tuple[float, ...] | None
    #: the adapter's routing claim (``routing.embeddings.fit_claim``: hidden + 1 floats), which tells its prompts
    #: from general ones for the gate's base side; None for versions trained before claims or imported without one
    routing_claim: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ExpertSet:
    """A user's members (personal first, then task adapters, each by name) and gate; ``revision`` identifies both.

    ``user_id`` is None for a user the tenant has not created yet (then ``members`` is empty).
    """

    tenant_id: int
    user_id: int | None
    external_id: str
    members: tuple[Expert, ...]
    gate: GateSpec
    revision: str

    def index_of(self, adapter_id: int) -> int | None:
        """The position of an adapter among ``members``, or None."""
        return next((i for i, m in enumerate(self.members) if m.adapter_id == adapter_id), None)

    def describe(self, decision: GateDecision) -> list[tuple[str, float]]:
        """A decision as ``(adapter name, weight)`` pairs, for logs and API responses."""
        return [(self.members[i].adapter_name, w) for i, w in decision.routes]


def resolve_user_experts(db: Database, *, tenant_id: int, user_external_id: str) -> ExpertSet:
    """The user's experts now; an unknown user gets an empty bank (base answers) and the default gate."""
    external_id = validate_external_id(user_external_id)
    repo = RoutingRepository(dialect=db.dialect)
    # the gate settings and the live versions as of one moment, in one session (no savepoints per read); read-only,
    # so serving does not wait behind a writer (``store.sql.database``)
    found, rows = db.read(repo.user_experts, tenant_id=tenant_id, external_id=external_id)
    user_id, stored = found if found is not None else (None, None)
    members = _members(rows, user_id=user_id)
    gate_row = next((r for r in rows if r.kind == "gate"), None)
    spec = effective_gate_spec(stored, live_gate_version_id=None if gate_row is None else gate_row.version_id)
    return ExpertSet(tenant_id, user_id, external_id, members, spec, experts_revision(members, spec))


def resolve_model_experts(
    db: Database, *, tenant_id: int, owner: str | None, adapter: str, version: int | None
) -> ExpertSet:
    """A bank of one adapter, for a request whose ``model`` names it (``serving.requests.ModelRef``): a user's
    (``owner``) or a task's (``owner`` None) adapter at version ``version`` (None: live). A fixed gate gives it the
    whole weight on every request. ``ModelNotFoundError`` when there is no such version."""
    repo = RoutingRepository(dialect=db.dialect)
    what = f"{owner}/{adapter}" if owner is not None else f"task:{adapter}"
    what += f"@{version}" if version is not None else " (live)"
    with db.unit_of_work(read_only=True):
        user_id = None
        if owner is not None:
            found = db.run(
                repo.user_with_gate_spec, tenant_id=tenant_id, external_id=validate_external_id(owner)
            )
            if found is None:
                raise ModelNotFoundError(f"model {what}: no user {owner!r}")
            user_id = found[0]
        row = db.run(
            repo.adapter_version, tenant_id=tenant_id, owner_user_id=user_id, name=adapter, number=version
        )
    if row is None:
        raise ModelNotFoundError(f"model {what}: no such adapter version")
    kind: MemberKind = "task" if owner is None else "personal"
    members = tuple(replace(m, kind=kind) for m in _members([row], user_id=user_id))
    spec = GateSpec(kind="fixed", fixed_weights={f"{kind}:{adapter}": 1.0})  # the adapter alone, whole weight
    return ExpertSet(
        tenant_id, user_id, owner or f"task:{adapter}", members, spec, experts_revision(members, spec)
    )


def served_task_models(db: Database, *, tenant_id: int) -> list[str]:
    """The names of the tenant's task adapters that have a live version (what ``GET /v1/models`` lists)."""
    return db.read(RoutingRepository(dialect=db.dialect).task_adapters_with_live_version, tenant_id=tenant_id)


def effective_gate_spec(stored: dict[str, Any] | None, *, live_gate_version_id: int | None) -> GateSpec:
    """The gate a user gets: their settings, else learned when a live gate exists, else centroid.

    A learned spec without a pinned version uses the live gate version (None: the centroid fallback).
    """
    if stored is None:
        if live_gate_version_id is None:
            return GateSpec()
        return GateSpec(kind="learned", learned_version_id=live_gate_version_id)
    spec = GateSpec.from_json(stored)
    if spec.kind == "learned" and spec.learned_version_id is None and live_gate_version_id is not None:
        return GateSpec(
            kind="learned",
            top_k=spec.top_k,
            temperature=spec.temperature,
            learned_version_id=live_gate_version_id,
        )
    return spec


def experts_revision(members: Iterable[Expert], gate: GateSpec) -> str:
    """sha256 (32 hex digits) over the members' adapter and version ids, their routing keys and the gate spec."""
    payload = {
        "members": [
            [m.adapter_id, m.version_id, _key_digest(m.routing_key), _key_digest(m.routing_claim)]
            for m in members
        ],
        "gate": gate.to_json(),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def _key_digest(key: tuple[float, ...] | None) -> str | None:
    return None if key is None else hashlib.sha256(json.dumps(key).encode("utf-8")).hexdigest()[:16]


def _members(rows: Iterable[LiveAdapterRow], *, user_id: int | None) -> tuple[Expert, ...]:
    members = [
        Expert(
            adapter_id=r.adapter_id,
            adapter_name=r.adapter_name,
            kind="personal" if r.owner_user_id == user_id else "task",
            version_id=r.version_id,
            version_number=r.version_number,
            sha256=r.sha256,
            size_bytes=r.size_bytes,
            rank=r.rank,
            routing_key=r.routing_key,
            routing_claim=r.routing_claim,
        )
        for r in rows
        if r.kind == "lora"
    ]
    return tuple(sorted(members, key=lambda m: (m.kind != "personal", m.adapter_name, m.adapter_id)))


# --- enrolments ----------------------------------------------------------------------------------------------
def enrol(db: Database, *, tenant_id: int, user_external_id: str, task_name: str, actor: str) -> Enrolment:
    """Enrol a user (created if new) in the tenant's task adapter ``task_name`` and record who did it.

    ``NotFoundError`` when the tenant has no shared task adapter of that name (another tenant's adapters and
    users' personal adapters are never found); ``AlreadyExistsError`` when the user is already enrolled.
    """
    external_id, actor = validate_external_id(user_external_id), _check_actor(actor)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        adapter_id = _require_task(db, repo, tenant_id=tenant_id, name=task_name)
        user_id = _created_user_id(db, tenant_id=tenant_id, external_id=external_id)
        if db.run(repo.find_enrolment, user_id=user_id, adapter_id=adapter_id):
            raise AlreadyExistsError(f"user {external_id!r} is already enrolled in {task_name!r}")
        now = db.run(
            repo.insert_enrolment, tenant_id=tenant_id, user_id=user_id, adapter_id=adapter_id, actor=actor
        )
        return Enrolment(tenant_id, user_id, adapter_id, task_name, actor, now)


def unenrol(db: Database, *, tenant_id: int, user_external_id: str, task_name: str, actor: str) -> None:
    """Remove a user from a task adapter and record who did it; ``NotFoundError`` if they were not enrolled."""
    external_id, actor = validate_external_id(user_external_id), _check_actor(actor)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        adapter_id = _require_task(db, repo, tenant_id=tenant_id, name=task_name)
        user_id = _user_id(db, tenant_id=tenant_id, external_id=external_id)
        if user_id is None:
            raise NotFoundError(f"user {external_id!r} not found")
        db.run(
            repo.delete_enrolment, tenant_id=tenant_id, user_id=user_id, adapter_id=adapter_id, actor=actor
        )


def list_enrolments(db: Database, *, tenant_id: int, user_external_id: str) -> list[Enrolment]:
    """The user's enrolments by task name (empty for an unknown user)."""
    return _user_rows(db, tenant_id, user_external_id, RoutingRepository.list_enrolments)


def enrolment_history(db: Database, *, tenant_id: int, user_external_id: str) -> list[EnrolmentEvent]:
    """Every enrol and unenrol of the user, oldest first (empty for an unknown user)."""
    return _user_rows(db, tenant_id, user_external_id, RoutingRepository.list_events)


def _user_rows(
    db: Database, tenant_id: int, user_external_id: str, read: Callable[..., list[_Row]]
) -> list[_Row]:
    """``read(repo, session, tenant_id=..., user_id=...)`` for the user; empty for a user not created yet."""
    external_id = validate_external_id(user_external_id)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        user_id = _user_id(db, tenant_id=tenant_id, external_id=external_id)
        return [] if user_id is None else db.run(partial(read, repo), tenant_id=tenant_id, user_id=user_id)


def _user_id(db: Database, *, tenant_id: int, external_id: str) -> int | None:
    return db.run(user_id_of, tenant_id=tenant_id, external_id=external_id)


def _created_user_id(db: Database, *, tenant_id: int, external_id: str) -> int:
    """The user's id, the user created if new (race-safe)."""
    return db.run(get_or_create_user_id, tenant_id=tenant_id, external_id=external_id)


def _require_task(db: Database, repo: RoutingRepository, *, tenant_id: int, name: str) -> int:
    adapter_id = db.run(repo.find_task_adapter, tenant_id=tenant_id, name=name)
    if adapter_id is None:
        raise NotFoundError(f"task adapter {name!r} not found")
    return adapter_id


# --- gate settings ---------------------------------------------------------------------------------------
def set_gate_spec(db: Database, *, tenant_id: int, user_external_id: str, spec: GateSpec, actor: str) -> None:
    """Store a user's gate settings (the user is created if new); a pinned learned version must be theirs."""
    external_id, actor = validate_external_id(user_external_id), _check_actor(actor)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        user_id = _created_user_id(db, tenant_id=tenant_id, external_id=external_id)
        if spec.learned_version_id is not None:
            _check_gate_version(db, tenant_id=tenant_id, user_id=user_id, version_id=spec.learned_version_id)
        db.run(repo.upsert_gate_spec, tenant_id=tenant_id, user_id=user_id, spec=spec.to_json(), actor=actor)


def clear_gate_spec(db: Database, *, tenant_id: int, user_external_id: str) -> None:
    """Back to the default gate (learned when a live gate exists, else centroid)."""
    external_id = validate_external_id(user_external_id)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        user_id = _user_id(db, tenant_id=tenant_id, external_id=external_id)
        if user_id is not None:
            db.run(repo.delete_gate_spec, tenant_id=tenant_id, user_id=user_id)


def gate_adapter_id(db: Database, *, tenant_id: int, user_id: int, create: bool = False) -> int | None:
    """The id of the user's learned-gate adapter (kind ``gate``), created when asked; None if absent."""
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        found = db.run(repo.gate_adapter_id, tenant_id=tenant_id, user_id=user_id)
        if found is not None or not create:
            return found
        db.run(RegistryRepository(dialect=db.dialect).require_user, tenant_id=tenant_id, user_id=user_id)
        return db.run(repo.insert_gate_adapter, tenant_id=tenant_id, user_id=user_id)


def _check_gate_version(db: Database, *, tenant_id: int, user_id: int, version_id: int) -> None:
    registry_repo, repo = RegistryRepository(dialect=db.dialect), RoutingRepository(dialect=db.dialect)
    version = db.run(registry_repo.get_version_by_id, tenant_id=tenant_id, version_id=version_id)
    if version.adapter_id != db.run(repo.gate_adapter_id, tenant_id=tenant_id, user_id=user_id):
        raise ValidationError(f"version {version_id} is not a version of this user's learned gate")


def _check_actor(actor: str) -> str:
    if not isinstance(actor, str) or not actor or len(actor) > 256:
        raise ValidationError("actor must be 1-256 characters")
    return actor


__all__ = [
    "Expert",
    "Enrolment",
    "EnrolmentEvent",
    "ExpertSet",
    "experts_revision",
    "clear_gate_spec",
    "effective_gate_spec",
    "enrol",
    "enrolment_history",
    "gate_adapter_id",
    "list_enrolments",
    "resolve_user_experts",
    "set_gate_spec",
    "unenrol",
]
