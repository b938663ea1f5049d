"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus metrics (``/metrics``); no auth needed, except
``/metrics`` when ``LORAFLEET_METRICS_TOKEN`` is set."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lorafleet.errors import AuthError, LorafleetError
from lorafleet.sdk import schemas as s
from services.api.deps import Credentials, Services
from services.api.metrics import exposition, gauge_lines, job_lines
from services.api.runtime import BackgroundRuntime

router = APIRouter(tags=["health"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=s.HealthOut)
def healthz() -> s.HealthOut:
    """The process is up (it answers without touching the database)."""
    return s.HealthOut()


@router.get("/readyz", response_model=s.ReadyOut, responses={503: {"model": s.ReadyOut}})
def readyz(services: Services, request: Request) -> JSONResponse:
    """Ready when the database answers and, if the service preloads it, the serving engine is loaded; also
    reports the engine (loaded lazily on first inference otherwise), the workers and the scheduler."""
    runtime: BackgroundRuntime = request.app.state.runtime
    database_ok = services.database_ok()
    engine = services.engine
    ready = database_ok and (engine.state == "ready" or not services.options.preload_engine)
    report = s.ReadyOut(
        ready=ready,
        database="ok" if database_ok else "unavailable",
        engine=engine.state,
        workers=runtime.workers_state,
        scheduler=runtime.scheduler_state,
        detail=engine.error,
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(services: Services, credentials: Credentials) -> PlainTextResponse:
    """Requests and latencies by route, jobs by state, the serving engine's batches and its adapter cache. With
    ``LORAFLEET_METRICS_TOKEN`` set, only for ``Authorization: Bearer <that token>`` (else 401)."""
    expected = services.settings.metrics_token
    if expected:
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthError("/metrics needs the metrics token (LORAFLEET_METRICS_TOKEN) as a bearer token")
    sections = [services.metrics.render()]
    try:
        sections.append(job_lines(services.queue.counts_by_state()))
        sections.append(gauge_lines("database_up", "Whether the metadata database answers.", 1))
    except LorafleetError:
        sections.append(gauge_lines("database_up", "Whether the metadata database answers.", 0))
    loaded = services.engine.state == "ready"
    sections.append(gauge_lines("engine_loaded", "Whether the serving engine is loaded.", int(loaded)))
    sections.append(services.engine.metrics_text().splitlines())
    return PlainTextResponse(exposition(sections), media_type=PROMETHEUS_TEXT)
