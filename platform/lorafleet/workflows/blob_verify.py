"""Verifying versions' blobs, and quarantining the versions whose blobs are bad.

A blob is verified on every read, so a flipped byte in a live version's blob used to be found only by a
generation (a 502), while listings still showed the version live. ``verify_blobs`` (``lorafleet verify``,
``POST /v1/admin/verify``) re-hashes the blob of every version (``lorafleet.registry.verify``) and reports each
one ``ok``, ``corrupt`` (wrong digest or size), ``missing`` (not in the object store), ``unreadable`` (the store
failed for another reason: nothing is known, never repaired) or ``quarantined`` (already ``corrupt``: not read
again), with counts.

With ``repair``, each ``corrupt`` or ``missing`` version is quarantined, in one transaction per version under its
adapter's lock: when it is live, ``live`` is first rolled back (``workflows.live_alias.move_live``: recorded in the
history with reason ``blob-corrupt``; a task adapter's enrolled users are queued for QA rechecks) to the newest
earlier version that was live before (``archived``), whose latest QA decision is not a failure and whose blob
verifies, or to none (the base model); then its status becomes ``corrupt``: never served, never a promote or
rollback target, never changed again. A version whose blob is fine is never touched, and a second run finds
nothing new (quarantined versions are reported as such).

``BlobScrubber`` is the scheduler's periodic form: each tick it claims the next window of versions (a
versions-per-tick and a bytes-per-tick budget, ``LORAFLEET_SCRUB_*``) from a cursor stored in the database, so a
restarted scheduler resumes and two schedulers never read the same window; it logs what it finds and repairs only
with ``LORAFLEET_SCRUB_REPAIR``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lorafleet.config import Settings
from lorafleet.domain import FINAL_STATUSES, Adapter, AdapterVersion, BlobCheck, QADecision, VersionStatus
from lorafleet.errors import ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.registry.verify import BlobFinding, BlobVerifier
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.store.sql.registry_repository import RegistryRepository, VersionLocation
from lorafleet.workflows.live_alias import earlier_live_versions, move_live

logger = logging.getLogger(__name__)

#: the reason recorded in the alias history when a corrupt live version is rolled back
REPAIR_REASON = "blob-corrupt"
#: who the scheduler's scrub is in the alias history
SCRUB_ACTOR = "scrub"
#: the scrub's cursor row (``scrub_cursors.name``)
SCRUB_CURSOR = "blob-scrub"
#: QA decisions after which a version is no rollback target for a repair
_FAILED_DECISIONS = frozenset({QADecision.REJECT, QADecision.ROLLBACK})
_PAGE = 500


@dataclass(frozen=True)
class VersionCheck:
    """One version's line of a report: where it is, what its blob gave, and what a repair did."""

    location: VersionLocation
    result: BlobCheck
    detail: str = ""
    #: its status after the run (``corrupt`` once repaired)
    status: VersionStatus = VersionStatus.CANDIDATE
    #: quarantined by this run
    repaired: bool = False
    #: it was live when repaired: ``live`` was rolled back to ``live_after`` (a version number; None: no adapter)
    was_live: bool = False
    live_after: int | None = None

    @property
    def version(self) -> AdapterVersion:
        return self.location.version

    @property
    def label(self) -> str:
        """``tenant/user/adapter v3``, or ``tenant/task:name v3`` for a shared task adapter."""
        loc = self.location
        owner = f"task:{loc.adapter_name}" if loc.owner is None else f"{loc.owner}/{loc.adapter_name}"
        return f"{loc.tenant_name}/{owner} v{loc.version.number}"

    def to_json(self) -> dict[str, Any]:
        """The line as JSON (``lorafleet.sdk.schemas.VersionCheckOut``)."""
        loc, version = self.location, self.location.version
        return {
            "tenant": loc.tenant_name,
            "tenant_id": loc.tenant_id,
            "owner": loc.owner,
            "adapter": loc.adapter_name,
            "adapter_id": version.adapter_id,
            "version_id": version.id,
            "number": version.number,
            "sha256": version.sha256,
            "size_bytes": version.size_bytes,
            "status": str(self.status),
            "result": str(self.result),
            "detail": self.detail,
            "repaired": self.repaired,
            "was_live": self.was_live,
            "live_after": self.live_after,
        }


