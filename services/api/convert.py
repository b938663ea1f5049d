"""Library objects -> the API's response models (``lorafleet.sdk.schemas``); no I/O here. The CLI prints
deletion receipts through ``deletion_receipt`` too, so both show the same fields in the same format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from lorafleet.domain import (
    Adapter,
    AdapterVersion,
    AliasEvent,
    AuditEvent,
    DeletionReceipt,
    FeedbackRecord,
    Job,
    QADecision,
    UserSummary,
)
from lorafleet.domain.subject import Subject
from lorafleet.feedback import IngestResult
from lorafleet.registry import Lineage, LineageNode
from lorafleet.routing.experts import Enrolment
from lorafleet.sdk import schemas as s
from lorafleet.serving.requests import GenerationResult, TokenLogprob
from lorafleet.store.sql.qa_repository import QAReport
from lorafleet.store.sql.tenants import ApiKeyInfo
from lorafleet.workflows.deletion import RebuildStatus
from lorafleet.workflows.live_alias import VersionQA
from lorafleet.workflows.tasks import TaskInfo

_Model = TypeVar("_Model", bound=BaseModel)


def _copied(model: type[_Model], source: object, **given: Any) -> _Model:
    """A ``model`` with the ``given`` fields, and each of its other fields copied from the attribute of the same
    name of ``source``: most response fields are the library object's own, so only the ones that differ (a
    name, a number instead of an id, a label) are spelled out. A field ``source`` lacks is an AttributeError."""
    copied = {name: getattr(source, name) for name in model.model_fields if name not in given}
    return model(**copied, **given)


def api_key(info: ApiKeyInfo) -> s.ApiKeyOut:
    return _copied(s.ApiKeyOut, info)


def user_summary(user: UserSummary) -> s.UserOut:
    return _copied(s.UserOut, user)


def audit_event(event: AuditEvent, *, tenant_names: Mapping[int, str]) -> s.AuditEventOut:
    """An audit event; ``tenant`` named from ``tenant_names`` (None: admin-wide, or a tenant no longer there)."""
    tenant = None if event.tenant_id is None else tenant_names.get(event.tenant_id)
    return _copied(s.AuditEventOut, event, tenant=tenant)


def feedback_submitted(result: IngestResult) -> s.FeedbackSubmitted:
    return s.FeedbackSubmitted(ids=result.ids, created=result.created, duplicates=result.duplicates)


def feedback_record(record: FeedbackRecord) -> s.FeedbackRecordOut:
    return _copied(s.FeedbackRecordOut, record)


def adapter(adapter: Adapter, *, live: AdapterVersion | None) -> s.AdapterOut:
    return _copied(s.AdapterOut, adapter, live_version=None if live is None else live.number)


def version(v: AdapterVersion, *, adapter_name: str | None, qa: VersionQA | None = None) -> s.VersionOut:
    """``qa``: the version's QA state (``workflows.live_alias.versions_qa``); without it, from nothing known."""
    qa = qa or VersionQA()
    return _copied(
        s.VersionOut,
        v,
        adapter=adapter_name,
        target_modules=list(v.target_modules),
        qa_decision=None if qa.decision is None else str(qa.decision),
        qa_state=qa.state,
        forced_live=qa.forced_live,
    )


def qa_report(report: QAReport) -> s.QAReportOut:
    return _copied(s.QAReportOut, report, reasons=list(report.reasons))


def version_detail(
    v: AdapterVersion,
    *,
    adapter_name: str,
    reports: list[QAReport],
    document: dict[str, object] | None,
    qa: VersionQA | None = None,
) -> s.VersionDetail:
    """A version with its QA reports (oldest first): the latest one's decision is the version's."""
    latest = reports[-1] if reports else None
    return s.VersionDetail(
        **version(v, adapter_name=adapter_name, qa=qa).model_dump(),
        qa_report=None if latest is None else qa_report(latest),
        qa_reports=[qa_report(r) for r in reports],
        qa_document=document,
    )


def lineage(found: Lineage, *, adapter_names: Mapping[int, str]) -> s.LineageOut:
    def node(n: LineageNode) -> s.LineageNodeOut:
        snap, job = n.dataset_snapshot, n.job
        return s.LineageNodeOut(
            version=version(
                n.version,
                adapter_name=adapter_names.get(n.version.adapter_id),
                qa=VersionQA(QADecision(n.qa_reports[-1].decision)) if n.qa_reports else None,
            ),
            distance=n.distance,
            dataset_snapshot=None if snap is None else _copied(s.DatasetSnapshotOut, snap),
            job=None if job is None else _copied(s.JobSummaryOut, job),
            qa_decisions=[r.decision for r in n.qa_reports],
        )

    return s.LineageOut(
        root=node(found.root),
        ancestors=[node(n) for n in found.ancestors],
        descendants=[node(n) for n in found.descendants],
        edges=[_copied(s.LineageEdgeOut, e) for e in found.edges],
    )


