"""Continual learning: the handler of ``train`` jobs, turning each user's new feedback into a new version.

For every subject of a job (a user, or a shared task's dataset: ``lorafleet.workflows.tasks``): the user's ``personal``
adapter (created on first use), or the tenant's task adapter of that name, continues from its *live* version (lineage ``continued-from``), or, with no live version, starts from a fresh slot (B = 0, so the
adapter starts as the base model). It trains on the user's records after the parent's snapshot, up to the
job's watermark, plus a seeded *replay* sample of older records (``replay_ratio`` per new record), all users
of the job in one ``train_slots`` call on the resident backbone.

Writes are ordered so a worker that dies or loses its lease leaves no version behind: blobs first (orphans
are collected by ``Registry.gc``), then, inside the job's fenced transaction, each user's dataset snapshot
and version row and the job's success, committed together. With the promote rule ``qa`` (the default
setting) the same transaction queues one ``qa`` job per new version, and ``lorafleet.qa`` decides; the other
rules run after the commit: ``holdout-improved`` moves ``live`` to a new version whose holdout loss beat its
parent's, ``always`` and ``never`` do what they say.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters import load_slot_from_dir, save_slot
from lorafleet.domain import (
    Adapter,
    AdapterVersion,
    FeedbackRecord,
    Job,
    LineageRelation,
    PromoteRule,
    SubjectKind,
    VersionStatus,
)
from lorafleet.domain.enums import values
from lorafleet.domain.jobs import TrainedVersion, TrainPayload, TrainResult
from lorafleet.domain.subject import Subject
from lorafleet.errors import BackboneMismatchError, InvalidStateError, NotFoundError, ValidationError
from lorafleet.jobs import progress as job_progress
from lorafleet.jobs.queue import JobQueue
from lorafleet.routing.embeddings import routing_key_and_claim
from lorafleet.store.sql import record_deletion
from lorafleet.store.sql.feedback import get_snapshot, insert_snapshot, list_feedback
from lorafleet.store.sql.tenants import MAX_PAGE_SIZE
from lorafleet.training.config import TrainingConfig
from lorafleet.training.contrast import sample_contrast_rows
from lorafleet.training.dataset import Example, UserDataset, build_dataset, reservoir_sample
from lorafleet.training.general_prompts import anchor_examples, general_exemplars
from lorafleet.training.overrides import check_bank_fits
from lorafleet.training.resident import Resident
from lorafleet.training.trainer import SlotTraining, train_slots
from lorafleet.workflows.live_alias import queue_candidate_qa
from lorafleet.workflows.workdirs import owned_tempdir

if TYPE_CHECKING:
    from lorafleet.adapters import SavedAdapter, SlotConfig
    from lorafleet.jobs.worker import LeaseContext
    from lorafleet.training.trainer import SlotResult, SlotTraining

logger = logging.getLogger(__name__)

#: ``qa``: each new version is a candidate until its QA job (queued in the registering transaction) decides
PROMOTE_RULES: tuple[str, ...] = values(PromoteRule)
PERSONAL_ADAPTER = "personal"
AUTO_PROMOTE_ACTOR = "auto-promote"
CONTINUED_FROM = LineageRelation.CONTINUED_FROM
#: why a user of a job got no version (the job still succeeds for the others)
SKIP_NO_NEW_RECORDS = "no_new_records"
SKIP_NO_TRAIN_EXAMPLES = "no_train_examples"
#: a deletion (``lorafleet.workflows.deletion``) since the job read the subject's records: nothing registered
SKIP_RECORDS_DELETED = "records_deleted"
SKIP_SUBJECT_DELETED = "subject_deleted"
SKIP_PARENT_REVOKED = "parent_revoked"


@dataclass(frozen=True)
class JobUser:
    """One entry of a train job's payload: the subject (a user, or a task's dataset with ``kind`` ``task``)
    and the newest feedback id to train through."""

    user_id: int
    external_id: str
    watermark: int
    kind: SubjectKind = SubjectKind.USER

    @property
    def subject(self) -> Subject:
        return Subject.from_row(self.kind, self.external_id)

    @property
    def task_name(self) -> str | None:
        """The task's name for a task subject, else None."""
        return self.subject.task_name

    @property
    def label(self) -> str:
        """How logs and results name the subject: the user's id, or ``task:<name>``."""
        return self.subject.label