@dataclass(frozen=True)
class VerifyReport:
    """Every version checked, in id order, and the bytes read."""

    checks: tuple[VersionCheck, ...]
    bytes_read: int = 0

    @property
    def counts(self) -> dict[str, int]:
        """``checked``, one count per ``BlobCheck`` value (all present) and ``repaired``."""
        found = Counter(str(c.result) for c in self.checks)
        counts = {"checked": len(self.checks)}
        counts.update({str(result): found.get(str(result), 0) for result in BlobCheck})
        counts["repaired"] = sum(1 for c in self.checks if c.repaired)
        return counts

    @property
    def problems(self) -> tuple[VersionCheck, ...]:
        """The checks that found something new: a bad blob, or one that could not be read."""
        return tuple(c for c in self.checks if c.result not in (BlobCheck.OK, BlobCheck.QUARANTINED))

    def to_json(self, *, only_bad: bool = False) -> dict[str, Any]:
        """The report as JSON (``lorafleet.sdk.schemas.VerifyReportOut``); ``only_bad`` lists only the versions
        that are not ``ok`` (the counts always cover every version checked)."""
        shown = [c for c in self.checks if not (only_bad and c.result == BlobCheck.OK)]
        return {
            "counts": self.counts,
            "bytes_read": self.bytes_read,
            "versions": [c.to_json() for c in shown],
        }


