"""The webhook sender against a real HTTP receiver on 127.0.0.1: what arrives, and how failures are described.

The receiver records every request before answering, so once ``deliver`` has an answer the record is there;
the slow route blocks on an Event that the fixture sets at teardown (no sleeping anywhere).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.webhooks.sender import Attempt, deliver
from app.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign, verify

SECRET = "whsec_sender_test"
BODY = json.dumps({"event": "job.succeeded", "job_id": "j-42", "note": "ünïcode"}).encode()
LONG_ERROR = "E" * 150 + "é" * 150  # 300 characters: the error keeps the first 200


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # keep test output clean
            pass

        def _answer(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.requests.append(Received("POST", self.path, dict(self.headers.items()), body))
            receiver.arrived.set()
            try:
                if self.path == "/ok":
                    self._answer(200, b'{"thanks": true}')
                elif self.path == "/accepted":
                    self._answer(202)
                elif self.path == "/fail":
                    self._answer(500, LONG_ERROR.encode())
                elif self.path == "/fail-empty":
                    self._answer(503)
                elif self.path == "/gone":
                    self._answer(404, b"no such hook")
                elif self.path == "/to-metadata":
                    self._answer(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
                elif self.path == "/to-decimal-metadata":
                    self._answer(307, headers={"Location": "http://2852039166/latest/meta-data"})
                elif self.path == "/to-ok":
                    self._answer(302, headers={"Location": "/ok"})
                elif self.path == "/no-location":
                    self._answer(301)
                elif self.path == "/slow":
                    receiver.release.wait(30)
                    self._answer(200)
                else:
                    self._answer(418)
            except OSError:
                pass  # the sender gave up (timeout) and closed the connection

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec))
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _headers(ts: int) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(SECRET, BODY, ts), DELIVERY_HEADER: "d-123", EVENT_HEADER: "job.succeeded"}


def _allowed(rec: Receiver) -> list[str]:
    return [f"127.0.0.1:{rec.port}"]


def test_200_is_ok_and_the_receiver_gets_body_and_headers(receiver):
    ts = int(datetime.now(UTC).timestamp())
    before = datetime.now(UTC)
    attempt = deliver(receiver.base + "/ok", BODY, _headers(ts), _allowed(receiver), timeout_s=5)
    assert attempt.ok and not attempt.permanent
    assert attempt.status_code == 200 and attempt.error is None
    assert attempt.at.tzinfo is not None and attempt.at.utcoffset().total_seconds() == 0
    assert before <= attempt.at <= datetime.now(UTC)
    assert attempt.duration_ms >= 0
    [got] = receiver.seen()
    assert (got.method, got.path) == ("POST", "/ok")
    assert got.body == BODY
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers[SIGNATURE_HEADER.lower()] == sign(SECRET, BODY, ts)
    assert headers[DELIVERY_HEADER.lower()] == "d-123"
    assert headers[EVENT_HEADER.lower()] == "job.succeeded"
    assert verify(SECRET, got.body, headers[SIGNATURE_HEADER.lower()])
    assert not verify("another-secret", got.body, headers[SIGNATURE_HEADER.lower()])


def test_any_2xx_is_ok_and_a_host_only_entry_allows_the_port(receiver):
    attempt = deliver(receiver.base + "/accepted", BODY, {}, ["127.0.0.1"], timeout_s=5)
    assert attempt.ok and attempt.status_code == 202
    assert len(receiver.seen()) == 1


def test_localhost_name_is_resolved_and_sent_to(receiver):
    # Should localhost resolve to ::1 first, the connection falls back to 127.0.0.1 where the receiver listens.
    attempt = deliver(f"http://localhost:{receiver.port}/ok", BODY, {}, ["localhost"], timeout_s=5)
    assert attempt.ok, attempt
    assert [r.body for r in receiver.seen()] == [BODY]


def test_500_is_a_temporary_failure_with_the_start_of_the_body(receiver):
    attempt = deliver(receiver.base + "/fail", BODY, _headers(1), _allowed(receiver), timeout_s=5)
    assert not attempt.ok and not attempt.permanent
    assert attempt.status_code == 500
    assert attempt.error == "HTTP 500: " + LONG_ERROR[:200]
    assert len(receiver.seen()) == 1


@pytest.mark.parametrize("path, code, error", [("/fail-empty", 503, "HTTP 503: (empty body)"),
                                               ("/gone", 404, "HTTP 404: no such hook")])
def test_other_statuses_are_temporary_failures(receiver, path, code, error):
    attempt = deliver(receiver.base + path, BODY, {}, _allowed(receiver), timeout_s=5)
    assert (attempt.ok, attempt.permanent, attempt.status_code, attempt.error) == (False, False, code, error)


@pytest.mark.parametrize("path, location", [("/to-metadata", "http://169.254.169.254/latest/meta-data"),
                                            ("/to-decimal-metadata", "http://2852039166/latest/meta-data")])
def test_redirect_to_a_refused_place_is_permanent_and_not_followed(receiver, path, location):
    attempt = deliver(receiver.base + path, BODY, _headers(1), _allowed(receiver), timeout_s=5)
    assert not attempt.ok and attempt.permanent
    assert attempt.status_code in (302, 307)
    assert location in attempt.error and "169.254.169.254" in attempt.error
    assert "not followed" in attempt.error and "cloud metadata" in attempt.error
    assert [r.path for r in receiver.seen()] == [path]  # exactly one request, to the URL given


def test_redirect_to_an_allowed_place_is_temporary_and_not_followed(receiver):
    attempt = deliver(receiver.base + "/to-ok", BODY, {}, _allowed(receiver), timeout_s=5)
    assert not attempt.ok and not attempt.permanent
    assert attempt.status_code == 302
    assert "'/ok'" in attempt.error and "redirects are not followed" in attempt.error
    assert "notify.url" in attempt.error and receiver.base + "/ok" in attempt.error
    assert [r.path for r in receiver.seen()] == ["/to-ok"]  # /ok was never asked for


def test_redirect_without_location(receiver):
    attempt = deliver(receiver.base + "/no-location", BODY, {}, _allowed(receiver), timeout_s=5)
    assert (attempt.ok, attempt.permanent, attempt.status_code) == (False, False, 301)
    assert "not followed" in attempt.error


@pytest.mark.parametrize("allowed, fragment", [
    (["localhost"], "allow-list"),
    (["127.0.0.1:1"], "allow-list"),
    ([], "not enabled"),
])
def test_host_not_allowed_sends_nothing(receiver, allowed, fragment):
    attempt = deliver(receiver.base + "/ok", BODY, _headers(1), allowed, timeout_s=5)
    assert not attempt.ok and attempt.permanent
    assert attempt.status_code is None
    assert attempt.error.startswith("refused: ") and fragment in attempt.error
    assert receiver.seen() == []


def test_refused_scheme_and_credentials_send_nothing(receiver):
    for url in (f"ftp://127.0.0.1:{receiver.port}/ok", f"http://u:p@127.0.0.1:{receiver.port}/ok"):
        attempt = deliver(url, BODY, {}, _allowed(receiver), timeout_s=5)
        assert attempt.permanent and attempt.error.startswith("refused: "), attempt
    assert receiver.seen() == []


def test_receiver_that_does_not_answer_times_out(receiver):
    attempt = deliver(receiver.base + "/slow", BODY, _headers(1), _allowed(receiver), timeout_s=0.5)
    assert not attempt.ok and not attempt.permanent
    assert attempt.status_code is None
    assert "timeout" in attempt.error.lower()
    assert "ReadTimeout" in attempt.error
    assert attempt.duration_ms >= 400  # it waited out the 0.5 s read timeout
    assert receiver.arrived.wait(5)  # it was sent: the receiver just never answered
    assert [r.path for r in receiver.seen()] == ["/slow"]


def test_connection_refused_is_a_temporary_failure():
    with socket.socket() as s:  # bound but not listening: connecting is refused for as long as it is held
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        attempt = deliver(f"http://127.0.0.1:{port}/hook", BODY, {}, [f"127.0.0.1:{port}"], timeout_s=5)
    assert not attempt.ok and not attempt.permanent
    assert attempt.status_code is None
    assert attempt.error.startswith("ConnectError"), attempt.error


def test_attempt_to_json():
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    attempt = Attempt(at=at, status_code=500, error="HTTP 500: x", duration_ms=12, ok=False, permanent=False)
    data = attempt.to_json()
    assert data == {"at": "2024-05-01T12:30:00+00:00", "status_code": 500, "error": "HTTP 500: x",
                    "duration_ms": 12, "ok": False, "permanent": False}
    assert datetime.fromisoformat(data["at"]) == at
    assert json.loads(json.dumps(data)) == data
    with pytest.raises(AttributeError):
        attempt.ok = True  # type: ignore[misc]


def test_the_sender_connects_to_the_address_it_checked(receiver, monkeypatch):
    """A name is looked up once: a DNS answer that changes between the check and the connection (rebinding to the
    metadata address) cannot redirect the request."""
    import socket as socket_module

    real = socket_module.getaddrinfo
    calls: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        calls.append(host)
        if host == "hooks.example.test":
            target = "127.0.0.1" if len(calls) == 1 else "169.254.169.254"
            return real(target, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", rebinding)
    url = f"http://hooks.example.test:{receiver.port}/ok"
    result = deliver(url, BODY, {}, [f"hooks.example.test:{receiver.port}"], timeout_s=5)
    assert result.ok, result
    assert calls.count("hooks.example.test") == 1
    (got,) = receiver.seen()
    assert got.headers["Host"] == f"hooks.example.test:{receiver.port}" and got.body == BODY
