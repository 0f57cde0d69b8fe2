"""A real HTTP receiver on 127.0.0.1 for webhook tests: records every POST, answers what ``answer`` says."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    answer: Callable[[Received, list[Received]], tuple[int, dict[str, str]]]
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


@contextmanager
def receiving(answer: Callable[[Received, list[Received]], tuple[int, dict[str, str]]]) -> Iterator[Receiver]:
    """``answer(request, earlier requests)`` → (status, headers)."""
    receiver = Receiver(0, answer)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            with receiver.lock:
                earlier = list(receiver.requests)
                receiver.requests.append(got)
            status, headers = receiver.answer(got, earlier)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