class BlobVerification:
    """One verification run: checks versions (each blob read once) and, with ``repair``, quarantines the bad ones,
    recording ``actor`` in the alias history."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        *,
        actor: str,
        repair: bool = False,
        queue: JobQueue | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.actor = actor
        self.repair = repair
        self.queue = queue or JobQueue(db)
        self.verifier = BlobVerifier(registry.blobs)
        self._repo = RegistryRepository(dialect=db.dialect)
        self._qa = QARepository(dialect=db.dialect)

    def run_all(self, *, tenant_id: int | None) -> VerifyReport:
        """Every version of the tenant (``tenant_id`` None: of every tenant), paged by id."""
        checks: list[VersionCheck] = []
        after = 0
        while True:
            page = self.registry.scan_versions(tenant_id=tenant_id, after_id=after, limit=_PAGE)
            checks.extend(self._check(located) for located in page)
            if len(page) < _PAGE:
                break
            after = page[-1].version.id
        return VerifyReport(tuple(checks), self.verifier.bytes_read)

    def run(self, located: Iterable[VersionLocation]) -> VerifyReport:
        """The given versions, in order."""
        checks = tuple(self._check(one) for one in located)
        return VerifyReport(checks, self.verifier.bytes_read)

    def _check(self, located: VersionLocation) -> VersionCheck:
        version = located.version
        if version.status in FINAL_STATUSES:  # corrupt, or revoked (its blob is deleted on purpose): not read
            return VersionCheck(located, BlobCheck.QUARANTINED, status=version.status)
        finding = self.verifier.check(version)
        if not (self.repair and finding.result.bad):
            return VersionCheck(located, finding.result, finding.detail, status=version.status)
        return self._quarantine(located, finding)

    def _quarantine(self, located: VersionLocation, finding: BlobFinding) -> VersionCheck:
        """Roll ``live`` off the version when it is live, then mark it ``corrupt``: one transaction, under the
        adapter's lock; the version as it is now decides (another run may have quarantined it meanwhile)."""
        version, tenant_id = located.version, located.tenant_id
        if version.status == VersionStatus.LIVE:  # hash the rollback candidates before taking any lock
            with self.db.unit_of_work():
                candidates = self._rollback_candidates(tenant_id=tenant_id, version=version)
            self._first_healthy(candidates)  # remembered by the verifier; decided again under the lock
        with self.db.unit_of_work():
            adapter, live = self.db.run(
                self._repo.lock_live, tenant_id=tenant_id, adapter_id=version.adapter_id
            )
            now = self.db.run(self._repo.get_version_by_id, tenant_id=tenant_id, version_id=version.id)
            if now.status in FINAL_STATUSES:  # quarantined by another run, or revoked meanwhile
                return VersionCheck(located, finding.result, finding.detail, status=now.status)
            was_live = live is not None and live.id == version.id
            target = self._rollback_target(tenant_id=tenant_id, version=version) if was_live else None
            if was_live:
                self._roll_back(adapter=adapter, version=version, target=target, finding=finding)
            self.registry.mark_corrupt(tenant_id=tenant_id, adapter_id=adapter.id, version_id=version.id)
        check = VersionCheck(
            located,
            finding.result,
            finding.detail,
            status=VersionStatus.CORRUPT,
            repaired=True,
            was_live=was_live,
            live_after=None if target is None else target.number,
        )
        moved = f"; live rolled back to {_number(check.live_after)}" if was_live else ""
        logger.warning("quarantined %s (blob %s): %s%s", check.label, finding.result, finding.detail, moved)
        return check

    def _roll_back(
        self,
        *,
        adapter: Adapter,
        version: AdapterVersion,
        target: AdapterVersion | None,
        finding: BlobFinding,
    ) -> None:
        to = _number(None if target is None else target.number)
        move_live(
            registry=self.registry,
            queue=self.queue,
            tenant_id=adapter.tenant_id,
            adapter=adapter,
            action="rollback",
            number=None if target is None else target.number,
            actor=self.actor,
            reason=REPAIR_REASON,
            cause=f"task adapter {adapter.name!r}: live version {version.number} {finding.result}, rolled back to {to}",
        )

    def _rollback_target(self, *, tenant_id: int, version: AdapterVersion) -> AdapterVersion | None:
        """The newest rollback candidate whose blob verifies (the verifier remembers the ones hashed before the
        lock was taken); None: none does (the base model serves)."""
        return self._first_healthy(self._rollback_candidates(tenant_id=tenant_id, version=version))

    def _first_healthy(self, candidates: Iterable[AdapterVersion]) -> AdapterVersion | None:
        return next((c for c in candidates if self.verifier.check(c).result == BlobCheck.OK), None)

    def _rollback_candidates(self, *, tenant_id: int, version: AdapterVersion) -> list[AdapterVersion]:
        """The earlier versions that were live before (``archived``) and whose latest QA decision is not a
        failure (reject, rollback), newest first."""
        earlier = earlier_live_versions(
            self.registry, tenant_id=tenant_id, adapter_id=version.adapter_id, below=version.number
        )
        reports = self.db.run(
            self._qa.reports_for_versions, tenant_id=tenant_id, version_ids=[v.id for v in earlier]
        )
        return [
            v
            for v in earlier
            if not (reports.get(v.id) and QADecision(reports[v.id][-1].decision) in _FAILED_DECISIONS)
        ]


def verify_blobs(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int | None = None,
    repair: bool = False,
    actor: str,
    queue: JobQueue | None = None,
) -> VerifyReport:
    """Re-hash the blob of every version of ``tenant_id`` (None: of every tenant) and, with ``repair``, quarantine
    each version whose blob is corrupt or missing (see the module docstring); ``actor`` goes into the history."""
    run = BlobVerification(db, registry, actor=actor, repair=repair, queue=queue)
    return run.run_all(tenant_id=tenant_id)


