"""Service commands of the ``restorelcc`` CLI: serve, worker, submit, status, download.

``add_commands(subparsers)`` adds them to the CLI's parser. Nothing here imports torch: the worker
imports it when it runs its first job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


# Shared client options -----------------------------------------------------------------------------------
def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("RESTORELCC_URL", DEFAULT_URL),
                   help=f"API base URL (env RESTORELCC_URL; default {DEFAULT_URL})")
    p.add_argument("--api-key", default=None,
                   help="API key (env RESTORELCC_API_KEY; default: the embedded setup's local key)")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key:
        return args.api_key
    if os.environ.get("RESTORELCC_API_KEY"):
        return os.environ["RESTORELCC_API_KEY"]
    from app.config import Settings

    path = Settings().local_key_file
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _client(args: argparse.Namespace):
    from app.client import Client

    return Client(args.url, api_key=_api_key(args))


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# submit / status / download ---------------------------------------------------------------------------
def absolutize_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths that exist here become absolute (the service accepts absolute paths only)."""
    from app.schemas import map_local_paths

    def fix(v: str) -> str:
        return str(Path(v).resolve()) if not os.path.isabs(v) and os.path.exists(v) else v

    return map_local_paths(spec, fix)


def progress_line(job: Any) -> str:
    stage = job.stage.value if job.stage else "-"
    pct = 100 * job.progress.fraction
    return f"\r[{job.status.value:<10}] {stage:<10} {pct:5.1f}%  {job.progress.message[:60]:<60}"


def cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.client import ApiClientError
    from app.schemas import JobSpec

    try:
        raw = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        JobSpec.model_validate(raw)
    except (OSError, json.JSONDecodeError) as e:
        return _fail(f"cannot read spec {args.spec}: {e}")
    except ValidationError as e:
        return _fail(f"invalid spec: {e}")
    spec = absolutize_paths(raw)
    interactive = sys.stderr.isatty() or args.progress

    def show(j: Any) -> None:
        if interactive:
            sys.stderr.write(progress_line(j))
            sys.stderr.flush()

    with _client(args) as c:
        try:
            job, files = c.submit(spec, wait=args.wait, download=args.download, poll_s=args.poll,
                                  idempotency_key=args.idempotency_key, on_created=lambda j: print(j.id, flush=True),
                                  on_update=show)
        except ApiClientError as e:
            return _fail(f"{e.message}" + (f" (field {e.field})" if e.field else ""))
    if not (args.wait or args.download):
        return 0
    if interactive:
        sys.stderr.write("\n")
    print(json.dumps(job.model_dump(mode="json", exclude={"spec"}), indent=2))
    if job.status.value != "succeeded":
        return 1
    if args.download:
        print(f"downloaded {len(files)} files to {args.download}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.client import ApiClientError

    with _client(args) as c:
        try:
            job = c.get(args.id)
        except ApiClientError as e:
            return _fail(e.message)
        print(json.dumps(job.model_dump(mode="json"), indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from app.client import ApiClientError

    with _client(args) as c:
        try:
            files = c.download_all(args.id, args.dir)
        except ApiClientError as e:
            return _fail(e.message)
    for f in files:
        print(f)
    return 0


# serve / worker -----------------------------------------------------------------------------------------
def _settings_from_args(args: argparse.Namespace):
    from app.config import Settings

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if getattr(args, "dev_open", False):
        overrides["dev_open"] = True
    if getattr(args, "embedded", False):
        overrides["redis_url"] = None  # run jobs here even if a broker is configured
    return Settings(**overrides)


def prepare_embedded(settings: Any, out=sys.stderr) -> Any:
    """Embedded defaults: a local API key (created and printed on first start) unless keys are configured,
    and the current directory as model/data root unless roots are configured."""
    from app.auth import ensure_local_key

    updates: dict[str, Any] = {}
    if not settings.dev_open and not (settings.api_keys or settings.api_keys_file):
        key, created = ensure_local_key(settings)
        updates["api_keys"] = f"local:{key}"
        if created:
            print(f"Created a local API key (stored in {settings.local_key_file}):\n  {key}", file=out)
        else:
            print(f"Using the local API key in {settings.local_key_file}", file=out)
    cwd = Path.cwd()
    if not settings.model_roots:
        updates["model_roots"] = [cwd]
    if not settings.data_roots:
        updates["data_roots"] = [cwd]
    settings = settings.model_copy(update=updates)
    print(f"Model roots: {', '.join(map(str, settings.model_roots))}; "
          f"data roots: {', '.join(map(str, settings.data_roots))}", file=out)
    return settings


def _worker_env(settings: Any) -> dict[str, str]:
    env = dict(os.environ)
    env["RESTORELCC_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    env["RESTORELCC_MODEL_ROOTS"] = ",".join(str(p) for p in settings.model_roots)
    env["RESTORELCC_DATA_ROOTS"] = ",".join(str(p) for p in settings.data_roots)
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    import gc
    import logging

    import uvicorn

    from app.config import UnsafeSettingsError
    from app.main import create_app
    from app.store.db import upgrade_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin and migration lines say nothing useful
    settings = _settings_from_args(args)
    if settings.embedded:
        settings = prepare_embedded(settings)
    try:
        settings.check_safe()
    except UnsafeSettingsError as e:
        return _fail(str(e))
    upgrade_url(settings.db_url)
    supervisor = None
    if settings.embedded and not args.no_worker:
        supervisor = _WorkerSupervisor(
            [sys.executable, "-m", "worker.service.embedded", "--no-migrate", "--parent", str(os.getpid())],
            _worker_env(settings), stop_timeout_s=settings.preempt_grace_s + STOP_MARGIN_S,
        )
        supervisor.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so `finally` stops the worker.
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app(settings, migrate=False)
    # What start-up built lives as long as the process. Frozen, the collector's full passes skip it: a pass over
    # it paused every request for ~90 ms about once a second under polling.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


STOP_MARGIN_S = 15.0  # on top of preempt_grace_s: time for the worker to hand its job back and exit


class _WorkerSupervisor:
    """Keeps the embedded worker subprocess alive (restarts it if it dies) and stops it on shutdown.
    Stopping it is a preemption: SIGTERM, then the worker's job stops at its next checkpoint, or is handed back
    once ``preempt_grace_s`` has passed, and goes back to the queue without using up one of its runs. The worker
    is killed only ``stop_timeout_s`` (``preempt_grace_s`` plus a margin) after SIGTERM; a job it was running
    when it died (crashed, or killed then) is queued again by the next sweep, as one of its ``max_attempts``."""

    def __init__(self, argv: list[str], env: dict[str, str], stop_timeout_s: float = 30.0 + STOP_MARGIN_S):
        import threading

        self.argv, self.env = argv, env
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="embedded-worker-supervisor")

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        print(f"Embedded worker started (pid {self.proc.pid})", file=sys.stderr)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            if self.proc is not None and self.proc.poll() is not None and not self._stop.is_set():
                print(f"Embedded worker exited ({self.proc.returncode}); restarting", file=sys.stderr)
                self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from app.config import Settings
    from app.store.db import upgrade_url
    from app.tenancy import worker_queues

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin and migration lines say nothing useful
    if args.queue:
        os.environ["RESTORELCC_QUEUE"] = args.queue
    settings = Settings()
    upgrade_url(settings.db_url)
    if args.embedded or settings.embedded:
        from worker.service.embedded import main as embedded_main

        # Same default as `serve`: the current directory is the root when none is configured.
        os.environ.setdefault("RESTORELCC_MODEL_ROOTS", str(Path.cwd()))
        os.environ.setdefault("RESTORELCC_DATA_ROOTS", str(Path.cwd()))

        return embedded_main(["--no-migrate"])
    # The module's app reads its settings (queue, limits) from the environment set above.
    from worker.service.celery_app import app as celery

    queues = [q.strip() for q in (args.queues or settings.queue).split(",") if q.strip()]
    unknown = [q for q in queues if q not in worker_queues(settings)]
    if unknown:
        print(f"restorelcc worker: unknown queue(s) {', '.join(unknown)}; the service's queues are "
              f"{', '.join(worker_queues(settings))} (RESTORELCC_QUEUES)", file=sys.stderr)
        return 2
    argv = [
        "worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "--loglevel", args.log_level.upper(),
        "-n", f"restorelcc-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
    ]
    celery.worker_main(argv)
    return 0


def add_commands(subparsers: Any, service: bool = True) -> None:
    """Add submit, status and download to the ``restorelcc`` CLI, and with ``service`` (the API extras are installed)
    serve and worker."""
    if service:
        _add_service_commands(subparsers)
    _add_client_commands(subparsers)


def _add_service_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP API (and, with no broker configured, a local worker)")
    p.add_argument("--host", default=None, help="interface to bind (env RESTORELCC_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (env RESTORELCC_PORT; default 8000)")
    p.add_argument("--data-dir", type=Path, default=None, help="embedded data directory (default .restorelcc)")
    p.add_argument("--dev-open", action="store_true", help="no authentication (development, 127.0.0.1 only)")
    p.add_argument("--embedded", action="store_true",
                   help="embedded setup (the default when REDIS_URL is unset)")
    p.add_argument("--no-worker", action="store_true", help="embedded: do not start the local worker")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("worker", help="run a job worker (Celery on REDIS_URL; local poller without it)")
    p.add_argument("--queue", default=None, help="the default queue (env RESTORELCC_QUEUE; default restorelcc)")
    p.add_argument("--queues", default=None, help="queues to consume, comma-separated (GPU classes such as "
                                                  "'a100,h100', from RESTORELCC_QUEUES); default: the default queue")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (one per GPU)")
    p.add_argument("--embedded", action="store_true", help="poll the job store instead of a broker")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_worker)


def _add_client_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("submit", help="submit a job spec to the service")
    p.add_argument("spec", help="job spec JSON file")
    p.add_argument("--wait", action="store_true", help="wait until the job has finished, showing progress")
    p.add_argument("--download", metavar="DIR", default=None, help="after success, download all artifacts")
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--poll", type=float, default=2.0, help="seconds between status polls")
    p.add_argument("--progress", action="store_true", help="show the progress line even when not a terminal")
    _client_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="show a job")
    p.add_argument("id")
    _client_args(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("download", help="download a job's artifacts (sha256-checked)")
    p.add_argument("id")
    p.add_argument("dir")
    _client_args(p)
    p.set_defaults(func=cmd_download)
