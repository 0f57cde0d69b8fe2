"""Service settings, read from the environment (prefix ``RESTORELCC_``; plus plain ``DATABASE_URL``/``REDIS_URL``).

With none of ``REDIS_URL``, ``DATABASE_URL`` or S3 settings the service is *embedded*: SQLite under the data
directory, artifacts in a local directory, jobs run by a local worker. Setting them switches to the
distributed setup with no code change. Unsafe combinations (open auth outside dev, open auth on a public
interface) are refused by :meth:`Settings.check_safe`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class UnsafeSettingsError(ValueError):
    """The configuration would run the service in an unsafe way."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(v: object) -> object:
    """'40GiB', '512 MiB', '2e9' or a number → bytes (int); anything else is left for validation to refuse."""
    if not isinstance(v, str):
        return v
    text = v.strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {v!r} (use bytes or a unit such as '40GiB')") from None


QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as resources.queue accepts


def parse_queues(text: str | None) -> dict[str, int | None]:
    """``a100=80GiB,cpu`` → {name: device memory in bytes or None}; a bad name or size raises ValueError."""
    queues: dict[str, int | None] = {}
    for item in (text or "").split(","):
        name, _, memory = (x.strip() for x in item.partition("="))
        if not name and not memory:
            continue
        if not QUEUE_NAME.match(name):
            raise ValueError(f"queue name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        size = parse_size(memory) if memory else None
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"queue {name}: {memory!r} is not a memory size")
        queues[name] = size
    return queues