def alias_event(event: AliasEvent, *, adapter_name: str, numbers: Mapping[int, int]) -> s.AliasEventOut:
    """``numbers``: version id -> number, to show the move in the numbers users know."""

    def number(version_id: int | None) -> int | None:
        return None if version_id is None else numbers.get(version_id)

    return _copied(
        s.AliasEventOut,
        event,
        adapter=adapter_name,
        from_version=number(event.from_version_id),
        to_version=number(event.to_version_id),
    )


def deletion_receipt(
    receipt: DeletionReceipt, *, rebuild: RebuildStatus | None = None
) -> s.DeletionReceiptOut:
    """``receipt`` with ``rebuild``, where its rebuild stands (``workflows.deletion.rebuild_status``; None: a
    user's erasure, which rebuilds nothing, or not asked). The API (``DELETE /v1/users/{id}``, ``/v1/deletions``)
    and the CLI (``lorafleet forget``, ``lorafleet receipt --json``) answer with it: times in UTC as pydantic
    writes them, with a ``Z``."""
    return s.DeletionReceiptOut(
        id=receipt.id,
        kind=receipt.kind.value,
        subject=receipt.subject,
        actor=receipt.actor,
        created_at=receipt.created_at,
        request=receipt.request,
        record_hashes=list(receipt.record_hashes),
        revoked_versions=[s.RevokedVersionOut(**v) for v in receipt.revoked_versions],
        erased=receipt.erased,
        blobs=list(receipt.blobs),
        purge_after=receipt.purge_after,
        blobs_deleted_at=receipt.blobs_deleted_at,
        rebuild=None if rebuild is None else rebuild_out(rebuild),
    )


def rebuild_out(status: RebuildStatus) -> s.RebuildOut:
    return s.RebuildOut(
        job_id=status.job_id,
        job_state=status.job_state,
        versions=[
            s.RebuiltVersionOut(adapter=v.adapter, number=v.number, version_id=v.version_id, status=v.status)
            for v in status.versions
        ],
    )


def job(j: Job, *, hide: Callable[[str], str] | None = None) -> s.JobOut:
    """A job as its tenant sees it; ``hide`` takes the server's paths out of its error (``ServerPaths.hide``)."""
    return _copied(
        s.JobOut,
        j,
        users=[_subject_label(u) for u in j.payload.get("users", []) if isinstance(u, Mapping)],
        error=j.error if j.error is None or hide is None else hide(j.error),
        progress=None if j.progress is None else s.JobProgressOut.model_validate(j.progress),
        training=_job_training(j),
    )


def job_overrides(body: s.TrainRequest | None) -> dict[str, Any] | None:
    """The training overrides a train request gives for its job (None: none)."""
    return None if body is None or body.training is None else body.training.given()


def _job_training(j: Job) -> s.TrainingValues | None:
    """A train job's stored config (``payload["training"]``); None for other jobs and older train jobs."""
    stored = j.payload.get("training")
    return s.TrainingValues.model_validate(stored) if isinstance(stored, Mapping) else None


def _subject_label(entry: Mapping[str, Any]) -> str:
    """A train job's subject as clients see it: the user's id, or ``task:<name>`` for a task's dataset."""
    return Subject.from_row(str(entry.get("kind")), str(entry.get("external_id"))).label


def task(info: TaskInfo) -> s.TaskOut:
    return _copied(s.TaskOut, info)


def enrolment(e: Enrolment) -> s.EnrolmentOut:
    return _copied(s.EnrolmentOut, e, task=e.task_name)


def serving_info(result: GenerationResult) -> s.ServingInfo:
    served = [_copied(s.ServedByOut, b) for b in result.served_by]
    return s.ServingInfo(
        served_by=served,
        versions={b.adapter: b.version for b in served},
        gate_weights={b.adapter: b.weight for b in served},
        bank_revision=result.bank_revision,
    )


def usage(results: Iterable[GenerationResult], *, n: int = 1) -> s.Usage:
    """Token counts; with ``n`` choices per prompt (consecutive results), each prompt is counted once."""
    done = list(results)
    prompt = sum(r.prompt_tokens for r in done[::n])
    completion = sum(r.completion_tokens for r in done)
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def generated(result: GenerationResult) -> s.GenerateResponse:
    return s.GenerateResponse(
        **serving_info(result).model_dump(),
        text=result.text,
        finish_reason=result.finish_reason,
        usage=usage([result]),
    )


# --- log probabilities, in OpenAI's two formats ----------------------------------------------------------------
def completion_logprobs(entries: Iterable[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob per
    position) and ``text_offset`` (each token's start in the choice's text, from ``offset``)."""
    tokens, values, tops, offsets = [], [], [], []
    at = offset
    for entry in entries:
        tokens.append(entry.token)
        values.append(entry.logprob)
        tops.append({token: logprob for _, token, logprob in entry.top})
        offsets.append(at)
        at += len(entry.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """The chat format: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]} for e in entries
        ]
    }
