"""API keys (stored and compared as sha256 hashes, in constant time) and the tenant they belong to."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings

DEV_TENANT = "dev"
TENANT_MAX_CHARS = 128  # the jobs.tenant column (and the other tenant columns): VARCHAR(128)


@dataclass(frozen=True)
class Principal:
    tenant: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """``tenant`` if jobs can be stored and configured under it, else ValueError. Checked when the key ring is
    built, so that a bad name stops the service at start instead of failing every job create (PostgreSQL refuses
    a value longer than the column, or one holding a NUL)."""
    shown = tenant if len(tenant) <= 40 else tenant[:40] + "…"
    if len(tenant) > TENANT_MAX_CHARS:
        raise ValueError(f"tenant name {shown!r} is {len(tenant)} characters long; at most {TENANT_MAX_CHARS} "
                         "fit the job store")
    if any(unicodedata.category(c) == "Cc" for c in tenant):
        raise ValueError(f"tenant name {shown!r} holds a control character")
    if tenant == "*":
        raise ValueError("tenant name '*' is reserved: in quotas, webhook secrets and output destinations it stands "
                         "for every tenant without an entry of its own")
    return tenant


def _parse_entry(entry: str) -> tuple[str, str] | None:
    """``tenant:key`` or ``tenant:sha256:<hex>`` → (tenant, key hash)."""
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    tenant, sep, key = entry.partition(":")
    tenant, key = tenant.strip(), key.strip()
    if not sep or not tenant or not key:
        raise ValueError("API key entries must look like 'tenant:key'")
    check_tenant(tenant)
    if key.startswith("sha256:") and len(key) == 71:
        digest = key[7:].lower()
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise ValueError(f"the key hash of tenant {tenant!r} is not 64 hex digits") from None
        return tenant, digest
    return tenant, hash_key(key)


class KeyRing:
    """Known key hashes → tenant. Lookup compares every hash with :func:`hmac.compare_digest`. One key given to
    two tenants is refused (it would silently act as the last one's)."""

    def __init__(self, entries: list[tuple[str, str]]):
        owner: dict[bytes, str] = {}
        for tenant, h in entries:
            digest = bytes.fromhex(h)
            other = owner.setdefault(digest, tenant)
            if other != tenant:
                raise ValueError(f"one API key is configured for two tenants, {other!r} and {tenant!r}: give each "
                                 "tenant keys of its own")
        self._entries = [(h, t) for h, t in owner.items()]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries: list[tuple[str, str]] = []
        if settings.api_keys:
            entries += [e for e in (_parse_entry(x) for x in settings.api_keys.split(",")) if e]
        if settings.api_keys_file:
            text = Path(settings.api_keys_file).expanduser().read_text(encoding="utf-8")
            entries += [e for e in (_parse_entry(x) for x in text.splitlines()) if e]
        return cls(entries)

    def tenant_for(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).digest()
        found: str | None = None
        for h, tenant in self._entries:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(h, digest):
                found = tenant
        return found


def ensure_local_key(settings: Settings) -> tuple[str, bool]:
    """The embedded setup's key (tenant ``local``), created on first start under the data directory.
    Returns (key, created)."""
    path = settings.local_key_file
    if path.is_file():
        return path.read_text(encoding="utf-8").strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "rlcc_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key, True


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
