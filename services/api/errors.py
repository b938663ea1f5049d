"""The one place where errors become HTTP responses.

Library errors (``lorafleet.errors``) map to statuses by class, most specific first; FastAPI's request
validation errors become 422s naming the field path (``records[2].prompt``, ``limit``); Starlette's own HTTP
errors (unknown route, wrong method, body too large) keep their status. Every error body is
``{"error": {"code", "message", "field"?}}`` (``lorafleet.sdk.schemas.ErrorBody``).

Tenants see ids and reasons, never the server's paths: ``ServerPaths`` replaces the data dir, the blob
directory, the temp dir (and any other absolute path under a system root) in every message a tenant gets with a
placeholder (``<data dir>``, ``<temp dir>``, ...); the full message goes to the log.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet import errors as lib
from lorafleet.config import Settings
from lorafleet.feedback import FeedbackRecordError

logger = logging.getLogger("lorafleet.api")


class ServiceUnavailableError(lib.LorafleetError):
    """The service cannot answer now (the serving engine failed to load, a generation timed out)."""

    code = "service_unavailable"


#: library error class -> HTTP status; the first match in this order wins (subclasses before bases)
STATUS_BY_ERROR: tuple[tuple[type[lib.LorafleetError], int], ...] = (
    (lib.PermissionDeniedError, 403),
    (lib.AuthError, 401),
    (lib.NotFoundError, 404),
    (lib.PayloadTooLargeError, 413),
    (lib.ValidationError, 422),
    (lib.AlreadyExistsError, 409),
    (lib.ConflictError, 409),
    (lib.CapacityError, 503),
    (ServiceUnavailableError, 503),
    (lib.BlobStoreError, 502),
    (lib.LorafleetError, 500),
)
#: Starlette's status -> the code in the error body
CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


#: an absolute path under a usual top-level folder that no known root covered (a library's own file, a home)
_OTHER_PATH = re.compile(
    r"(?<![\w:/.~-])/(?:tmp|var|home|root|usr|opt|srv|mnt|data|work|etc|private|Users|run|nix|lib|scratch)"
    r"(?![\w.-])(?:/[^\s'\"(),;:]*)?"
)


@dataclass(frozen=True)
class ServerPaths:
    """The server's own folders, each with the placeholder tenants see instead of it (longest first)."""

    roots: tuple[tuple[str, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerPaths:
        found: list[tuple[Path, str]] = [(settings.data_dir, "<data dir>")]
        store = urlparse(settings.resolved_object_store_url)
        if store.scheme == "file":
            found.append((Path(unquote(store.path)), "<blob store>"))
        found.append((Path(tempfile.gettempdir()), "<temp dir>"))
        roots: dict[str, str] = {}
        for path, placeholder in found:
            for form in {str(path.absolute()), str(path.resolve())}:
                if form != "/":
                    roots.setdefault(form.rstrip("/"), placeholder)
        ordered = sorted(roots.items(), key=lambda item: len(item[0]), reverse=True)
        return cls(tuple(ordered))

    def hide(self, text: str) -> str:
        """``text`` with every server path replaced by its placeholder (what follows a root is kept: a file
        name inside the data dir, ``<data dir>/blobs/...``, names no folder of the server)."""
        for root, placeholder in self.roots:
            # the placeholder as a function: it is never read as a replacement template
            text = re.sub(re.escape(root) + r"(?![\w.-])", _constant(placeholder), text)
        return _OTHER_PATH.sub("<path>", text)


def _constant(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: text


#: used where an app has not set its own (``create_app`` does): the temp dir and other absolute paths
DEFAULT_SERVER_PATHS = ServerPaths(((tempfile.gettempdir().rstrip("/"), "<temp dir>"),))


def server_paths(request: Request) -> ServerPaths:
    found = getattr(request.app.state, "server_paths", None)
    return found if isinstance(found, ServerPaths) else DEFAULT_SERVER_PATHS


def public_message(request: Request, exc: BaseException) -> str:
    """``str(exc)`` as a tenant may see it; when paths had to be hidden, the full message is logged."""
    text = str(exc)
    shown = server_paths(request).hide(text)
    if shown != text:
        logger.warning("%s (answered with server paths hidden): %s", type(exc).__name__, text)
    return shown


def status_for(exc: lib.LorafleetError) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(exc, cls))


def error_response(
    status: int,
    *,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    state: str | None = None,
) -> JSONResponse:
    detail: dict[str, Any] = {"code": code, "message": message}
    if field:
        detail["field"] = field
    if state:
        detail["state"] = state
    return JSONResponse({"error": detail}, status_code=status, headers=dict(headers or {}))


def field_of(exc: lib.LorafleetError) -> str | None:
    """Where the input was wrong: a feedback record's index and field, or the ``name: `` prefix of the
    message (the library's convention, e.g. ``"records: the batch is empty"``)."""
    if isinstance(exc, FeedbackRecordError):
        return f"records[{exc.index}]" + (f".{exc.field}" if exc.field else "")
    if isinstance(exc, lib.ValidationError | lib.PayloadTooLargeError):
        match = _FIELD_PREFIX.match(str(exc))
        return match.group(1) if match else None
    return None


def _headers_for(status: int) -> dict[str, str]:
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": "1"}
    return {}


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, lib.LorafleetError)
    status = status_for(exc)
    if status >= 500:
        # a failed generation is already logged by the engine, with its versions; no traceback to add
        traceback = status == 500 and not isinstance(exc, lib.GenerationError)
        logger.error("%s: %s", type(exc).__name__, exc, exc_info=traceback)
    # a failed generation's message names the adapter versions and what QA will do: safe and useful to show
    shown = status < 500 or status in (502, 503) or isinstance(exc, lib.GenerationError)
    message = public_message(request, exc) if shown else f"internal error ({exc.code})"
    state = exc.state if isinstance(exc, lib.JobFinishedError) else None
    return error_response(
        status, code=exc.code, message=message, field=field_of(exc), headers=_headers_for(status), state=state
    )


def _walk(body: Any, loc: Sequence[Any]) -> list[str | int]:
    """The location without union labels: pydantic puts a discriminated union member's tag (``"sft"``) into the
    path, where the body has no such key, only a field holding that value, and a plain union member's label
    (``function-after[printable_name(), str]``, ``list[str]``) after a value that has no keys at all."""
    path: list[str | int] = []
    here = body
    for part in loc:
        if isinstance(here, Mapping) and isinstance(part, str) and part not in here and part in here.values():
            continue  # the tag of a discriminated union
        if isinstance(part, str) and isinstance(here, str | int | float | bool | list):
            continue  # the label of a union's member: a scalar or a list has no named fields
        path.append(part)
        if isinstance(here, Mapping):
            here = here.get(part)
        elif isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
            here = here[part]
        else:
            here = None
    return path


def field_path(error: Mapping[str, Any], body: Any) -> str:
    """``("body", "records", 0, "sft", "prompt")`` -> ``records[0].prompt``; query, path and header
    parameters by their name."""
    loc = list(error.get("loc", ()))
    source = loc.pop(0) if loc and loc[0] in ("body", "query", "path", "header", "cookie") else "body"
    parts = _walk(body, loc) if source == "body" else loc
    if str(error.get("type", "")).startswith("union_tag"):
        parts.append(str(error.get("ctx", {}).get("discriminator", "kind")).strip("'"))
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    if source == "header":
        return text.title()
    return text or source


async def _request_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    body = getattr(exc, "body", None)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = field_path(first, body)
    message = f"{field}: {str(first.get('msg', 'invalid')).removeprefix('Value error, ')}"
    response = error_response(422, code="validation_error", message=message, field=field)
    return response


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = CODE_BY_STATUS.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    return error_response(exc.status_code, code=code, message=str(exc.detail), headers=headers)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback by the server; the client gets the usual body, not a text page."""
    return error_response(500, code="internal_error", message=f"internal error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers: library errors, request validation, Starlette's HTTP errors, bugs."""
    app.add_exception_handler(lib.LorafleetError, _library_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
