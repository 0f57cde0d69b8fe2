"""Domain errors and the handlers that turn every failure into ``{"error": {"code", "message", "field"}}``."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.fields import FieldError
from app.schemas import ErrorBody

log = logging.getLogger("restorelcc.api")

STORE_RETRY_AFTER_S = 5  # a 503 for an unreachable job store: when to ask again


class ApiError(Exception):
    """An error with an HTTP status, a stable code, a message and (when it is about input) a field."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def not_found(what: str = "job") -> ApiError:
    return ApiError(404, f"{what}_not_found", f"{what} not found")


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


_WHY = {
    400: "Malformed request body (not JSON)",
    401: "Missing or invalid API key",
    404: "No such job or artifact (or not yours)",
    409: "Conflicts with the job's state or an earlier request",
    413: "Request body over the size limit",
    415: "Request body not sent as JSON (Content-Type: application/json)",
    416: "Range not satisfiable",
    422: "Invalid input; `field` names it",
    429: "Over a quota of the tenant; try again after Retry-After seconds",
    503: "A dependency is unavailable; try again later",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    416: {"Content-Range": {"description": "bytes */<size>", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, all with the service's error body."""
    return {s: {"model": ErrorBody, "description": _WHY[s], **({"headers": _HEADERS[s]} if s in _HEADERS else {})}
            for s in statuses}


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first route that matched)."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS
                     if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes))


_DOTTED = re.compile(r"\b(?:model|pruning|restoration|data|evaluation|output|notify|resources)\.[a-z_]+\b")


def _loc_to_field(loc: tuple | list, strip_body: bool = True) -> str | None:
    parts = [str(p) for p in loc]
    if strip_body and parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    if parts[-1:] == ["[key]"]:  # a bad key of a mapping: name the mapping, not the (maybe huge) key
        parts = parts[:-2]
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]], strip_body: bool = True) -> ApiError:
    """The first pydantic error as a 422 naming its field as a dotted path (``pruning.sparsity``)."""
    if not errors:
        return ApiError(422, "invalid_request", "invalid request")
    first = errors[0]
    etype = first.get("type", "")
    loc = list(first.get("loc", ()))
    if etype == "json_invalid":
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    field = _loc_to_field(loc, strip_body)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if isinstance(named := first.get("ctx", {}).get("error"), FieldError):
        field = named.field  # a rule that names its field itself (a path from the spec's top)
    elif etype == "value_error":
        # A rule over several fields ("data.train is required: ...", on the whole spec or one section):
        # name the field the message names, when it lies inside the validated part.
        m = _DOTTED.search(msg)
        if m and (field is None or m.group(0).startswith(field + ".")):
            field = m.group(0)
    if etype == "extra_forbidden":
        msg = "unknown field"
    if etype == "missing" and field is None:
        return ApiError(422, "invalid_request", "request body is required")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(422, "invalid_spec" if etype != "missing" or field else "invalid_request",
                    f"{field + ': ' if field and not msg.startswith(field) else ''}{msg}{more}", field)


def _body_not_json(request: Request, errors: list[dict[str, Any]]) -> bool:
    """Whether the body was refused as a whole because it was not sent as JSON (``curl --data`` sends a form): its
    pydantic message ("valid dictionary") would not say why."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    return not is_json and any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in errors)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if _body_not_json(request, errors):
            err = ApiError(415, "unsupported_media_type", "the request body must be a JSON object sent with "
                           "Content-Type: application/json")
        else:
            err = validation_error(errors)
        return JSONResponse(error_body(err.code, err.message, err.field), status_code=err.status)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()), strip_body=False)
        return JSONResponse(error_body(err.code, err.message, err.field), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_json", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers or None)

    async def _store_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable: %s", exc)
        return JSONResponse(error_body("store_unavailable", "the job store is unavailable; try again later"),
                            status_code=503, headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    app.add_exception_handler(psycopg.OperationalError, _store_unavailable)  # the poll pool's (and its timeouts)
    app.add_exception_handler(OperationalError, _store_unavailable)  # the main engine's

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
