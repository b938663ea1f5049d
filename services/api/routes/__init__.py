"""The API's routers, one module per area; each route calls the library and converts its answer."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.routes import (
    adapters,
    admin,
    audit,
    deletions,
    enrolments,
    feedback,
    health,
    inference,
    jobs,
    tasks,
    tenants,
    training,
    users,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    tenants.router,
    admin.router,
    audit.router,
    users.router,
    feedback.router,
    deletions.router,
    adapters.router,
    jobs.router,
    enrolments.router,
    tasks.router,
    training.router,
    inference.router,
)

__all__ = ["ROUTERS"]
