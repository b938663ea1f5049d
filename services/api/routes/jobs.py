"""Jobs: train a user now, a job by id (with its progress), the tenant's jobs (optionally one user's, or in one
state), and cancelling a job."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from lorafleet.jobs.queue import SubmitResult
from lorafleet.sdk import schemas as s
from services.api import convert
from services.api.deps import CurrentTenant, JobId, PageLimit, Paths, Services, UserFilter, UserId, actor_of
from services.api.idempotency import Idempotent, IdempotentCall

router = APIRouter(tags=["jobs"])


@router.post("/v1/users/{user_id}/train", response_model=s.TrainSubmitted, status_code=202)
def train_now(
    services: Services,
    tenant: CurrentTenant,
    user_id: UserId,
    call: Idempotent,
    body: s.TrainRequest | None = None,
) -> JSONResponse:
    """Queue a training job for the user on their feedback so far (a user already in an active job gets that
    job, ``created`` false, with its own config). A user with nothing new since their last version is 422.
    ``training`` overrides the tenant's training config for this job (a bad field is 422 ``training.<field>``)."""
    train = partial(services.scheduler.train_now, tenant_id=tenant.id, user_external_id=user_id)
    return submit_training(call, body, train)


def submit_training(
    call: IdempotentCall, body: s.TrainRequest | None, train: Callable[..., SubmitResult]
) -> JSONResponse:
    """A train job queued by ``train`` (``Scheduler.train_now`` or ``train_task_now`` with its subject given,
    called with the body's ``training`` overrides) behind the request's idempotency key: 202 with the job."""

    def submit() -> s.TrainSubmitted:
        result = train(training=convert.job_overrides(body))
        return s.TrainSubmitted(job=convert.job(result.job), created=result.created)

    return call.run(submit, body=body, status_code=202)


@router.get("/v1/jobs/{job_id}", response_model=s.JobOut)
def get_job(services: Services, tenant: CurrentTenant, job_id: JobId, paths: Paths) -> s.JobOut:
    """One of the tenant's jobs (another tenant's is 404)."""
    return convert.job(services.queue.get(tenant_id=tenant.id, job_id=job_id), hide=paths.hide)


@router.post("/v1/jobs/{job_id}/cancel", response_model=s.JobOut)
def cancel_job(
    services: Services, tenant: CurrentTenant, job_id: JobId, call: Idempotent, paths: Paths
) -> JSONResponse:
    """Cancel one of the tenant's jobs: a queued job is ``cancelled`` at once; a running one stops at its
    next step (answered still ``running``, with ``cancel_requested_at``) and ends ``cancelled`` without a
    version. Repeats are harmless; a succeeded or failed job is 409 ``job_finished`` naming its state."""

    def cancel() -> s.JobOut:
        cancelled = services.queue.cancel(tenant_id=tenant.id, job_id=job_id, actor=actor_of(tenant))
        return convert.job(cancelled, hide=paths.hide)

    return call.run(cancel, body=None)


@router.get("/v1/jobs", response_model=list[s.JobOut])
def list_jobs(
    services: Services,
    tenant: CurrentTenant,
    paths: Paths,
    user: UserFilter = None,
    state: Annotated[s.JobState | None, Query()] = None,
    limit: PageLimit = 100,
) -> list[s.JobOut]:
    """The tenant's jobs, newest first; filtering by a user the tenant does not have is 404."""
    if user is not None:
        services.tenants.get_user(tenant_id=tenant.id, external_id=user)
    jobs = services.queue.list_jobs(tenant_id=tenant.id, user_external_id=user, state=state, limit=limit)
    return [convert.job(j, hide=paths.hide) for j in jobs]