def _split_paths(v: object) -> object:
    if isinstance(v, str):
        return [Path(p.strip()).expanduser() for p in v.replace(";", ",").split(",") if p.strip()]
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESTORELCC_", extra="ignore", populate_by_name=True)

    # Where the embedded setup keeps its database, artifacts, work directories and local key.
    data_dir: Path = Field(Path(".restorelcc"), description="Data directory of the embedded setup.")
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "RESTORELCC_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL of the job store; default: SQLite file under data_dir.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "RESTORELCC_REDIS_URL", "redis_url"),
        description="Celery broker; unset = embedded local worker.",
    )
    queue: str = Field("restorelcc", description="The default worker queue: jobs that name none (and that no "
                                                 "queue's memory decides) are sent to it.")
    queues: str | None = Field(
        None, description="The worker queues (GPU classes) a spec may name in resources.queue: 'name[=memory]', "
                          "comma-separated ('a100=80GiB,h100=80GiB,cpu'). A queue with a memory lets the memory plan "
                          "choose it. The default queue is always one of them.")

    # Authentication.
    api_keys: str | None = Field(None, description="'tenant:key,...' (a key may be given as 'sha256:<hex>').")
    api_keys_file: Path | None = Field(None, description="File with one 'tenant:key' per line.")
    metrics_token: str | None = Field(
        None, description="When set, GET /metrics needs 'Authorization: Bearer <token>' (its counters carry "
                          "tenant names).")
    quotas: str | None = Field(
        None, description="Per-tenant limits, 'tenant:limit=N;limit=N' comma-separated, tenant '*' for everyone "
                          "else; limits: max_queued, max_running, creates_per_minute. Over a limit: 429.")
    quotas_file: Path | None = Field(None, description="File with one quota entry per line.")
    quota_retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429 for a full queue (max_queued).")

    # Webhooks (spec notify.url) and hand-off (spec output.destination).
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts (or host:port) a notify.url may name, comma-separated; empty: "
                                          "webhooks are refused.")
    webhook_secrets: str | None = Field(None, description="'tenant:secret,...': the key each tenant's deliveries "
                                                          "are signed with (HMAC-SHA256).")
    webhook_secrets_file: Path | None = Field(None, description="File with one 'tenant:secret' per line.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Time a receiver has to answer one delivery.")
    webhook_retry_base_s: float = Field(5.0, gt=0, description="First wait before a failed delivery is tried again; "
                                                               "doubled after each failure.")
    webhook_retry_max_interval_s: float = Field(3600.0, gt=0, description="Longest wait between two attempts.")
    webhook_retry_for_s: float = Field(86400.0, gt=0, description="A delivery still failing this long after its "
                                                                  "event is given up.")
    webhook_poll_s: float = Field(1.0, gt=0, description="How often the API process looks for due deliveries.")
    output_destinations: str | None = Field(
        None, description="'tenant:s3://bucket/prefix/,...': where each tenant may hand finished models off to "
                          "(output.destination must lie under one of its prefixes).")
    dev_open: bool = Field(False, description="No authentication (tenant 'dev'); only on 127.0.0.1.")
    host: str = Field("127.0.0.1", description="Interface `restorelcc serve` binds.")
    port: int = Field(8000, ge=1, le=65535)
    db_read_pool_size: int = Field(
        16, ge=1, le=200, description="PostgreSQL connections the API keeps for status polls (a job, its events; "
                                      "twice that at most), besides the 10 (at most 50) of its main pool.")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body accepted (a job spec is a few KiB); larger is 413."
    )

    # What a spec may point at.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    allow_hub_models: bool = Field(False, description="Accept Hugging Face hub ids as model.id.")

    # Artifact store.
    artifacts_dir: Path | None = Field(None, description="LocalStore directory; default data_dir/artifacts.")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_prefix: str = ""

    # Worker.
    work_dir: Path | None = Field(None, description="Scratch space for running jobs; default data_dir/work.")
    soft_time_limit_s: float = Field(6 * 3600, gt=0)
    hard_time_limit_s: float = Field(6 * 3600 + 600, gt=0)
    visibility_timeout_s: int | None = Field(None, ge=1, description="Default: hard limit + 1 h.")
    heartbeat_s: float = Field(10.0, gt=0)
    stale_after_s: float = Field(120.0, gt=0, description="A running job silent this long has lost its worker.")
    sweep_interval_s: float = Field(60.0, gt=0)
    worker_max_tasks_per_child: int | None = Field(
        1, ge=1, description="Celery: replace a pool process after this many jobs (memory held by a finished "
                             "job — allocator caches, CUDA context — goes with it); empty for never.")
    requeue_after_s: float = Field(
        300.0, gt=0, description="A job queued this long whose broker message is gone (e.g. Redis restarted) "
                                 "is sent again by the worker's sweep.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job (redeliveries after a worker crash); a job lost "
                                                   "this many times fails with worker_lost.")
    checkpoint_every_steps: int = Field(50, ge=1, description="Training steps between two checkpoints.")
    checkpoint_every_s: float = Field(600.0, gt=0, description="Longest time between two checkpoints in training "
                                                               "and in a pruning that calibrates layer by layer.")
    checkpoint_every_layers: int = Field(0, ge=0, description="Pruning: layers between two checkpoints besides the "
                                                              "time limit (0: by time only).")
    checkpoint_keep_s: float = Field(7 * 86400, ge=0, description="How long a failed job keeps its checkpoints for "
                                                                  "a retry to resume from.")
    preempt_grace_s: float = Field(30.0, gt=0, description="On SIGTERM: time a worker gives its job to reach a "
                                                           "checkpoint before it hands the job back anyway and exits.")
    device: str | None = Field(None, pattern=r"^(cpu|cuda|cuda:\d+(,cuda:\d+)*)$",
                               description="Where a worker computes: 'cpu', 'cuda' (every GPU it sees), 'cuda:N' or "
                                           "a list 'cuda:0,cuda:1'; default: every GPU when there is one. A job runs "
                                           "on the first; a model split over GPUs (model.split) uses them all.")
    max_device_memory: Annotated[int | None, BeforeValidator(parse_size)] = Field(
        None, gt=0, description="Most device memory a job may plan to use (bytes, or '40GiB'); default: the device's "
                                "(on the CPU: the host's available memory).")
    transient_retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(30.0, ge=0)
    progress_interval_s: float = Field(0.5, ge=0, description="Least time between two progress writes.")
    cancel_poll_s: float = Field(1.0, ge=0, description="Least time between two cancellation checks.")
    poll_interval_s: float = Field(1.0, gt=0, description="Embedded worker: queue polling interval.")
    keep_work_dirs: bool = False

    @field_validator("model_roots", "data_roots", mode="before")
    @classmethod
    def _paths(cls, v: object) -> object:
        return _split_paths(v)

    @field_validator("queues")
    @classmethod
    def _queues(cls, v: str | None) -> str | None:
        parse_queues(v)  # a bad name or size stops the service at start
        return v

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not QUEUE_NAME.match(v):
            raise ValueError(f"queue name {v!r}: use 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: object) -> object:
        return [h.strip().lower() for h in v.split(",") if h.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must exceed soft_time_limit_s")
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= self.hard_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed hard_time_limit_s")
        if self.heartbeat_s >= self.stale_after_s:
            raise ValueError("heartbeat_s must be less than stale_after_s, or a running job looks lost between beats")
        if self.hard_limit_run_s <= self.soft_time_limit_s:
            # The worker takes a lost run that lasted hard_limit_run_s for one the hard limit killed (and fails its
            # job time_limit instead of running it again); a run that the soft limit lets live must stay below it.
            margin = self.stale_after_s + 4 * self.heartbeat_s
            raise ValueError(
                f"hard_time_limit_s ({self.hard_time_limit_s:g}) must exceed soft_time_limit_s "
                f"({self.soft_time_limit_s:g}) by more than stale_after_s + 4 × heartbeat_s "
                f"({self.stale_after_s:g} + 4 × {self.heartbeat_s:g} = {margin:g} s), or a run that loses its worker "
                "shortly before the soft limit looks killed by the hard limit and its job is failed time_limit "
                "instead of run again")
        return self

    # Derived values -------------------------------------------------------------------------------------
    @property
    def hard_limit_run_s(self) -> float:
        """How long a run lasts at least, from its start to its last heartbeat, when the hard time limit kills it.
        Celery's clock starts with the task; a run that took a job over started up to a stale wait (stale_after_s
        and a few beats) later."""
        return self.hard_time_limit_s - self.stale_after_s - 4 * self.heartbeat_s

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: jobs run on this machine."""
        return not self.redis_url

    @property
    def s3_enabled(self) -> bool:
        return bool(self.s3_bucket)

    @property
    def db_url(self) -> str:
        if self.database_url:
            url = self.database_url
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://"):]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            return url
        return f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def artifacts_path(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    @property
    def work_path(self) -> Path:
        return (self.work_dir or self.data_dir / "work").resolve()

    @property
    def local_key_file(self) -> Path:
        return self.data_dir / "local.key"

    @property
    def visibility_timeout(self) -> int:
        return self.visibility_timeout_s or int(self.hard_time_limit_s) + 3600

    def check_safe(self) -> None:
        """Refuse configurations that would expose the service unsafely."""
        if self.dev_open:
            if self.host not in ("127.0.0.1", "localhost", "::1"):
                raise UnsafeSettingsError("dev_open (no authentication) is only allowed bound to 127.0.0.1")
            if not self.embedded or self.database_url or self.s3_enabled:
                raise UnsafeSettingsError("dev_open is only allowed in the embedded setup")
            return
        if not (self.api_keys or self.api_keys_file):
            raise UnsafeSettingsError(
                "no API keys configured: set RESTORELCC_API_KEYS or RESTORELCC_API_KEYS_FILE "
                "(or run `restorelcc serve --dev-open` on 127.0.0.1 for development)"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
