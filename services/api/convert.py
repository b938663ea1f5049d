"""Library objects -> the API's response models (``lorafleet.sdk.schemas``); no I/O here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lorafleet.domain import Adapter, AdapterVersion, AliasEvent, FeedbackRecord, Job, QADecision
from lorafleet.feedback import IngestResult
from lorafleet.registry import Lineage, LineageNode
from lorafleet.routing.bank import Enrolment
from lorafleet.sdk import schemas as s
from lorafleet.serving.requests import GenerationResult, TokenLogprob
from lorafleet.store.sql.qa_repository import QAReport
from lorafleet.store.sql.tenants import ApiKeyInfo
from lorafleet.workflows.live_alias import VersionQA
from lorafleet.workflows.tasks import TaskInfo


def api_key(info: ApiKeyInfo) -> s.ApiKeyOut:
    return s.ApiKeyOut(
        id=info.id,
        prefix=info.prefix,
        created_at=info.created_at,
        last_used_at=info.last_used_at,
        revoked_at=info.revoked_at,
    )


def feedback_submitted(result: IngestResult) -> s.FeedbackSubmitted:
    return s.FeedbackSubmitted(ids=result.ids, created=result.created, duplicates=result.duplicates)


def feedback_record(record: FeedbackRecord) -> s.FeedbackRecordOut:
    return s.FeedbackRecordOut(
        id=record.id,
        kind=record.kind,
        payload=record.payload,
        content_hash=record.content_hash,
        created_at=record.created_at,
    )


def adapter(adapter: Adapter, *, live: AdapterVersion | None) -> s.AdapterOut:
    return s.AdapterOut(
        id=adapter.id,
        name=adapter.name,
        target_config=adapter.target_config,
        live_version=None if live is None else live.number,
        created_at=adapter.created_at,
    )


def version(v: AdapterVersion, *, adapter_name: str | None, qa: VersionQA | None = None) -> s.VersionOut:
    """``qa``: the version's QA state (``workflows.live_alias.versions_qa``); without it, from nothing known."""
    qa = qa or VersionQA()
    return s.VersionOut(
        qa_decision=None if qa.decision is None else str(qa.decision),
        qa_state=qa.state,  # type: ignore[arg-type]  # one of QAState's values
        forced_live=qa.forced_live,
        id=v.id,
        adapter_id=v.adapter_id,
        adapter=adapter_name,
        number=v.number,
        status=v.status,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        base_fingerprint=v.base_fingerprint,
        rank=v.rank,
        target_modules=list(v.target_modules),
        training_config=v.training_config,
        metrics=v.metrics,
        job_id=v.job_id,
        dataset_snapshot_id=v.dataset_snapshot_id,
        created_at=v.created_at,
    )


def qa_report(report: QAReport) -> s.QAReportOut:
    return s.QAReportOut(
        id=report.id,
        kind=report.kind,
        decision=report.decision,
        reasons=list(report.reasons),
        summary=report.summary,
        policy_version=report.policy_version,
        blob_sha256=report.blob_sha256,
        job_id=report.job_id,
        created_at=report.created_at,
    )


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
            dataset_snapshot=None
            if snap is None
            else s.DatasetSnapshotOut(
                id=snap.id,
                record_count=snap.record_count,
                content_hash=snap.content_hash,
                min_record_id=snap.min_record_id,
                max_record_id=snap.max_record_id,
                created_at=snap.created_at,
            ),
            job=None
            if job is None
            else s.JobSummaryOut(
                id=job.id,
                kind=job.kind,
                state=job.state,
                created_at=job.created_at,
                finished_at=job.finished_at,
            ),
            qa_decisions=[r.decision for r in n.qa_reports],
        )

    return s.LineageOut(
        root=node(found.root),
        ancestors=[node(n) for n in found.ancestors],
        descendants=[node(n) for n in found.descendants],
        edges=[
            s.LineageEdgeOut(
                child_version_id=e.child_version_id,
                parent_version_id=e.parent_version_id,
                relation=e.relation,
            )
            for e in found.edges
        ],
    )


def alias_event(event: AliasEvent, *, adapter_name: str, numbers: Mapping[int, int]) -> s.AliasEventOut:
    """``numbers``: version id -> number, to show the move in the numbers users know."""

    def number(version_id: int | None) -> int | None:
        return None if version_id is None else numbers.get(version_id)

    return s.AliasEventOut(
        id=event.id,
        adapter=adapter_name,
        from_version=number(event.from_version_id),
        to_version=number(event.to_version_id),
        from_version_id=event.from_version_id,
        to_version_id=event.to_version_id,
        actor=event.actor,
        reason=event.reason,
        created_at=event.created_at,
        forced=event.forced,
    )


def job(j: Job, *, hide: Callable[[str], str] | None = None) -> s.JobOut:
    """A job as its tenant sees it; ``hide`` takes the server's paths out of its error (``ServerPaths.hide``)."""
    users = [_subject_label(u) for u in j.payload.get("users", []) if isinstance(u, Mapping)]
    return s.JobOut(
        id=j.id,
        kind=j.kind,
        state=j.state,
        users=users,
        attempts=j.attempts,
        max_attempts=j.max_attempts,
        error=j.error if j.error is None or hide is None else hide(j.error),
        result=j.result,
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        progress=None if j.progress is None else s.JobProgressOut.model_validate(j.progress),
        cancel_requested_at=j.cancel_requested_at,
        cancelled_by=j.cancelled_by,
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
    from lorafleet.domain.subject import Subject

    return Subject.from_row(str(entry.get("kind")), str(entry.get("external_id"))).label


def task(info: TaskInfo) -> s.TaskOut:
    return s.TaskOut(
        name=info.name,
        adapter_id=info.adapter_id,
        live_version=info.live_version,
        versions=info.versions,
        enrolled_users=info.enrolled_users,
        feedback_records=info.feedback_records,
    )


def enrolment(e: Enrolment) -> s.EnrolmentOut:
    return s.EnrolmentOut(task=e.task_name, adapter_id=e.adapter_id, actor=e.actor, enrolled_at=e.enrolled_at)


def serving_info(result: GenerationResult) -> s.ServingInfo:
    served = [
        s.ServedByOut(
            adapter=b.adapter,
            adapter_id=b.adapter_id,
            version=b.version,
            version_id=b.version_id,
            sha256=b.sha256,
            weight=b.weight,
        )
        for b in result.served_by
    ]
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
