"""What the operator configures per tenant, beside the keys: quotas, webhook secrets, hand-off destinations; and
the worker queues (GPU classes) a job may name.

Entries follow the keys' form (``tenant:value``, comma-separated, or one per line in a file); a tenant ``*``
stands for every tenant without an entry of its own. A malformed entry stops the service at start.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

from app.config import QUEUE_NAME, Settings, parse_queues  # noqa: F401 (QUEUE_NAME re-exported)


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (None: no limit)."""

    max_queued: int | None = None  # jobs waiting (queued), over which a create is refused 429
    max_running: int | None = None  # jobs handed to workers at once; later ones wait, held back
    creates_per_minute: int | None = None  # jobs created in any 60 s


_QUOTA_NAMES = {f.name for f in fields(Quota)}


def _entries(text: str | None, path: Path | None, sep: str = ",") -> list[tuple[str, str]]:
    """``tenant:value`` entries of a setting and its file (one per line)."""
    lines = [e for e in (text or "").split(sep)]
    if path is not None:
        lines += Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, ok, value = line.partition(":")
        if not ok or not tenant.strip() or not value.strip():
            raise ValueError(f"entry {line!r} must look like 'tenant:value'")
        out.append((tenant.strip(), value.strip()))
    return out


def parse_quota(value: str) -> Quota:
    """``max_running=1;max_queued=10`` → Quota."""
    limits: dict[str, int] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        name, ok, number = item.partition("=")
        name = name.strip()
        if not ok or name not in _QUOTA_NAMES:
            raise ValueError(f"quota {item.strip()!r}: use {', '.join(sorted(_QUOTA_NAMES))} as name=N")
        if not number.strip().isdigit() or int(number) < 1:
            raise ValueError(f"quota {name}: {number.strip()!r} is not a whole number of at least 1")
        limits[name] = int(number)
    return Quota(**limits)


class TenantPolicy:
    """Quotas, webhook secrets and destinations per tenant. Each part is read from the settings when first used, so
    a worker never needs the API's webhook secrets; the API reads them all at start (:meth:`validate`)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def validate(self) -> TenantPolicy:
        """Read every part now: a malformed entry stops the service at start, not at its first request."""
        _ = self._quotas, self._secrets, self._destinations
        return self

    @cached_property
    def _quotas(self) -> dict[str, Quota]:
        return {t: parse_quota(v) for t, v in _entries(self.settings.quotas, self.settings.quotas_file)}

    @cached_property
    def _secrets(self) -> dict[str, str]:
        return dict(_entries(self.settings.webhook_secrets, self.settings.webhook_secrets_file))

    @cached_property
    def _destinations(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for tenant, prefix in _entries(self.settings.output_destinations, None):
            if not prefix.startswith("s3://"):
                raise ValueError(f"output destination {prefix!r} of {tenant} must be an s3:// prefix")
            out.setdefault(tenant, []).append(prefix)
        return out

    def quota(self, tenant: str) -> Quota:
        return self._quotas.get(tenant) or self._quotas.get("*") or Quota()

    @property
    def running_limited(self) -> bool:
        """Whether any tenant has a running limit (else no job is ever held back)."""
        return any(q.max_running is not None for q in self._quotas.values())

    def webhook_secret(self, tenant: str) -> str | None:
        return self._secrets.get(tenant) or self._secrets.get("*")

    def destinations(self, tenant: str) -> list[str]:
        return self._destinations.get(tenant) or self._destinations.get("*") or []

    def destination_allowed(self, tenant: str, uri: str) -> bool:
        """Whether ``uri`` lies under one of the tenant's prefixes (a prefix 's3://b/x' allows 's3://b/x/...' and
        's3://b/x', never 's3://b/xy')."""
        for prefix in self.destinations(tenant):
            base = prefix.rstrip("/")
            if uri.rstrip("/") == base or uri.startswith(base + "/"):
                return True
        return False


def worker_queues(settings: Settings) -> dict[str, int | None]:
    """Every queue a job may be sent to → the device memory of its workers in bytes (None: not stated). The
    default queue (``settings.queue``) is always among them."""
    queues = parse_queues(settings.queues)
    queues.setdefault(settings.queue, None)
    return queues


def choose_queue(queues: dict[str, int | None], device_bytes: int | None, default: str) -> str:
    """The queue for a job that names none: the one with the least device memory that still holds
    ``device_bytes`` (the memory plan's peak), else ``default``."""
    if device_bytes is None:
        return default
    fitting = [(memory, name) for name, memory in queues.items() if memory is not None and memory >= device_bytes]
    return min(fitting)[1] if fitting else default
