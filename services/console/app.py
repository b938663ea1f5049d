"""``create_console``: the web console, a FastAPI sub-application the API mounts at ``/console``.

Server-rendered pages (Jinja2 templates and one stylesheet, one small script, packaged with ``services``; nothing
from a CDN). Sign-in takes a tenant's API key (or the admin key, which sees the tenants list) and gives a session
cookie (``services.console.sessions``); every POST needs the session's CSRF token (403 without it). Errors are
HTML pages with the API's statuses: another tenant's user, version or job is 404, as in the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.errors import LorafleetError
from services.api.errors import DEFAULT_SERVER_PATHS, ServerPaths, public_message, status_for
from services.api.runtime import ApiServices
from services.console import routes
from services.console.sessions import SessionStore

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
#: scripts and styles from the console itself only; inline style attributes colour the heatmap's cells
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_console(
    services: Callable[[], ApiServices],
    *,
    server_paths: ServerPaths = DEFAULT_SERVER_PATHS,
    sessions: SessionStore | None = None,
) -> FastAPI:
    """The console over ``services()`` (the API's services, built by its lifespan)."""
    console = FastAPI(title="lorafleet console", docs_url=None, redoc_url=None, openapi_url=None)
    console.state.services = services
    console.state.sessions = sessions or SessionStore()
    console.state.templates = TEMPLATES
    console.state.server_paths = server_paths  # hidden from tenants in error pages, as in the API
    console.include_router(routes.router)
    console.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    console.add_exception_handler(routes.SignInNeeded, routes.to_sign_in)
    console.add_exception_handler(LorafleetError, _library_error)
    console.add_exception_handler(RequestValidationError, _bad_request)
    console.add_exception_handler(StarletteHTTPException, _http_error)

    @console.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return console


def error_page(request: Request, status: int, message: str) -> Response:
    return TEMPLATES.TemplateResponse(
        request,
        "error.html",
        {"status": status, "message": message, "viewer": None},
        status_code=status,
    )


async def _library_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LorafleetError)
    status = status_for(exc)
    shown = public_message(request, exc) if status < 500 else "the server failed; the log has the details"
    return error_page(request, status, shown)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
    name = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
    return error_page(request, 422, f"{name}: {first['msg']}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_page(request, exc.status_code, str(exc.detail))


__all__ = ["create_console", "error_page"]
