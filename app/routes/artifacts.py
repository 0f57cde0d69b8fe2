"""/v1/jobs/{id}/artifacts: list the result files; download one (streamed, Range, ETag)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from app.deps import JobServiceDep, PrincipalDep, Services, ServicesDep
from app.errors import ApiError, error_responses, not_found
from app.schemas import ArtifactPublic
from app.service import artifact_store_errors

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"])

_FILE = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_FILE_HEADERS = {
    "ETag": {"description": "The quoted sha256 of the whole file", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "bytes", "schema": {"type": "string"}},
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}
_UNAVAILABLE = {**error_responses(503)[503], "description": "The artifact store is unavailable; try again after "
                                                            "Retry-After seconds", "headers": _RETRY_AFTER}
# What an ASCII quoted-string filename must not carry: anything but printable ASCII, the quoted-string's own
# specials, and '%' (some clients percent-decode the fallback; RFC 6266 appendix D).
_NOT_FALLBACK_SAFE = re.compile(r'[^\x20-\x7e]|["\\%]')


def content_disposition(name: str) -> str:
    """``attachment`` with the file's base name as RFC 6266 writes any name: an ASCII ``filename`` (each character
    that could not stand there replaced by ``_``) for old clients, and the exact name in ``filename*`` (RFC 8187:
    UTF-8, percent-encoded), which clients prefer. Never fails, so the download never 500s on a name."""
    base = PurePosixPath(name).name
    fallback = _NOT_FALLBACK_SAFE.sub("_", base)
    exact = quote(base.encode("utf-8", "replace"), safe="")  # 'replace': a lone surrogate cannot fail the answer
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


class FileDownload(StreamingResponse):
    """A file, whatever its name says: documented (and served) as ``application/octet-stream``."""

    media_type = "application/octet-stream"


_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
_POS_DIGITS = 18  # positions with more significant digits lie past the end of any file (sizes are below 2**63)
_BEYOND = 10**_POS_DIGITS


def _position(digits: str) -> int:
    """A byte position as given (leading zeros allowed); one too long for any file is :data:`_BEYOND`, so that no
    header makes the server convert thousands of digits (which Python refuses past 4300)."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _POS_DIGITS else _BEYOND


def _before(b: str, a: str) -> bool:
    """Whether the position written ``b`` is below the one written ``a``, compared exactly at any length."""
    b, a = b.lstrip("0"), a.lstrip("0")
    return (len(b), b) < (len(a), a)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range → inclusive (start, end); None = serve the whole file
    (no header, several ranges, or a malformed one, as RFC 9110 allows). Unsatisfiable → 416. Positions may
    have any number of digits (RFC 9110 sets no limit): a first position past the end is unsatisfiable, a last
    position or suffix length past it stops at the end."""
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        return None
    a, b = m.group(1), m.group(2)
    if not a:  # suffix: the last n bytes
        n = _position(b)
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    if b and _before(b, a):
        return None
    start = _position(a)
    if start >= size:
        raise _unsatisfiable(size)
    end = _position(b) if b else size - 1
    return start, min(end, size - 1)


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(416, "range_not_satisfiable", "requested range not satisfiable", "Range",
                    headers={"Content-Range": f"bytes */{size}"})


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@router.get("", response_model=list[ArtifactPublic], responses=error_responses(401, 404, 503))
def list_artifacts(job_id: str, principal: PrincipalDep, service: JobServiceDep,
                   services: ServicesDep) -> list[ArtifactPublic]:
    service.get(principal.tenant, job_id)
    return [ArtifactPublic(name=a.name, size=a.size, sha256=a.sha256) for a in services.jobs.artifacts(job_id)]


@router.get(
    "/{name:path}",
    response_class=FileDownload,
    responses={
        200: {"content": _FILE, "description": "The whole file", "headers": _FILE_HEADERS},
        206: {"content": _FILE, "description": "Partial content (Range)", "headers": {
            **_FILE_HEADERS, "Content-Range": {"description": "bytes a-b/size", "schema": {"type": "string"}}}},
        304: {"description": "Not modified (If-None-Match)", "headers": _FILE_HEADERS},
        **error_responses(401, 404, 416),
        503: _UNAVAILABLE,
    },
)
def download_artifact(
    job_id: str,
    name: str,
    principal: PrincipalDep,
    service: JobServiceDep,
    services: ServicesDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """Stream one artifact. `ETag` is its quoted sha256; `Range` gives 206; `If-None-Match` gives 304. A file
    missing from the artifact store is 404 `artifact_not_found`; a failing store is 503 with `Retry-After`."""
    service.get(principal.tenant, job_id)
    art = services.jobs.artifact(job_id, name) if "\x00" not in name else None
    if art is None:
        raise not_found("artifact")
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    rng = parse_range(range_, art.size)
    if rng is not None and if_range is not None and if_range.strip() != etag:
        rng = None
    headers["Content-Disposition"] = content_disposition(name)
    if rng is None:
        body = _open(services, art.key)
        headers["Content-Length"] = str(art.size)
        return FileDownload(body, status_code=200, headers=headers)
    start, end = rng
    body = _open(services, art.key, start, end)
    headers["Content-Range"] = f"bytes {start}-{end}/{art.size}"
    headers["Content-Length"] = str(end - start + 1)
    return FileDownload(body, status_code=206, headers=headers)


def _open(services: Services, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The object's bytes; its absence or a failing store answered before any of the response is sent (a failure
    while streaming can only cut the body short, which the client's sha256 check catches)."""
    with artifact_store_errors():
        return services.artifacts.open_range(key, start, end)