@dataclass(frozen=True)
class TrainingInput:
    """What one user trains on: their adapter, the parent version (None: a fresh start) and the records."""

    user: JobUser
    adapter: Adapter
    parent: AdapterVersion | None
    new_ids: tuple[int, ...]
    replay_ids: tuple[int, ...]
    dataset: UserDataset

    @property
    def record_ids(self) -> tuple[int, ...]:
        return tuple(sorted({*self.new_ids, *self.replay_ids}))


@dataclass(frozen=True)
class TrainedUser:
    """A user's trained slot, saved as a PEFT folder, with its metrics and the promote decision."""

    plan: TrainingInput
    saved: SavedAdapter
    metrics: dict[str, Any]
    promote: bool
    reason: str
    #: the centroid gate's key for this version: pooled base embeddings of its training prompts
    routing_key: tuple[float, ...] | None
    #: the gate's probe for the base side: those prompts told from the shipped general ones
    routing_claim: tuple[float, ...] | None


def parse_job_users(payload: Mapping[str, Any]) -> list[JobUser]:
    """The users of a train job's payload; a malformed payload is a ``ValidationError`` (no retry helps)."""
    users = TrainPayload.parse(payload).users
    return [JobUser(u.user_id, u.external_id, u.watermark, u.kind) for u in users]


