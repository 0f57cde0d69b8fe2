"""The API process's background loop: delivers due webhook events and sends held jobs whose tenant has a free
running slot. It runs only where there is something to do (webhooks allowed, or a running quota configured), and
never on a GPU worker, so a slow receiver holds no GPU.

Several API processes may run it at once: a delivery is claimed before it is sent, and events of one job go out one
after the other, in order (app.store.jobs.JobStore.due_deliveries).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from app.config import Settings
from app.service import Enqueuer, dispatch_held
from app.store.jobs import JobStore
from app.store.models import Delivery, utcnow
from app.tenancy import TenantPolicy
from app.webhooks.sender import deliver
from app.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger("restorelcc.webhooks")
USER_AGENT = "restorelcc-webhooks/1"


def retry_delay(settings: Settings, failures: int) -> float:
    """Exponential back-off: base, 2×base, 4×base, ... capped at the longest interval."""
    return min(settings.webhook_retry_max_interval_s, settings.webhook_retry_base_s * 2 ** max(0, failures - 1))


class Dispatcher:
    def __init__(self, settings: Settings, jobs: JobStore, policy: TenantPolicy, enqueuer: Enqueuer,
                 senders: int = 8):
        self.settings = settings
        self.jobs = jobs
        self.policy = policy
        self.enqueuer = enqueuer
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="restorelcc-webhook")
        self._thread: threading.Thread | None = None
        self._inflight: set[str] = set()  # deliveries being sent by this process: a slow receiver holds only its own
        self._lock = threading.Lock()

    @property
    def needed(self) -> bool:
        return bool(self.settings.webhook_allowed_hosts) or self.policy.running_limited

    def start(self) -> None:
        if self.needed and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="restorelcc-dispatcher")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a database hiccup: try again next round
                log.warning("dispatcher round failed", exc_info=True)
            self._stop.wait(self.settings.webhook_poll_s)

    def run_once(self, wait: bool = False) -> int:
        """One round: held jobs released, due deliveries handed to the senders (in parallel across jobs; the round
        does not wait for them unless ``wait``). Returns the deliveries handed over."""
        dispatch_held(self.jobs, self.policy, self.enqueuer)  # also after a running limit was removed
        due = self.jobs.due_deliveries() if self.settings.webhook_allowed_hosts else []
        with self._lock:
            due = [d for d in due if d.id not in self._inflight]
            self._inflight.update(d.id for d in due)
        futures = [self._pool.submit(self._send_and_forget, d) for d in due]
        if wait:
            for f in futures:
                f.result()
        return len(futures)

    def _send_and_forget(self, d: Delivery) -> None:
        try:
            self.send(d)
        except Exception:  # the database went away: the claim expires and the delivery is tried again
            log.warning("webhook %s of job %s: sending failed", d.id, d.job_id, exc_info=True)
        finally:
            with self._lock:
                self._inflight.discard(d.id)

    def send(self, d: Delivery) -> int:
        """Try one delivery once (if it is due and no other process holds it) and record the attempt. Returns
        attempts made."""
        s = self.settings
        # Held for well past one attempt's timeout (httpx's timeout bounds each read, not the whole answer); an
        # answer that comes after another sender took the delivery over is dropped (record_attempt's claim).
        claimed = self.jobs.claim_delivery(d.id, 3 * s.webhook_timeout_s + 60)
        if claimed is None:
            return 0
        claim, earlier = claimed
        failures = earlier + 1
        secret = self.policy.webhook_secret(d.tenant)
        if secret is None:
            self.jobs.record_attempt(d.id, claim, {"at": utcnow().isoformat(), "status_code": None, "ok": False,
                                                   "error": f"no webhook secret is configured for tenant {d.tenant}",
                                                   "duration_ms": 0, "permanent": True}, "failed")
            return 1
        body = json.dumps(d.payload, separators=(",", ":")).encode()
        headers = {SIGNATURE_HEADER: sign(secret, body, int(time.time())), DELIVERY_HEADER: d.id,
                   EVENT_HEADER: d.event, "User-Agent": USER_AGENT}
        attempt = deliver(d.url, body, headers, s.webhook_allowed_hosts, s.webhook_timeout_s)
        now = utcnow()
        if attempt.ok:
            state, next_at = "delivered", None
        elif attempt.permanent or (now - d.created_at).total_seconds() >= s.webhook_retry_for_s:
            state, next_at = "failed", None
            log.warning("webhook %s of job %s given up: %s", d.id, d.job_id, attempt.error)
        else:
            state, next_at = "pending", now + timedelta(seconds=retry_delay(s, failures))
        self.jobs.record_attempt(d.id, claim, attempt.to_json(), state, next_at)
        return 1