class BlobScrubber:
    """The scheduler's periodic scrub: each ``tick`` checks the next window of at most ``versions_per_tick``
    versions and ``bytes_per_tick`` bytes (one version at least), logs what it finds and, with ``repair``,
    quarantines the bad ones as ``verify_blobs`` does. A budget of 0 turns it off (``tick`` does nothing). Past the
    last version a pass is over; the next starts once ``pass_seconds`` have gone by (0: at once).

    ``registry`` may be a function that builds it: the object store is then opened only once a window holds a
    version (a scheduler over an empty database never touches it)."""

    def __init__(
        self,
        db: Database,
        registry: Registry | Callable[[], Registry],
        *,
        versions_per_tick: int,
        bytes_per_tick: int,
        repair: bool = False,
        queue: JobQueue | None = None,
        name: str = SCRUB_CURSOR,
        pass_seconds: float = 0.0,
    ) -> None:
        if versions_per_tick < 0 or bytes_per_tick < 0 or pass_seconds < 0:
            raise ValidationError("scrub budgets and pass_seconds must be >= 0")
        self.db = db
        self._registry = registry
        self.versions_per_tick = versions_per_tick
        self.bytes_per_tick = bytes_per_tick
        self.pass_seconds = pass_seconds
        self.repair = repair
        self.queue = queue or JobQueue(db)
        self.name = name
        self._repo = RegistryRepository(dialect=db.dialect)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        db: Database,
        registry: Registry | Callable[[], Registry],
        *,
        queue: JobQueue | None = None,
    ) -> BlobScrubber:
        """The scrub the ``LORAFLEET_SCRUB_*`` settings ask for."""
        return cls(
            db,
            registry,
            versions_per_tick=settings.scrub_versions_per_tick,
            bytes_per_tick=settings.scrub_bytes_per_tick,
            repair=settings.scrub_repair,
            queue=queue,
            pass_seconds=settings.scrub_pass_seconds,
        )

    @property
    def enabled(self) -> bool:
        return self.versions_per_tick > 0 and self.bytes_per_tick > 0

    @property
    def registry(self) -> Registry:
        if not isinstance(self._registry, Registry):
            self._registry = self._registry()
        return self._registry

    def tick(self) -> VerifyReport | None:
        """Check the next window (None: the scrub is off). The window is claimed, and the shared cursor moved past
        it, in one short transaction before any blob is read."""
        if not self.enabled:
            return None
        window = self.db.run(
            self._repo.claim_scrub_window,
            name=self.name,
            max_versions=self.versions_per_tick,
            max_bytes=self.bytes_per_tick,
            pass_seconds=self.pass_seconds,
        )
        if not window:
            return VerifyReport(())
        run = BlobVerification(
            self.db, self.registry, actor=SCRUB_ACTOR, repair=self.repair, queue=self.queue
        )
        report = run.run(window)
        self._log(report)
        return report

    def __call__(self) -> None:
        """``tick`` as a periodic hook (``Scheduler.run_loop``'s ``periodic``)."""
        self.tick()

    def _log(self, report: VerifyReport) -> None:
        for check in report.problems:
            if check.repaired:
                continue  # logged when quarantined
            advice = (
                "not repaired: LORAFLEET_SCRUB_REPAIR is off (run `lorafleet verify --repair`)"
                if check.result.bad
                else "the object store could not be read; checked again on the next round"
            )
            logger.warning("blob scrub: %s is %s: %s; %s", check.label, check.result, check.detail, advice)
        counts = report.counts
        level = logging.WARNING if report.problems else logging.INFO
        logger.log(
            level,
            "blob scrub: checked %d versions (%d bytes read): %d ok, %d corrupt, %d missing, %d unreadable; "
            "%d quarantined now",
            counts["checked"],
            report.bytes_read,
            counts[BlobCheck.OK],
            counts[BlobCheck.CORRUPT],
            counts[BlobCheck.MISSING],
            counts[BlobCheck.UNREADABLE],
            counts["repaired"],
        )


def _number(number: int | None) -> str:
    return "none (the base model)" if number is None else f"v{number}"


__all__ = [
    "REPAIR_REASON",
    "SCRUB_ACTOR",
    "SCRUB_CURSOR",
    "BlobScrubber",
    "BlobVerification",
    "VerifyReport",
    "VersionCheck",
    "verify_blobs",
]