def promote_decision(rule: str, metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the rule promotes a version with these metrics, and the reason recorded on the alias move."""
    if rule == PromoteRule.NEVER:
        return False, "promote rule 'never'"
    if rule == PromoteRule.ALWAYS:
        return True, "promote rule 'always'"
    if rule == PromoteRule.QA:
        return False, "QA decides (promote rule 'qa')"
    before, after = (
        job_progress.finite_or_none(metrics.get("holdout_loss_before")),
        job_progress.finite_or_none(metrics.get("holdout_loss_after")),
    )
    if before is None or after is None:
        return False, "no holdout loss to compare"
    change = f"({before:.4f} → {after:.4f})"
    if after < before:
        return True, f"holdout loss improved {change}"
    return False, f"holdout loss did not improve {change}"


class ContinualTrainer:
    """Runs ``train`` jobs on one resident backbone and adapter bank (a trainer actor holds one of these), each
    with the ``TrainingConfig`` its payload carries (``config`` is the default for jobs without one). A new
    adapter gets the job's rank and targets; one continuing from a live version keeps that version's shape."""

    def __init__(
        self,
        resident: Resident,
        *,
        config: TrainingConfig,
        promote_rule: PromoteRule = PromoteRule.HOLDOUT_IMPROVED,
        work_dir: Path | None = None,
        progress: Callable[[int, int, dict[str, Any]], None] | None = None,
        train_slots: Callable[..., list[SlotResult]] | None = None,
    ) -> None:
        """``train_slots``: what trains the loaded slots, ``lorafleet.training.trainer.train_slots`` unless
        given (a test wraps it to act between loading the slots and training them)."""
        if promote_rule not in PROMOTE_RULES:
            raise ValidationError(f"promote_rule: must be one of {', '.join(PROMOTE_RULES)}")
        self.db, self.registry = resident.db, resident.registry
        self.backbone, self.bank = resident.backbone, resident.bank
        #: the config of jobs whose payload has none (queued before configs were stored in jobs)
        self.default_config = config
        self.promote_rule = promote_rule
        self.work_dir = work_dir
        self.progress = progress
        self._train_slots = train_slots
        #: the frozen-prefix cache of this trainer's backbone, kept across jobs (replayed records hit it)
        self.prefix = resident.frozen_prefix(spill_dir=work_dir)
        self._use_config(config)

    @property
    def target_config(self) -> dict[str, Any]:
        """The ``target_config`` a new personal adapter is created with."""
        c = self.config
        return {
            "rank": c.rank,
            "alpha": c.alpha,
            "dropout": c.dropout,
            "target_modules": c.target_modules,
            "layers": c.layers,
        }

    def job_config(self, job: Job) -> TrainingConfig:
        """The job's own config (``payload["training"]``, resolved when it was queued), else the default;
        ``ValidationError`` naming the field when this trainer's bank cannot hold its adapters."""
        stored = job.payload.get("training")
        config = self.default_config if stored is None else TrainingConfig.from_mapping(stored)
        check_bank_fits(config, max_rank=self.bank.max_rank, layer_names=list(self.bank.layers))
        return config

    def _use_config(self, config: TrainingConfig) -> None:
        """Train with ``config`` from now on (set per job: a trainer runs one job at a time)."""
        self.config = config
        self.slot_config: SlotConfig = config.slot_config(
            layer_names=list(self.bank.layers), backbone_fingerprint=self.bank.fingerprint
        )

    # --- the job ------------------------------------------------------------------------------------------
    def run_job(self, job: Job, lease: LeaseContext) -> dict[str, Any]:
        """The ``train`` handler: plan, train all users together, register in the fence, then promote."""
        started = time.monotonic()
        tenant_id = _tenant_of(job)
        self._use_config(self.job_config(job))
        lease.report_phase(job_progress.PHASE_PLANNING)
        plans, skipped = self._plan_all(tenant_id=tenant_id, users=parse_job_users(job.payload))
        lease.check()
        if not plans:
            logger.info("job %d: nothing to train (%s)", job.id, skipped)
            return TrainResult(skipped=skipped).to_json()
        # a folder this process holds (lorafleet.workflows.workdirs): swept at the next start if it dies mid-job
        with owned_tempdir(f"lorafleet-job-{job.id}-", dir=self.work_dir) as tmp:
            lease.report_phase(job_progress.PHASE_TRAINING)
            progress = job_progress.trainer_callback(lease.report_step, also=self.progress)
            trained = self._train(plans, work=Path(tmp), should_stop=lease.check, progress=progress)
            lease.report_phase(job_progress.PHASE_REGISTERING)
            for user in trained:  # blobs first: a crash from here on leaves only orphan blobs
                self.registry.put_adapter_blob(adapter_dir=user.saved.directory)
            result = self._register(
                job=job, lease=lease, tenant_id=tenant_id, trained=trained, skipped=skipped
            )
        self._apply_promotions(tenant_id=tenant_id, trained=trained, result=result)
        logger.info(
            "job %d: %d versions, %d skipped, in %.1f s",
            job.id,
            len(result["versions"]),
            len(skipped),
            time.monotonic() - started,
        )
        return result

    # --- planning -----------------------------------------------------------------------------------------
    def _plan_all(
        self, *, tenant_id: int, users: Sequence[JobUser]
    ) -> tuple[list[TrainingInput], dict[str, str]]:
        plans: list[TrainingInput] = []
        skipped: dict[str, str] = {}
        for user in users:
            try:
                plan = self._plan_user(tenant_id=tenant_id, user=user)
            except NotFoundError:
                # a user erased since the job was queued: the others of the job still train
                if self.db.run(record_deletion.subject_exists, user_id=user.user_id):
                    raise
                plan = SKIP_SUBJECT_DELETED
            if isinstance(plan, str):
                skipped[user.label] = plan
                logger.info("%s: skipped (%s)", user.label, plan)
            else:
                plans.append(plan)
        return plans, skipped

    def _plan_user(self, *, tenant_id: int, user: JobUser) -> TrainingInput | str:
        """The subject's plan, or why it gets no version this job."""
        adapter = self.registry.get_or_create_adapter(
            tenant_id=tenant_id,
            owner_user_id=None if user.task_name is not None else user.user_id,
            name=user.task_name or PERSONAL_ADAPTER,
            target_config=self.target_config,
        )
        parent = self.registry.live_version(tenant_id=tenant_id, adapter_id=adapter.id)
        since = self._trained_through(parent)
        new = list(self._records(tenant_id=tenant_id, user=user, after=since, through=user.watermark))
        if not new:
            return SKIP_NO_NEW_RECORDS
        replay = self._replay(tenant_id=tenant_id, user=user, since=since, n_new=len(new))
        dataset = build_dataset([*replay, *new], config=self.config)
        if not dataset.train:
            return SKIP_NO_TRAIN_EXAMPLES
        return TrainingInput(
            user, adapter, parent, tuple(r.id for r in new), tuple(r.id for r in replay), dataset
        )

    def _trained_through(self, parent: AdapterVersion | None) -> int | None:
        """The newest record id the parent was trained on (None: no parent, or one without a snapshot)."""
        if parent is None or parent.dataset_snapshot_id is None:
            return None
        return get_snapshot(self.db, snapshot_id=parent.dataset_snapshot_id).max_record_id

    def _records(
        self, *, tenant_id: int, user: JobUser, after: int | None, through: int
    ) -> Iterator[FeedbackRecord]:
        """The user's records with ``after < id <= through``, paged in id order."""
        cursor = after
        while True:
            page = list_feedback(
                self.db,
                tenant_id=tenant_id,
                external_id=user.external_id,
                after_id=cursor,
                limit=MAX_PAGE_SIZE,
                kind=user.kind,
            )
            for record in page:
                if record.id > through:
                    return
                yield record
            if len(page) < MAX_PAGE_SIZE:
                return
            cursor = page[-1].id

    def _replay(
        self, *, tenant_id: int, user: JobUser, since: int | None, n_new: int
    ) -> list[FeedbackRecord]:
        """A reservoir sample of the records the parent saw, ``replay_ratio`` per new record; seeded by the
        config, the user and the data range, so a re-run of the job picks the same records."""
        k = int(self.config.replay_ratio * n_new + 0.5)
        if since is None or k == 0:
            return []
        older = list(self._records(tenant_id=tenant_id, user=user, after=None, through=since))
        seed_text = f"lorafleet-replay/{self.config.seed}/{user.user_id}/{since}/{user.watermark}"
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
        return reservoir_sample(older, k, seed=seed)

    # --- training -----------------------------------------------------------------------------------------
    def _train(
        self,
        plans: Sequence[TrainingInput],
        *,
        work: Path,
        should_stop: Callable[[], None],
        progress: job_progress.TrainerCallback | None = None,
    ) -> list[TrainedUser]:
        """Load every user's slot, train them in one ``train_slots`` call, save them; slots are evicted
        afterwards whatever happens, so the bank is clean for the next job."""
        slots: list[int] = []
        try:
            tasks = [self._load_slot(plan, slots=slots, work=work) for plan in plans]
            results = (self._train_slots or train_slots)(
                self.bank,
                self.backbone.tokenizer,
                tasks,
                self.config,
                should_stop=should_stop,
                progress=progress or self.progress,
                progress_every=1,  # every step: the lease throttles what reaches the database
                prefix=self.prefix,
            )
            trained = []
            for plan, task, result in zip(plans, tasks, results, strict=True):
                saved = save_slot(self.bank, task.slot, work / f"user-{plan.user.user_id}")
                trained.append(self._trained(plan, saved=saved, metrics=result.metrics))
            return trained
        finally:
            for slot in slots:
                self.bank.evict_slot(slot)

    def _load_slot(self, plan: TrainingInput, *, slots: list[int], work: Path) -> SlotTraining:
        """The parent's weights (fetched, sha256- and fingerprint-checked) or a fresh slot, as a task."""
        slot = self.bank.free_slot()
        parent = plan.parent
        if parent is None:
            self.bank.init_slot(slot, self.slot_config, seed=self.config.seed)
        else:
            if parent.base_fingerprint != self.bank.fingerprint:
                raise BackboneMismatchError(
                    f"{plan.user.label}: live version {parent.number} was trained on another backbone"
                )
            folder = self.registry.fetch_version(version=parent, dest_dir=work / f"parent-{parent.id}")
            load_slot_from_dir(self.bank, slot, folder, require_fingerprint=True, name=f"version-{parent.id}")
        slots.append(slot)
        pull = parent is not None and self.config.l2_to_parent > 0
        return SlotTraining(
            slot=slot,
            key=plan.user.label,
            train=plan.dataset.train,
            holdout=plan.dataset.holdout,
            parent_state=self.bank.slot_state_dict(slot) if pull else None,
            anchors=self._anchors(plan),
            continues=parent is not None,
        )

    def _anchors(self, plan: TrainingInput) -> list[Example]:
        """A seeded sample of the base's answers to general prompts, ``anchor_ratio`` of the user's rows, then a
        user's contrast rows (``contrast_ratio`` of its training rows, :mod:`lorafleet.training.contrast`)."""
        ratio, train = self.config.anchor_ratio, plan.dataset.train
        if ratio <= 0 or not train:
            return []
        wanted = math.ceil(ratio / (1 - ratio) * len(train))
        with self.bank.base_only():  # the base's own answers; generated once per process
            pool = anchor_examples(self.backbone)
        anchors = reservoir_sample(pool, min(wanted, len(pool)), seed=self._seed("anchors", plan))
        # the rows teach through the anchor unlikelihood alone: without it they would train nothing
        contrast = self.config.contrast_ratio > 0 and self.config.anchor_unlikelihood > 0
        if contrast and plan.user.task_name is None:
            anchors += sample_contrast_rows(
                train, self.config.contrast_ratio, seed=self._seed("contrast", plan)
            )
        return anchors

    def _seed(self, purpose: str, plan: TrainingInput) -> int:
        return int(
            hashlib.sha256(f"{purpose}/{self.config.seed}/{plan.user.label}".encode()).hexdigest()[:15], 16
        )

    def _trained(
        self, plan: TrainingInput, *, saved: SavedAdapter, metrics: Mapping[str, float]
    ) -> TrainedUser:
        full = {
            **{k: job_progress.finite_or_none(v) for k, v in metrics.items()},
            "new_records": len(plan.new_ids),
            "replay_records": len(plan.replay_ids),
        }

        promote, reason = promote_decision(self.promote_rule, full)
        prompts = [example.prompt for example in plan.dataset.train]
        key, claim = (
            routing_key_and_claim(
                self.backbone,
                self.bank,
                prompts,
                general=general_exemplars(self.backbone, self.bank),
                prefix=self.prefix,
            )
            if prompts
            else (None, None)
        )
        return TrainedUser(plan, saved, full, promote, reason, key, claim)

    # --- registering --------------------------------------------------------------------------------------
    def _register(
        self,
        *,
        job: Job,
        lease: LeaseContext,
        tenant_id: int,
        trained: Sequence[TrainedUser],
        skipped: Mapping[str, str],
    ) -> dict[str, Any]:
        """Snapshots, versions and the job's success in one fenced transaction (LeaseLostError: none)."""
        skipped = dict(skipped)
        with lease.fenced() as fence:
            entries = []
            for user in trained:
                guard = self._registration_guard(tenant_id=tenant_id, plan=user.plan)
                if guard is not None:  # a deletion since the job read the records: nothing of theirs
                    skipped[user.plan.user.label] = guard
                    logger.info("%s: not registered (%s)", user.plan.user.label, guard)
                    continue
                entries.append(self._register_user(job=job, tenant_id=tenant_id, user=user))
            qa_jobs = queue_candidate_qa(
                queue=JobQueue(self.db),
                promote_rule=self.promote_rule,
                tenant_id=tenant_id,
                version_ids=[e.version_id for e in entries],
            )
            result = TrainResult(
                versions=entries, skipped=dict(skipped), promote_rule=self.promote_rule, qa_jobs=qa_jobs
            ).to_json()
            fence.succeed(result)
        return result

    def _registration_guard(self, *, tenant_id: int, plan: TrainingInput) -> str | None:
        """Under the subject's row lock (which ``lorafleet.workflows.deletion`` takes too): why the subject's
        version must not be registered (it was erased, a record of the plan was deleted, or the parent version
        was revoked since the job read it), or None."""
        user_id = plan.user.user_id
        if not self.db.run(record_deletion.lock_subject_by_id, user_id=user_id):
            return SKIP_SUBJECT_DELETED
        present = self.db.run(record_deletion.present_records, user_id=user_id, record_ids=plan.record_ids)
        if len(present) != len(plan.record_ids):
            return SKIP_RECORDS_DELETED
        if plan.parent is not None:
            parent = self.registry.get_version_by_id(tenant_id=tenant_id, version_id=plan.parent.id)
            if parent.status == VersionStatus.REVOKED:
                return SKIP_PARENT_REVOKED
        return None

    def _register_user(self, *, job: Job, tenant_id: int, user: TrainedUser) -> TrainedVersion:
        """The user's dataset snapshot and new version, in the job's fenced transaction."""
        plan = user.plan
        snapshot = self.db.run(
            insert_snapshot,
            user_id=plan.user.user_id,
            record_ids=plan.record_ids,
            details=_snapshot_details(plan),
        )
        parents = [] if plan.parent is None else [(plan.parent.id, CONTINUED_FROM)]
        version = self.registry.register_version(
            tenant_id=tenant_id,
            adapter_id=plan.adapter.id,
            adapter_dir=user.saved.directory,
            base_fingerprint=self.backbone.fingerprint.digest,
            parents=parents,
            training_config={**self.config.model_dump(), "backbone": self.backbone.source},
            metrics=user.metrics,
            job_id=job.id,
            dataset_snapshot_id=snapshot.id,
            status=VersionStatus.CANDIDATE,
            routing_key=user.routing_key,
            routing_claim=user.routing_claim,
        )
        return TrainedVersion(
            user_id=plan.user.user_id,
            external_id=plan.user.label,
            kind=plan.user.kind,
            adapter_id=plan.adapter.id,
            version_id=version.id,
            number=version.number,
            parent_version_id=None if plan.parent is None else plan.parent.id,
            dataset_snapshot_id=version.dataset_snapshot_id,
            promote=user.promote,
            promote_reason=user.reason,
        )

    # --- promoting ----------------------------------------------------------------------------------------
    def _apply_promotions(
        self, *, tenant_id: int, trained: Sequence[TrainedUser], result: Mapping[str, Any]
    ) -> None:
        """Move ``live`` to each new version the rule accepted, unless ``live`` moved since the job read it."""
        registered = {entry["user_id"]: entry for entry in result["versions"]}
        for user in trained:
            entry = registered.get(user.plan.user.user_id)
            if entry is None:  # not registered (the registration guard)
                continue
            if not user.promote:
                logger.info(
                    "user %s: version %d stays a candidate (%s)",
                    entry["external_id"],
                    entry["number"],
                    user.reason,
                )
                continue
            self._promote(tenant_id=tenant_id, user=user, number=entry["number"])

    def _promote(self, *, tenant_id: int, user: TrainedUser, number: int) -> None:
        adapter_id = user.plan.adapter.id
        live = self.registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
        expected = None if user.plan.parent is None else user.plan.parent.id
        if (None if live is None else live.id) != expected:
            logger.info("adapter %d: live moved during the job; version %d not promoted", adapter_id, number)
            return
        try:
            self.registry.promote(
                tenant_id=tenant_id,
                adapter_id=adapter_id,
                number=number,
                actor=AUTO_PROMOTE_ACTOR,
                reason=user.reason,
            )
        except InvalidStateError as exc:  # e.g. promoted already by a concurrent actor
            logger.warning("adapter %d: version %d not promoted: %s", adapter_id, number, exc)
            return
        logger.info("adapter %d: version %d is live (%s)", adapter_id, number, user.reason)


def _tenant_of(job: Job) -> int:
    if job.tenant_id is None:
        raise ValidationError(f"train job {job.id} has no tenant (jobs are grouped per tenant)")
    return job.tenant_id


def _snapshot_details(plan: TrainingInput) -> dict[str, Any]:
    """What the snapshot's ids are: the new range, the replayed ids and the holdout ids."""
    return {
        "new_min_id": min(plan.new_ids),
        "new_max_id": max(plan.new_ids),
        "new_count": len(plan.new_ids),
        "replay_ids": list(plan.replay_ids),
        "holdout_ids": sorted(e.record_id for e in plan.dataset.holdout),
        "excluded": dict(plan.dataset.excluded),
        "watermark": plan.user.watermark,
        "parent_version_id": None if plan.parent is None else plan.parent.id,
    }


__all__ = [
    "AUTO_PROMOTE_ACTOR",
    "PERSONAL_ADAPTER",
    "PROMOTE_RULES",
    "ContinualTrainer",
    "JobUser",
    "PromoteRule",
    "TrainedUser",
    "TrainingInput",
    "parse_job_users",
    "promote_decision",
]
