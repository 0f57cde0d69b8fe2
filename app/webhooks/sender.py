"""One webhook delivery attempt over HTTP: check the URL, POST once, describe what happened.

The sender never follows redirects (a redirect could lead past the URL checks, e.g. to a metadata address)
and never raises: the dispatcher records every :class:`Attempt` and decides from ``ok``/``permanent`` whether
to try again later.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.webhooks.urls import DEFAULT_PORTS, UrlRefused, check_url

USER_AGENT = "restorelcc-webhooks/1"
_SNIPPET_CHARS = 200
_SNIPPET_BYTES = 4 * _SNIPPET_CHARS  # enough bytes for 200 characters of UTF-8; the rest of a body is not read


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST: ``ok`` on 2xx; ``permanent`` when retrying the same URL cannot help."""

    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    ok: bool
    permanent: bool

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "status_code": self.status_code, "error": self.error,
                "duration_ms": self.duration_ms, "ok": self.ok, "permanent": self.permanent}


def _clip(text: str, limit: int = _SNIPPET_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _same_target(url: str) -> None:
    """Refuse a URL that httpx would send somewhere other than where urllib (and so check_url) says."""
    try:
        target = httpx.URL(url)
        parts = urlsplit(url)
        checked_port = parts.port
    except (httpx.InvalidURL, ValueError) as e:
        raise UrlRefused(f"the URL cannot be read: {e}") from None
    default = DEFAULT_PORTS.get(parts.scheme.lower())
    hosts = {target.host.lower(), target.raw_host.decode("ascii", errors="replace").lower()}
    if (parts.hostname or "").lower() not in hosts or (target.port or default) != (checked_port or default):
        raise UrlRefused("the URL is ambiguous (its host reads differently to different parsers)")


def _read_snippet(response: httpx.Response) -> str:
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= _SNIPPET_BYTES:
            break
    return data[:_SNIPPET_BYTES].decode("utf-8", errors="replace")[:_SNIPPET_CHARS]


def _redirect(url: str, response: httpx.Response, allowed_hosts: list[str]) -> tuple[str, bool]:
    """The error for a 3xx answer and whether it is permanent (the redirect points somewhere refused)."""
    code = response.status_code
    location = response.headers.get("location")
    if not location:
        return f"HTTP {code} (a redirect without a Location; redirects are not followed)", False
    target = urljoin(url, location)
    try:
        check_url(target, allowed_hosts)
    except UrlRefused as e:
        return (f"HTTP {code} redirect to Location {_clip(location)!r}, which would be refused: {e}; "
                "redirects are not followed"), True
    return (f"HTTP {code} redirect to Location {_clip(location)!r}: redirects are not followed; "
            f"point notify.url at the final address ({_clip(target)})"), False


def pinned(url: str, addresses: list[Any]) -> tuple[str, dict[str, Any]]:
    """The URL to connect to: the host name replaced by the first address that was checked, so the name is not looked
    up a second time (a DNS answer that changed in between could point the request elsewhere). The original name
    stays in the Host header and, for https, in the TLS server name (certificates are checked against it)."""
    parsed = httpx.URL(url)
    if not addresses or _is_literal(parsed.host):
        return url, {}
    ip = addresses[0]
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    return str(parsed.copy_with(host=host.strip("[]"))), extensions


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def deliver(url: str, body: bytes, headers: dict[str, str], allowed_hosts: list[str], timeout_s: float) -> Attempt:
    """POST ``body`` to ``url`` once, after checking the URL (with DNS resolution) against ``allowed_hosts``.

    A refused URL sends nothing and is a permanent failure. Timeouts, connection errors, non-2xx answers and
    redirects to allowed places are temporary failures (the receiver may be fixed); nothing here raises.
    """
    at = datetime.now(UTC)
    start = time.monotonic()

    def attempt(status_code: int | None, error: str | None, ok: bool = False, permanent: bool = False) -> Attempt:
        duration_ms = int((time.monotonic() - start) * 1000)
        return Attempt(at=at, status_code=status_code, error=error, duration_ms=duration_ms, ok=ok,
                       permanent=permanent)

    try:
        addresses = check_url(url, allowed_hosts, resolve=True)
        _same_target(url)
    except UrlRefused as e:
        return attempt(None, f"refused: {e}", permanent=True)
    except Exception as e:  # a bug in the checks must not let a request out, nor crash the dispatcher
        return attempt(None, f"refused: the URL could not be checked ({type(e).__name__}: {e})", permanent=True)

    send_headers = httpx.Headers({"Content-Type": "application/json", "User-Agent": USER_AGENT})
    send_headers.update(headers)
    target, extensions = pinned(url, addresses)
    if target != url:
        send_headers["Host"] = httpx.URL(url).netloc.decode("ascii")
    try:
        with (httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout_s) as client,
              client.stream("POST", target, content=body, headers=send_headers, extensions=extensions) as response):
            code = response.status_code
            if 200 <= code < 300:
                return attempt(code, None, ok=True)
            if 300 <= code < 400:
                error, permanent = _redirect(url, response, allowed_hosts)
                return attempt(code, error, permanent=permanent)
            snippet = _read_snippet(response)
            return attempt(code, f"HTTP {code}: {snippet}" if snippet else f"HTTP {code}: (empty body)")
    except httpx.TimeoutException as e:
        return attempt(None, f"timeout after {timeout_s:g}s: {type(e).__name__}: {e}")
    except Exception as e:  # connection refused, reset, TLS failure, a body that breaks mid-read...
        message = str(e)
        return attempt(None, f"{type(e).__name__}: {message}" if message else type(e).__name__)
