"""``create_app``: the FastAPI application of lorafleet's HTTP API.

The lifespan builds the services from the settings (unless given), prunes old idempotency keys, and starts what
``ApiOptions`` asks for (the scheduler loop, trainer actors, preloading the serving engine); on shutdown it
stops them and closes what it opened. Middleware: request metrics, then the body size limit. Errors: the
handlers of ``services.api.errors``. The OpenAPI schema is at ``/openapi.json`` (docs at ``/docs``); the web
console (``services.console``, HTML pages with its own sign-in) is mounted at ``/console``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from lorafleet import __version__
from lorafleet.config import Settings
from services.api.errors import ServerPaths, install_error_handlers
from services.api.metrics import ApiMetrics
from services.api.middleware import BodySizeLimitMiddleware, MetricsMiddleware
from services.api.routes import ROUTERS
from services.api.runtime import ApiOptions, ApiServices, BackgroundRuntime
from services.console import create_console

logger = logging.getLogger("lorafleet.api")

DESCRIPTION = """Per-user LoRA adapters on a shared frozen backbone: feedback in, continual-learning jobs,
versioned adapters with rollback, and generation through each user's experts (also OpenAI-compatible).

Authenticate with `Authorization: Bearer <key>`: a tenant's API key for everything under `/v1/users` and
`/v1/jobs` and the OpenAI-compatible routes; the admin key for `/v1/tenants` and `/v1/admin`. Errors are
`{"error": {"code", "message", "field"?}}`."""


def create_app(
    settings: Settings, *, services: ApiServices | None = None, options: ApiOptions | None = None
) -> FastAPI:
    """The API over ``settings`` (or over prebuilt ``services``, which the app then does not close)."""
    options = services.options if services is not None else (options or ApiOptions())
    metrics = services.metrics if services is not None else ApiMetrics()
    owned = services is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = (
            services if services is not None else await run_in_threadpool(_build, settings, options, metrics)
        )
        app.state.services = built
        runtime = BackgroundRuntime(built)
        app.state.runtime = runtime
        pruned = await run_in_threadpool(built.prune_idempotency_keys)
        logger.info("API starting (pruned %d old idempotency keys)", pruned)
        runtime.start()  # on the server's thread: a local Ray is initialised there
        if options.preload_engine:
            built.engine.preload_in_background()
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)
            built.engine.close()
            if owned:
                built.close()

    app = FastAPI(title="lorafleet", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.server_paths = ServerPaths.from_settings(settings)  # hidden from tenants in every message
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/console", create_console(lambda: app.state.services, server_paths=app.state.server_paths))
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=options.max_body_bytes,
        read_timeout=options.body_read_timeout_seconds,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _build(settings: Settings, options: ApiOptions, metrics: ApiMetrics) -> ApiServices:
    return ApiServices.build(settings, options, metrics=metrics)


__all__ = ["ApiOptions", "ApiServices", "create_app"]
