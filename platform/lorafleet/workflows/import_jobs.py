"""``import`` jobs: registering an existing PEFT adapter as a version of a shared task adapter, or of a user's own
adapter (``submit_import`` with ``user`` and ``adapter``), on a trainer.

Why a job and not the API process: the checks need the backbone (shapes against its layers, a load into a bank
slot, the routing key from the example prompts' embeddings), and the trainer actors already hold it. So the API
only validates what it can without one (``submit_import``: the archive unpacks safely, the files are a PEFT
LoRA adapter with finite weights within the weight bounds, ``adapter_import.check_archive_weights``; a refusal
stores nothing), stores the uploaded archive as a content-addressed blob and queues a job; a trainer runs
``ImportRunner.run_job``:

1. fetch the archive (sha256-verified) and run every check of ``lorafleet.workflows.adapter_import.prepare_import``
   (safetensors only, safe extraction, shapes, rank, finite values, weight bounds, backbone fingerprint);
2. register the version (lineage ``imported``) with the job's id: the unique ``(adapter_id, job_id)`` index
   makes it one version per job, and a retried or taken-over job finds it instead of registering another;
3. in the job's fenced transaction: its ``qa`` job (promote rule ``qa``; dedupe key ``qa:<version id>``) and
   the job's success, committed together. A worker that dies between 2 and 3 leaves a candidate that the
   retried job then hands to QA.

The uploaded archive blob is referenced by no row: ``Registry.gc`` removes it after the grace period (the
version's own blob is the normalised PEFT folder the registry packs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.domain import Job, JobKind, PromoteRule
from lorafleet.domain.jobs import ImportPayload, ImportResult
from lorafleet.errors import NotFoundError, PayloadTooLargeError, ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.qa.policy import QAPolicy
from lorafleet.registry.archive import archive_kind
from lorafleet.registry.weight_sanity import WeightBounds
from lorafleet.store.sql.tenants import get_or_create_user_id, user_id_of, validate_external_id
from lorafleet.workflows.adapter_import import (
    ImportRequest,
    check_archive_weights,
    check_example_prompts,
    check_import_examples,
    prepare_import,
    register_import,
)
from lorafleet.workflows.live_alias import queue_candidate_qa
from lorafleet.workflows.tasks import validate_task_name
from lorafleet.workflows.workdirs import owned_tempdir

if TYPE_CHECKING:
    from lorafleet.jobs.worker import LeaseContext
    from lorafleet.registry import Registry
    from lorafleet.store.sql.database import Database
    from lorafleet.training.resident import Resident

from lorafleet.domain import text as text_limits

logger = logging.getLogger(__name__)

IMPORT_JOB_KIND = JobKind.IMPORT
IMPORT_MAX_ATTEMPTS = 3
#: largest archive accepted for import (the API's request body limit applies first)
MAX_IMPORT_ARCHIVE_BYTES = text_limits.MAX_IMPORT_ARCHIVE_BYTES


@dataclass(frozen=True)
class ImportSubmitted:
    job: Job
    created: bool
    archive_sha256: str


def _check_archive(archive: bytes) -> None:
    """Refuse at once what the trainer would refuse anyway: too large, or not a .tar, .tar.gz or .zip."""
    if len(archive) > MAX_IMPORT_ARCHIVE_BYTES:
        raise PayloadTooLargeError(f"archive: {len(archive)} bytes, more than {MAX_IMPORT_ARCHIVE_BYTES}")
    if archive_kind(archive[:512]) is None:
        raise ValidationError("archive: not a .tar, .tar.gz or .zip archive")


def submit_import(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int,
    archive: bytes,
    example_prompts: Sequence[str],
    actor: str,
    task_name: str | None = None,
    user: str | None = None,
    adapter: str | None = None,
    reason: str = "",
    queue: JobQueue | None = None,
    weight_bounds: WeightBounds | None = None,
    examples: Sequence[Mapping[str, Any]] = (),
) -> ImportSubmitted:
    """Check the archive's files (``check_archive_weights``; ``weight_bounds`` default ``WeightBounds()``), then
    store it as a blob and queue its ``import`` job (the same archive for the same adapter while a job is active:
    that job, ``created`` False). A refused archive stores nothing. ``examples``: the import's evidence
    (``{"prompt", "expected"}`` objects, ``adapter_import.check_import_examples``), QA's holdout for it; without
    them QA uses the adapter's feedback holdout, and with neither the version waits for a person (decision
    ``hold``).

    Where it goes: the task ``task_name``'s adapter, or the user ``user``'s own adapter ``adapter`` (both
    created by the job when absent). A user is created on first sight, as by feedback, but only once the archive
    passed the checks: a refusal changes nothing."""
    target = _import_target(task_name, user, adapter)
    prompts = check_example_prompts(example_prompts)
    evidence = check_import_examples(examples)
    _check_archive(archive)
    check_archive_weights(archive, weight_bounds=weight_bounds, max_bytes=MAX_IMPORT_ARCHIVE_BYTES)
    ref = registry.blobs.put_bytes(archive)
    payload = ImportPayload(
        **target,
        archive_sha256=ref.sha256,
        archive_size=ref.size,
        example_prompts=prompts,
        actor=actor,
        reason=reason,
        examples=evidence,
    )
    if payload.user is not None:
        db.run(get_or_create_user_id, tenant_id=tenant_id, external_id=payload.user)
    # a task's key as it always was; a user's adapter's names the user too
    where = payload.task if payload.task is not None else f"user:{payload.user}:{payload.adapter}"
    result = (queue or JobQueue(db)).submit(
        tenant_id=tenant_id,
        kind=IMPORT_JOB_KIND,
        payload=payload.to_json(),
        dedupe_key=f"import:{tenant_id}:{ref.sha256}:{where}"[:256],
        max_attempts=IMPORT_MAX_ATTEMPTS,
    )
    logger.info("import of %s into %s queued as job %d", ref.sha256[:12], payload.target, result.job.id)
    return ImportSubmitted(job=result.job, created=result.created, archive_sha256=ref.sha256)


def _import_target(task_name: str | None, user: str | None, adapter: str | None) -> dict[str, str]:
    """The payload fields naming where an import goes: ``{"task"}`` or ``{"user", "adapter"}``, validated."""
    if task_name is not None and user is None and adapter is None:
        return {"task": validate_task_name(task_name)}
    if task_name is None and user is not None and adapter is not None:
        return {"user": validate_external_id(user), "adapter": validate_task_name(adapter)}
    raise ValidationError("an import names a task_name, or a user and their adapter")


def import_weight_bounds(qa_policy: Mapping[str, Any] | None) -> WeightBounds:
    """The weight bounds an import is held to: those of the configured QA policy (``Settings.qa_policy``), so an
    import is refused by the bounds QA would reject it by."""
    return QAPolicy.from_mapping(qa_policy).weight_bounds()


class ImportRunner:
    """The ``import`` handler on a trainer's resident backbone and bank (one free slot is used, then freed)."""

    def __init__(
        self,
        resident: Resident,
        *,
        promote_rule: str = PromoteRule.QA,
        work_dir: Path | None = None,
        weight_bounds: WeightBounds | None = None,
    ) -> None:
        self.db, self.registry = resident.db, resident.registry
        self.backbone, self.bank = resident.backbone, resident.bank
        self.promote_rule = promote_rule
        self.work_dir = work_dir
        self.weight_bounds = weight_bounds

    def run_job(self, job: Job, lease: LeaseContext) -> dict[str, Any]:
        if job.tenant_id is None:
            raise ValidationError(f"import job {job.id} has no tenant")
        p = ImportPayload.parse(job.payload)
        owner_user_id = None
        if p.user is not None:  # a user's own adapter: the user must still exist
            owner_user_id = self.db.run(user_id_of, tenant_id=job.tenant_id, external_id=p.user)
            if owner_user_id is None:
                raise NotFoundError(f"user {p.user!r} not found")
        with owned_tempdir(f"lorafleet-import-{job.id}-", dir=self.work_dir) as tmp:
            archive = Path(tmp) / "upload"  # the unpacker reads the kind from the bytes
            self.registry.blobs.download(p.archive_sha256, archive, expected_size=p.archive_size)
            request = ImportRequest(
                tenant_id=job.tenant_id,
                task_name=p.adapter_name,
                source=archive,
                example_prompts=p.example_prompts,
                actor=p.actor,
                weight_bounds=self.weight_bounds,
                examples=p.examples,
                owner_user_id=owner_user_id,
            )
            prepared = prepare_import(
                self.registry, request, backbone=self.backbone, bank=self.bank, work_dir=Path(tmp) / "work"
            )
            lease.check()
            imported = register_import(self.registry, prepared, job_id=job.id)
            with lease.fenced() as fence:
                qa_jobs = queue_candidate_qa(
                    queue=JobQueue(self.db),
                    promote_rule=self.promote_rule,
                    tenant_id=job.tenant_id,
                    version_ids=[imported.version.id],
                )
                result = ImportResult(
                    task=p.task,
                    user=p.user,
                    adapter=p.adapter,
                    adapter_id=imported.adapter.id,
                    version_id=imported.version.id,
                    number=imported.version.number,
                    parent_version_id=imported.parent_version_id,
                    source_sha256=imported.source_sha256,
                    qa_job=qa_jobs[0] if qa_jobs else None,
                ).to_json()
                fence.succeed(result)
        logger.info("job %d: imported %s as version %d", job.id, p.target, imported.version.number)
        return result


__all__ = [
    "IMPORT_JOB_KIND",
    "ImportRunner",
    "ImportSubmitted",
    "MAX_IMPORT_ARCHIVE_BYTES",
    "import_weight_bounds",
    "submit_import",
]
