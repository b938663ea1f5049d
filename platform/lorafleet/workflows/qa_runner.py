"""``QARunner``: the handler of ``qa`` jobs. Evaluates, decides, and records the decision exactly once.

A job's payload is ``{"version_id": id}`` (a candidate) or ``{"recheck": {"adapter_id": id, "cause": text}}``
(a live personal adapter whose bank changed; see ``lorafleet.workflows.qa_triggers``).

- **Candidate**: sanity checks, the matrix, the rules (``lorafleet.qa.rules``). Promote moves ``live`` (actor
  ``qa``, reason ``qa-passed <report id>``); reject sets the version ``rejected``. A task adapter's candidate
  is evaluated alone (the task's holdout, the probe) and then in the banks of a sample of enrolled users
  (``QAPolicy.max_enrolled_users``): in each, the user's own holdout served by the gated bank with the
  candidate must not regress against the bank with the previous task version, so a task version that harms
  the users it is shared with is rejected. Its promotion queues rechecks for every enrolled user.
- **Forced live**: a candidate job whose version is already live without a passing decision (a person
  promoted it with ``force`` before QA ran; ``workflows.live_alias.promote_manually``) is not skipped: the
  version is evaluated as the candidate it was, against the version it replaced, by the same rules. A pass
  records ``keep``; a failure records ``rollback``, moves ``live`` back to the replaced version (none if there
  was none or QA had rejected it) and marks the version ``rejected``, in the same fenced transaction.
- **Recheck**: the live version in the user's current bank against the recheck rules. If it fails, earlier
  versions that were live once (status ``archived``, newest first, at most ``max_rollback_trials``) are tried
  in the same bank; ``live`` rolls back to the first that passes, or to none, with reason
  ``qa-regression <report id>``.

Order of writes: the report blob first (an orphan if anything fails later), then, inside the job's fenced
transaction, the report row, the alias move or status change, any follow-up jobs and the job's success, all
committed together. A worker that lost its lease writes nothing, and ``qa_reports.job_id`` is unique, so a
retried or taken-over job decides once. If ``live`` moved while QA evaluated, the decision is stale:
``StaleEvaluationError`` (retryable) runs the job again against the new state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.domain import (
    UNSERVABLE_STATUSES,
    Adapter,
    AdapterVersion,
    Job,
    QADecision,
    QAKind,
    VersionStatus,
)
from lorafleet.domain.jobs import QAPayload, QAResult
from lorafleet.errors import ConflictError, NotFoundError, ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.qa.columns import sub_experts
from lorafleet.qa.evalsets import EvalSet, training_prompts
from lorafleet.qa.evaluation import EvaluatedVersion, Evaluation, Evaluator
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.reports import REPORT_FORMAT, store_document, summary_of
from lorafleet.qa.rules import (
    ANSWER_RULE,
    NO_EVIDENCE,
    USER_HOLDOUT,
    RuleOutcome,
    candidate_rules,
    reasons_for,
    recheck_rules,
)
from lorafleet.qa.sampling import member_label, sample_enrolled
from lorafleet.routing.embeddings import routing_key_and_claim
from lorafleet.routing.experts import Expert, resolve_user_experts
from lorafleet.store.sql.qa_repository import NewQAReport, QAReport, QARepository
from lorafleet.store.sql.registry_repository import RegistryRepository
from lorafleet.store.sql.routing_repository import RoutingRepository
from lorafleet.training.general_prompts import general_exemplars
from lorafleet.training.resident import Resident
from lorafleet.workflows.live_alias import PASSING_DECISIONS, earlier_live_versions, move_live, qa_decision

if TYPE_CHECKING:
    from lorafleet.adapters.prefix import FrozenPrefix
    from lorafleet.jobs.worker import LeaseContext

logger = logging.getLogger(__name__)

QA_ACTOR = "qa"


class StaleEvaluationError(ConflictError):
    """``live`` (or the candidate's status) changed while QA evaluated; the job runs again."""

    code = "qa_stale"


class QARunner:
    """Runs ``qa`` jobs on a resident backbone and adapter bank (a trainer actor shares its own)."""

    def __init__(
        self,
        resident: Resident,
        *,
        policy: QAPolicy | None = None,
        queue: JobQueue | None = None,
        work_dir: Path | None = None,
        prefix: FrozenPrefix | None = None,
        general_prompts: Sequence[str] = (),
        general_to_base: bool | None = False,
    ) -> None:
        """``prefix``: a frozen-prefix cache of this bank's model (a trainer shares its own, so holdout rows
        it scored while training are not run through the frozen layers again). ``general_prompts`` and
        ``general_to_base``: as serving's (``serving.factory.build_engine``), so QA gates as serving does."""
        self.db, self.registry = resident.db, resident.registry
        self.backbone, self.bank = resident.backbone, resident.bank
        self.queue = queue or JobQueue(self.db)
        self.evaluator = Evaluator(
            resident,
            policy=policy or QAPolicy(),
            work_dir=work_dir,
            prefix=prefix,
            general_prompts=general_prompts,
            general_to_base=general_to_base,
        )
        self.policy = self.evaluator.policy  # with the backbone's probe bound filled in
        self._qa = QARepository(dialect=self.db.dialect)
        self._registry_sql = RegistryRepository(dialect=self.db.dialect)

    # --- the job ------------------------------------------------------------------------------------------
    def run_job(self, job: Job, lease: LeaseContext) -> dict[str, Any]:
        """The ``qa`` handler: a candidate or a recheck, decided inside the job's fence."""
        if job.tenant_id is None:
            raise ValidationError(f"qa job {job.id} has no tenant")
        done = self.db.run(self._qa.report_for_job, job_id=job.id)
        if done is not None:  # decided by an earlier attempt (cannot normally happen: it succeeded the job)
            return _result(done)
        payload = QAPayload.parse(job.payload)
        if payload.version_id is not None:
            report = self.run_candidate(tenant_id=job.tenant_id, version_id=payload.version_id, lease=lease)
        else:
            assert payload.recheck is not None  # QAPayload holds one of the two
            report = self.run_recheck(
                tenant_id=job.tenant_id,
                adapter_id=payload.recheck.adapter_id,
                cause=payload.recheck.cause,
                changed_adapter_id=payload.recheck.changed_adapter_id,
                lease=lease,
            )
        return QAResult(skipped="nothing to decide").to_json() if report is None else _result(report)

    # --- candidates ---------------------------------------------------------------------------------------
    def run_candidate(
        self, *, tenant_id: int, version_id: int, lease: LeaseContext | None = None
    ) -> QAReport | None:
        """QA one candidate and record the decision; None when there is nothing to decide (the version was
        decided, or is archived). A version already live without a passing decision (forced) is evaluated all the
        same, and kept or rolled back (see the module docstring)."""
        version = self.registry.get_version_by_id(tenant_id=tenant_id, version_id=version_id)
        forced_live = version.status == VersionStatus.LIVE and not self._decided(tenant_id, version)
        if version.status != VersionStatus.CANDIDATE and not forced_live:
            logger.info("version %d is %s: nothing to decide", version_id, version.status)
            return None
        adapter = self.registry.get_adapter(tenant_id=tenant_id, adapter_id=version.adapter_id)
        if forced_live:
            subject = self._forced_live_subject(tenant_id=tenant_id, adapter=adapter, version=version)
        else:
            subject = self._candidate_subject(tenant_id=tenant_id, adapter=adapter, version=version)
        own = self.evaluator.own_set(subject)
        no_evidence = adapter.is_task_adapter and version.dataset_snapshot_id is None and not own.examples
        evaluation = self.evaluator.evaluate(subject, own=own)
        rules = [] if evaluation.matrix is None else candidate_rules(evaluation.matrix, self.policy)
        if no_evidence and forced_live:  # a person's force is the decision evidence could not give
            rules = [_forced_without_evidence(r) for r in rules]
        passed, reasons = _verdict(evaluation, rules)
        enrolled: dict[str, Any] | None = None
        if adapter.is_task_adapter and evaluation.sanity.passed:
            enrolled = self._enrolled_banks(subject, own)
            failed = [
                f"user {b['user']}: {r}" for b in enrolled["banks"] if not b["passed"] for r in b["reasons"]
            ]
            if failed:
                reasons = failed if passed else [*reasons, *failed]
                passed = False
        decision = QADecision.PROMOTE if passed else QADecision.REJECT
        if no_evidence and not forced_live and _only_evidence_missing(evaluation, rules, reasons):
            # nothing wrong was found, and nothing shows it helps: it waits for a person (promote with force)
            decision = QADecision.HOLD
            reasons = [
                f"{NO_EVIDENCE}: an imported task version without example prompts and expected outputs, on a task "
                "without feedback: QA cannot tell whether it helps; it stays a candidate until a person promotes "
                "it with force",
                *(r.detail for r in rules if r.passed),
            ]
        target = None
        if forced_live:  # already live: keep it, or roll back to what it replaced (if QA may serve that)
            decision = QADecision.KEEP if passed else QADecision.ROLLBACK
            if not passed:
                target = _rollback_target(subject.previous)
                to = "none" if target is None else f"version {target.number}"
                reasons = [*reasons, f"forced live without a QA decision: rollback to {to}"]
        decided = _Decided(QAKind.CANDIDATE, subject, evaluation, rules, decision, reasons, target)
        document = self._document(decided)
        if enrolled is not None:
            document["enrolled"] = enrolled
        if forced_live:
            document["forced_live"] = True
        report = self._record(decided, document, lease)
        logger.info("QA report %d: version %d %s (%s)", report.id, version.id, decision, "; ".join(reasons))
        return report

    def evaluate_candidate(self, *, tenant_id: int, version_id: int) -> Evaluation:
        """The candidate's sanity checks and matrix, deciding and recording nothing (a dry run)."""
        version = self.registry.get_version_by_id(tenant_id=tenant_id, version_id=version_id)
        adapter = self.registry.get_adapter(tenant_id=tenant_id, adapter_id=version.adapter_id)
        subject = self._candidate_subject(tenant_id=tenant_id, adapter=adapter, version=version)
        return self.evaluator.evaluate(subject, own=self.evaluator.own_set(subject))

    def _candidate_subject(
        self, *, tenant_id: int, adapter: Adapter, version: AdapterVersion
    ) -> EvaluatedVersion:
        previous = self.registry.live_version(tenant_id=tenant_id, adapter_id=adapter.id)
        user_bank = self._user_bank(adapter)
        key, claim = self._routing(tenant_id=tenant_id, adapter=adapter, version=version)
        return EvaluatedVersion(
            QAKind.CANDIDATE, tenant_id, adapter, version, previous, user_bank, key, claim
        )

    def _decided(self, tenant_id: int, version: AdapterVersion) -> bool:
        """Whether QA's latest decision on the version lets it be live (``promote`` or ``keep``)."""
        return qa_decision(self.db, tenant_id=tenant_id, version=version) in PASSING_DECISIONS

    def _forced_live_subject(
        self, *, tenant_id: int, adapter: Adapter, version: AdapterVersion
    ) -> EvaluatedVersion:
        """A live version QA never decided (a person forced it live): evaluated as the candidate it was, against
        the version it replaced (the latest move of ``live`` onto it says which)."""
        events = self.registry.alias_history(tenant_id=tenant_id, adapter_id=adapter.id)
        onto = [e for e in events if e.to_version_id == version.id]
        replaced = onto[-1].from_version_id if onto else None
        previous = (
            None
            if replaced is None
            else self.registry.get_version_by_id(tenant_id=tenant_id, version_id=replaced)
        )
        key, claim = self._routing(tenant_id=tenant_id, adapter=adapter, version=version)
        return EvaluatedVersion(
            QAKind.CANDIDATE, tenant_id, adapter, version, previous, self._user_bank(adapter), key, claim
        )

    def _enrolled_banks(self, subject: EvaluatedVersion, own: EvalSet) -> dict[str, Any]:
        """The task candidate in the banks of a sample of its enrolled users, each against the candidate rules
        (the no-regression rule compares the user's own holdout, gated with the candidate against gated with
        the previous task version)."""
        tenant_id, adapter = subject.tenant_id, subject.adapter
        db, qa = self.db, self._qa
        with db.unit_of_work():
            user_ids = db.run(qa.enrolled_user_ids, tenant_id=tenant_id, adapter_id=adapter.id)
            members = db.run(qa.live_personal_adapters, tenant_id=tenant_id, user_ids=user_ids)
            with_members = {u for _a, u in members}
            external = {u: db.run(qa.user_external_id, tenant_id=tenant_id, user_id=u) for u in user_ids}
        sampled, left_out = sample_enrolled(
            user_ids,
            with_members=with_members,
            budget=self.policy.max_enrolled_users,
            seed=self.policy.sample_seed,
            salt=str(subject.version.id),
        )
        banks = []
        for user_id in sampled:
            user_bank = resolve_user_experts(self.db, tenant_id=tenant_id, user_external_id=external[user_id])
            in_bank = replace(subject, user_bank=user_bank)
            evaluation = self.evaluator.evaluate(in_bank, own=own, answers=False)  # answered alone already
            rules = (
                []
                if evaluation.matrix is None
                else candidate_rules(evaluation.matrix, self.policy, answers=False)
            )
            passed, reasons = _verdict(evaluation, rules)
            banks.append(
                {
                    "user": external[user_id],
                    "passed": passed,
                    "reasons": reasons,
                    "bank": evaluation.bank,
                    "matrix": None if evaluation.matrix is None else evaluation.matrix.to_json(),
                    "rules": [{"rule": r.rule, "passed": r.passed, "detail": r.detail} for r in rules],
                }
            )
        return {
            "enrolled_users": len(user_ids),
            "evaluated": [b["user"] for b in banks],
            "left_out": [external[u] for u in left_out],
            "rule": "users with other live members first, then sha256(seed/version id/user id) order",
            "banks": banks,
        }

    def _routing(
        self, *, tenant_id: int, adapter: Adapter, version: AdapterVersion
    ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """The candidate's routing key and claim; a personal candidate missing either (trained or imported before
        claims) gets both from its training prompts."""
        key, claim = self.db.run(self._qa.routing, version_id=version.id)
        stored = key is not None and claim is not None
        if stored or adapter.is_task_adapter or not self.policy.compute_missing_routing_key:
            return key, claim
        prompts = training_prompts(self.db, tenant_id=tenant_id, version=version)
        if not prompts:
            return key, claim
        general = general_exemplars(self.backbone, self.bank)
        key, claim = routing_key_and_claim(self.backbone, self.bank, prompts, general=general)
        self.registry.set_routing_key(tenant_id=tenant_id, version_id=version.id, key=key, claim=claim)
        return key, claim

    # --- rechecks -----------------------------------------------------------------------------------------
    def run_recheck(
        self,
        *,
        tenant_id: int,
        adapter_id: int,
        cause: str = "",
        changed_adapter_id: int | None = None,
        lease: LeaseContext | None = None,
    ) -> QAReport | None:
        """Recheck a live personal adapter in its current bank. None: no live version.

        When it fails, the task members of the bank are blamed first (``changed_adapter_id``, the one whose
        change queued the recheck, before the others; at most ``QAPolicy.max_blame_trials``): if the bank without
        one of them passes, that member is the culprit, the personal adapter is kept, and ``blame_action`` is
        applied to the member. Only when no member is to blame does ``live`` roll back (``_find_rollback``)."""
        adapter = self.registry.get_adapter(tenant_id=tenant_id, adapter_id=adapter_id)
        live = self.registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
        if live is None or adapter.is_task_adapter:
            return None
        subject = self._recheck_subject(tenant_id=tenant_id, adapter=adapter, version=live)
        own = self.evaluator.own_set(subject)
        evaluation, rules, passed, reasons = self._recheck(subject, own)
        culprit, blame_trials = (None, []) if passed else self._find_culprit(subject, own, changed_adapter_id)
        target, trials = (None, []) if passed or culprit is not None else self._find_rollback(subject, own)
        decision = QADecision.KEEP if passed or culprit is not None else QADecision.ROLLBACK
        if culprit is not None:
            action = self._blame_action(culprit, subject)
            reasons = [
                *reasons,
                f"blame: {member_label(culprit)} (without it the bank passes); {action}; "
                f"the personal adapter stays live",
            ]
        elif not passed:
            to = "none" if target is None else f"version {target.number}"
            reasons = [*reasons, f"rollback to {to} ({len(trials)} earlier versions tried)"]
        decided = _Decided(QAKind.RECHECK, subject, evaluation, rules, decision, reasons, target, culprit)
        document = self._document(decided)
        document["cause"] = cause
        document["blame"] = {
            "culprit": None if culprit is None else member_label(culprit),
            "culprit_adapter_id": None if culprit is None else culprit.adapter_id,
            "action": None if culprit is None else self.policy.blame_action,
            "trials": blame_trials,
        }
        document["rollback"] = {"to_version_id": None if target is None else target.id, "trials": trials}
        report = self._record(decided, document, lease)
        logger.info("QA report %d: live version %d %s", report.id, live.id, decision)
        return report

    def _recheck(
        self, subject: EvaluatedVersion, own: EvalSet
    ) -> tuple[Evaluation, list[RuleOutcome], bool, list[str]]:
        """A live version (or a trial: an earlier version, a smaller bank) evaluated by the recheck rules."""
        evaluation = self.evaluator.evaluate(subject, own=own)
        rules = [] if evaluation.matrix is None else recheck_rules(evaluation.matrix, self.policy)
        passed, reasons = _verdict(evaluation, rules)
        return evaluation, rules, passed, reasons

    def _find_culprit(
        self, subject: EvaluatedVersion, own: EvalSet, changed_adapter_id: int | None
    ) -> tuple[Expert | None, list[dict[str, Any]]]:
        """The task member whose removal makes the failing bank pass (the changed one tried first), or None."""
        assert subject.user_bank is not None
        tasks = [m for m in subject.user_bank.members if m.kind == "task"]
        tasks.sort(key=lambda m: (m.adapter_id != changed_adapter_id, m.adapter_name, m.adapter_id))
        tried: list[dict[str, Any]] = []
        for member in tasks[: self.policy.max_blame_trials]:
            rest = [m for m in subject.user_bank.members if m.adapter_id != member.adapter_id]
            trial = replace(subject, user_bank=sub_experts(subject.user_bank, rest))
            _, _, passed, reasons = self._recheck(trial, own)
            tried.append({"without": member_label(member), "passed": passed, "reasons": reasons})
            if passed:
                return member, tried
        return None, tried

    def _blame_action(self, culprit: Expert, subject: EvaluatedVersion) -> str:
        """What ``_act`` will do to the culprit, in words for the report."""
        user = subject.user_bank.external_id if subject.user_bank is not None else "?"
        if self.policy.blame_action == "rollback-task":
            return f"task adapter {culprit.adapter_name!r} rolled back from version {culprit.version_number}"
        return f"user {user!r} unenrolled from task adapter {culprit.adapter_name!r}"

    def _recheck_subject(
        self, *, tenant_id: int, adapter: Adapter, version: AdapterVersion
    ) -> EvaluatedVersion:
        key, claim = self.db.run(self._qa.routing, version_id=version.id)
        return EvaluatedVersion(
            QAKind.RECHECK, tenant_id, adapter, version, None, self._user_bank(adapter), key, claim
        )

    def _find_rollback(
        self, subject: EvaluatedVersion, own: EvalSet
    ) -> tuple[AdapterVersion | None, list[dict[str, Any]]]:
        """The newest earlier version, once live, that passes the recheck rules in the same bank."""
        earlier = earlier_live_versions(
            self.registry,
            tenant_id=subject.tenant_id,
            adapter_id=subject.adapter.id,
            below=subject.version.number,
        )
        tried: list[dict[str, Any]] = []
        for version in earlier[: self.policy.max_rollback_trials]:
            trial = self._recheck_subject(
                tenant_id=subject.tenant_id, adapter=subject.adapter, version=version
            )
            evaluation, rules, passed, reasons = self._recheck(trial, own)
            tried.append(_trial_json(version, evaluation, rules, passed, reasons))
            if passed:
                return version, tried
        return None, tried

    # --- recording ----------------------------------------------------------------------------------------
    def _record(self, decided: _Decided, document: dict[str, Any], lease: LeaseContext | None) -> QAReport:
        """Blob first; then row, alias move or status (or the blamed member's unenrolment or rollback),
        follow-up jobs and the job's success in one transaction."""
        subject, culprit = decided.subject, decided.culprit
        ref = store_document(self.registry, document)
        new = NewQAReport(
            tenant_id=subject.tenant_id,
            version_id=subject.version.id,
            kind=decided.kind,
            policy_version=self.policy.version,
            decision=decided.decision,
            reasons=tuple(decided.reasons),
            summary=summary_of(
                decided.evaluation.matrix,
                document.get("rules", []),
                _summary_extra(document),
                wrong_answer_weight=self.policy.wrong_answer_weight,
            ),
            blob_sha256=ref.sha256,
            blob_uri=ref.uri,
            blob_size_bytes=ref.size,
            job_id=None if lease is None else lease.job.id,
        )

        def write() -> QAReport:
            self._ensure_blob(data_ref=ref.sha256, document=document)
            self._check_not_stale(subject)
            report = self.db.run(self._qa.insert_report, new=new)
            self._act(decided, report)
            if culprit is not None:
                self._act_on_culprit(subject=subject, culprit=culprit, report=report)
            return report

        return self._in_transaction(lease, write)

    def _in_transaction(self, lease: LeaseContext | None, write: Callable[[], QAReport]) -> QAReport:
        """``write`` in one transaction: the job's fenced one, which also marks the job succeeded."""
        if lease is None:
            with self.db.unit_of_work():
                return write()
        with lease.fenced() as fence:
            report = write()
            fence.succeed(_result(report))
        return report

    def _ensure_blob(self, *, data_ref: str, document: dict[str, Any]) -> None:
        """Under the blob lock, the blob is there (a GC may have removed an identical old orphan meanwhile)."""
        self.db.run(self._registry_sql.lock_blobs, exclusive=False)
        if not self.registry.blobs.exists(data_ref):
            store_document(self.registry, document)

    def _check_not_stale(self, subject: EvaluatedVersion) -> None:
        repo, tenant_id, adapter_id = self._registry_sql, subject.tenant_id, subject.adapter.id
        _adapter, live = self.db.run(repo.lock_live, tenant_id=tenant_id, adapter_id=adapter_id)
        forced_live = subject.kind == QAKind.CANDIDATE and subject.version.status == VersionStatus.LIVE
        expected = (
            subject.previous if subject.kind == QAKind.CANDIDATE and not forced_live else subject.version
        )
        if (None if live is None else live.id) != (None if expected is None else expected.id):
            raise StaleEvaluationError(
                f"adapter {adapter_id}: live moved while QA evaluated; evaluating again"
            )
        if subject.kind == QAKind.CANDIDATE and not forced_live:
            status = self.db.run(
                repo.get_version_by_id, tenant_id=tenant_id, version_id=subject.version.id
            ).status
            if status != VersionStatus.CANDIDATE:
                raise StaleEvaluationError(f"version {subject.version.id} became {status} while QA evaluated")

    def _act(self, decided: _Decided, report: QAReport) -> None:
        subject, decision, target = decided.subject, decided.decision, decided.target
        tenant_id, adapter, number = subject.tenant_id, subject.adapter, subject.version.number
        if decision == QADecision.PROMOTE:
            self._move_live(
                tenant_id,
                adapter,
                "promote",
                number,
                reason=f"qa-passed {report.id}",
                cause=f"task adapter {adapter.name!r} promoted to version {number}",
            )
        elif decision == QADecision.REJECT:
            self._reject(tenant_id, adapter, number)
        elif decision == QADecision.ROLLBACK and subject.kind == QAKind.CANDIDATE:
            self._roll_back_forced(subject=subject, target=target, report=report)
        elif decision == QADecision.ROLLBACK:
            # a recheck's rollback: only live personal adapters are rechecked, so no task bank moves here
            to = None if target is None else target.number
            self._move_live(tenant_id, adapter, "rollback", to, reason=f"qa-regression {report.id}")

    def _move_live(
        self,
        tenant_id: int,
        adapter: Adapter,
        action: str,
        number: int | None,
        *,
        reason: str,
        cause: str | None = None,
    ) -> None:
        """``move_live`` by QA (actor ``qa``), in the caller's transaction."""
        move_live(
            registry=self.registry,
            queue=self.queue,
            tenant_id=tenant_id,
            adapter=adapter,
            action=action,
            number=number,
            actor=QA_ACTOR,
            reason=reason,
            cause=cause,
        )

    def _reject(self, tenant_id: int, adapter: Adapter, number: int) -> None:
        """Version ``number`` of ``adapter`` becomes ``rejected``."""
        self.registry.set_status(
            tenant_id=tenant_id, adapter_id=adapter.id, number=number, status=VersionStatus.REJECTED
        )

    def _act_on_culprit(self, *, subject: EvaluatedVersion, culprit: Expert, report: QAReport) -> None:
        """``blame_action`` on the task member a recheck blamed. Raises ``StaleEvaluationError`` when the bank
        moved while QA evaluated (the user left the task, or the task's live version changed)."""
        assert subject.user_bank is not None and subject.user_bank.user_id is not None
        tenant_id = subject.tenant_id
        task, live = self.db.run(
            self._registry_sql.lock_live, tenant_id=tenant_id, adapter_id=culprit.adapter_id
        )
        if live is None or live.id != culprit.version_id:
            raise StaleEvaluationError(
                f"task adapter {task.name!r} moved while QA evaluated; evaluating again"
            )
        if self.policy.blame_action == "unenrol":
            try:
                self.db.run(
                    RoutingRepository(dialect=self.db.dialect).delete_enrolment,
                    tenant_id=tenant_id,
                    user_id=subject.user_bank.user_id,
                    adapter_id=task.id,
                    actor=QA_ACTOR,
                )
            except NotFoundError:
                raise StaleEvaluationError(
                    f"user {subject.user_bank.external_id!r} left {task.name!r} while QA evaluated; evaluating again"
                ) from None
            return
        earlier = earlier_live_versions(
            self.registry, tenant_id=tenant_id, adapter_id=task.id, below=culprit.version_number
        )
        self._move_live(
            tenant_id,
            task,
            "rollback",
            earlier[0].number if earlier else None,
            reason=f"qa-blame {report.id}",
            cause=f"task adapter {task.name!r} rolled back: it failed {subject.user_bank.external_id!r}'s bank",
        )

    def _roll_back_forced(
        self, *, subject: EvaluatedVersion, target: AdapterVersion | None, report: QAReport
    ) -> None:
        """A forced-live version failed its QA: ``live`` goes back to the version it replaced (or none; a
        promote when that one has a higher number) and the version is ``rejected``, as QA would have left it."""
        tenant_id, adapter, version = subject.tenant_id, subject.adapter, subject.version
        back_up = target is not None and target.number > version.number
        self._move_live(
            tenant_id,
            adapter,
            "promote" if back_up else "rollback",
            None if target is None else target.number,
            reason=f"qa-regression {report.id}",
            cause=f"{adapter.name!r}: forced version {version.number} failed QA, rolled back",
        )
        self._reject(tenant_id, adapter, version.number)

    def _document(self, decided: _Decided) -> dict[str, Any]:
        """The report's JSON document (see ``lorafleet.qa.reports``)."""
        subject, evaluation = decided.subject, decided.evaluation
        bank = dict(evaluation.bank)
        probe = bank.pop("probe", None)
        return {
            "format": REPORT_FORMAT,
            "kind": decided.kind,
            "tenant_id": subject.tenant_id,
            "version": _version_json(subject.adapter, subject.version),
            "previous": None
            if subject.previous is None
            else _version_json(subject.adapter, subject.previous),
            "policy_version": self.policy.version,
            "policy": self.policy.model_dump(),
            "backbone": {"fingerprint": self.bank.fingerprint, "quantization": self.backbone.quantization},
            "sanity": evaluation.sanity.to_json(),
            "bank": bank,
            "probe": probe,
            "matrix": None if evaluation.matrix is None else evaluation.matrix.to_json(),
            "rules": [{"rule": r.rule, "passed": r.passed, "detail": r.detail} for r in decided.rules],
            "decision": decided.decision,
            "reasons": decided.reasons,
            "timing": {"evaluation_seconds": round(evaluation.seconds, 3)},
        }

    def _user_bank(self, adapter: Adapter) -> Any:
        """The owner's bank now (None for a task adapter, which is evaluated on its own)."""
        if adapter.owner_user_id is None:
            return None

        external_id = self.db.run(
            self._qa.user_external_id, tenant_id=adapter.tenant_id, user_id=adapter.owner_user_id
        )
        return resolve_user_experts(self.db, tenant_id=adapter.tenant_id, user_external_id=external_id)


# --- helpers ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Decided:
    """A QA decision and what it rests on: what ``QARunner._document`` describes and ``QARunner._record`` records."""

    kind: QAKind
    subject: EvaluatedVersion
    evaluation: Evaluation
    rules: list[RuleOutcome]
    decision: QADecision
    reasons: list[str]
    #: where a rollback moves ``live`` (None: to no version)
    target: AdapterVersion | None = None
    #: the task member a recheck blamed
    culprit: Expert | None = None


def _forced_without_evidence(outcome: RuleOutcome) -> RuleOutcome:
    """A version without evidence (an import with no examples, on a task without feedback) that a person forced
    live: the rules that need evidence (the holdout loss, the answers) cannot compare anything, and the person's
    force is the decision they could not make; it is kept unless a rule that needs no evidence fails (sanity,
    finite outputs, the probe, the enrolled users' experts)."""
    if outcome.rule not in (USER_HOLDOUT, ANSWER_RULE) or outcome.passed:
        return outcome
    detail = f"{outcome.rule}: not applicable (no evidence; forced live by a person)"
    return RuleOutcome(outcome.rule, True, detail)


def _only_evidence_missing(evaluation: Evaluation, rules: list[RuleOutcome], reasons: list[str]) -> bool:
    """Sanity passed and the only failed rules are those that need evidence (no user failed either)."""
    if not evaluation.sanity.passed:
        return False
    evidence_rules = (USER_HOLDOUT, ANSWER_RULE)
    failed_rules = [r for r in rules if not r.passed]
    failed_details = {r.detail for r in failed_rules}
    return all(r.rule in evidence_rules for r in failed_rules) and all(x in failed_details for x in reasons)


def _rollback_target(previous: AdapterVersion | None) -> AdapterVersion | None:
    """Where a failed forced-live version goes back to: the version it replaced, unless QA rejected that one or
    its blob failed verification (``corrupt``)."""
    if previous is None or previous.status in UNSERVABLE_STATUSES:
        return None
    return previous


def _verdict(evaluation: Evaluation, rules: list[RuleOutcome]) -> tuple[bool, list[str]]:
    """Sanity problems reject before any rule; otherwise the rules decide."""
    if not evaluation.sanity.passed:
        return False, list(evaluation.sanity.problems)
    return reasons_for(rules)


def _summary_extra(document: Mapping[str, Any]) -> dict[str, Any]:
    sampling = document.get("bank", {}).get("sampling") or {}
    extra: dict[str, Any] = {
        "sanity_passed": document["sanity"]["passed"],
        "seconds": document["timing"]["evaluation_seconds"],
        "bank_size": sampling.get("bank_size", 0),
        "members_evaluated": len(sampling.get("sampled", [])),
    }
    enrolled = document.get("enrolled")
    if enrolled is not None:
        extra["enrolled_users_evaluated"] = len(enrolled["banks"])
    rollback = document.get("rollback")
    if rollback is not None:
        extra["rollback_to_version_id"] = rollback["to_version_id"]
    return extra


def _version_json(adapter: Adapter, version: AdapterVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "adapter_id": adapter.id,
        "adapter_name": adapter.name,
        "owner_user_id": adapter.owner_user_id,
        "number": version.number,
        "sha256": version.sha256,
        "status": version.status,
    }


def _trial_json(
    version: AdapterVersion,
    evaluation: Evaluation,
    rules: list[RuleOutcome],
    passed: bool,
    reasons: list[str],
) -> dict[str, Any]:
    return {
        "version_id": version.id,
        "number": version.number,
        "passed": passed,
        "reasons": reasons,
        "sanity": evaluation.sanity.to_json(),
        "rules": [{"rule": r.rule, "passed": r.passed, "detail": r.detail} for r in rules],
        "matrix": None if evaluation.matrix is None else evaluation.matrix.to_json(),
    }


def _result(report: QAReport) -> dict[str, Any]:
    return QAResult(
        report_id=report.id,
        version_id=report.version_id,
        kind=report.kind,
        decision=report.decision,
        reasons=list(report.reasons),
    ).to_json()


__all__ = ["QA_ACTOR", "QARunner", "StaleEvaluationError"]
