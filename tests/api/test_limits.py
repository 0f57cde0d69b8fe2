"""Request size limits: the body cap (413 naming the limit, before the body is read) and caps on every list and
string of a spec (422 naming the field)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.fields import MAX_EVAL_FILES, MAX_LIMITS, MAX_LORA_TARGETS, MAX_NAME_CHARS, PATH_MAX_BYTES
from app.limits import BodyLimitMiddleware
from app.main import create_app
from tests.conftest import api_settings, serve_in_thread

CAP = 4096


@pytest.fixture
def small(tmp_path):
    """The app with a 4 KiB body cap."""
    with TestClient(create_app(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", max_body_bytes=CAP))) as c:
        yield c


H = {"Authorization": "Bearer key-alice-123", "Content-Type": "application/json"}


def _spec_of_size(tmp_path, size: int) -> bytes:
    spec = {"model": {"id": str(tmp_path / "models" / "m")}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "none"}}
    body = json.dumps(spec).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"  # whitespace: still a valid spec


def test_a_body_over_the_cap_is_413_naming_the_limit(small, tmp_path):
    assert small.post("/v1/jobs", content=_spec_of_size(tmp_path, CAP), headers=H).status_code == 202
    r = small.post("/v1/jobs", content=_spec_of_size(tmp_path, CAP + 1), headers=H)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(CAP) in err["message"] and err["field"] is None
    assert len(small.get("/v1/jobs", headers=H).json()["items"]) == 1
    assert 'restorelcc_http_requests_total{method="POST",route="unmatched",status="413"} 1.0' in small.get(
        "/metrics").text


def test_a_chunked_body_over_the_cap_is_413(small, tmp_path):
    body = _spec_of_size(tmp_path, CAP * 4)

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = small.post("/v1/jobs", content=chunks(), headers=H)  # no Content-Length: Transfer-Encoding: chunked
    assert r.status_code == 413 and str(CAP) in r.json()["error"]["message"]


def test_a_real_server_answers_413_to_both_kinds_of_body(tmp_path):
    """Through uvicorn: a declared length and a chunked body, each 16x the cap, both get the error body."""
    app = create_app(api_settings(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", max_body_bytes=CAP))
    body = _spec_of_size(tmp_path, CAP * 16)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=H, timeout=30) as c:
        for content in (body, iter([body[i:i + 4096] for i in range(0, len(body), 4096)])):
            r = c.post("/v1/jobs", content=content)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.get("/v1/jobs").json()["items"] == []


def _run_middleware(headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes) -> tuple[int, list[dict], bool]:
    """Drive the middleware with a client that would send ``chunks`` chunks; returns how many it read, what it
    sent, and whether the app behind it ran."""
    read = 0
    sent: list[dict] = []
    reached = False

    async def receive() -> dict:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": read < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        nonlocal reached
        reached = True

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=CAP)(scope, receive, send))
    return read, sent, reached


def test_the_cap_never_reads_more_than_the_limit():
    # Content-Length over the cap: refused before a single byte is read.
    read, sent, reached = _run_middleware([(b"content-length", str(10**9).encode())], 10**6, b"x" * 1000)
    assert (read, reached, sent[0]["status"]) == (0, False, 413)
    # Chunked, endless: reading stops at the first chunk past the cap.
    read, sent, reached = _run_middleware([], 10**6, b"x" * 1000)
    assert (read, reached, sent[0]["status"]) == (CAP // 1000 + 1, False, 413)
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    # Under the cap: the app gets the whole body.
    read, sent, reached = _run_middleware([], 4, b"x" * 1000)
    assert (read, reached, sent) == (4, True, [])


def test_the_body_cap_is_a_setting_with_a_1_mib_default(monkeypatch):
    assert Settings().max_body_bytes == 1024 * 1024
    monkeypatch.setenv("RESTORELCC_MAX_BODY_BYTES", "2048")
    assert Settings().max_body_bytes == 2048


@pytest.mark.parametrize(
    "section, value, field",
    [
        ("evaluation", {"tasks": ["/d/t.jsonl"] * (MAX_EVAL_FILES + 1)}, "evaluation.tasks"),
        ("evaluation", {"perplexity": ["/d/t.jsonl"] * (MAX_EVAL_FILES + 1)}, "evaluation.perplexity"),
        ("evaluation", {"response_perplexity": ["/d/t.jsonl"] * 350_000}, "evaluation.response_perplexity"),
        ("evaluation", {"limits": {f"s{i}": 1 for i in range(MAX_LIMITS + 1)}}, "evaluation.limits"),
        ("evaluation", {"limits": {"s" * (MAX_NAME_CHARS + 1): 1}}, "evaluation.limits"),
        ("restoration", {"method": "lora", "lora_targets": ["q_proj"] * (MAX_LORA_TARGETS + 1)},
         "restoration.lora_targets"),
        ("restoration", {"method": "lora", "lora_targets": ["q" * (MAX_NAME_CHARS + 1)]},
         "restoration.lora_targets.0"),
        ("model", {"id": "/m", "revision": "r" * (MAX_NAME_CHARS + 1)}, "model.revision"),
        ("model", {"id": "/" + "m" * PATH_MAX_BYTES}, "model.id"),
        ("pruning", {"method": "magnitude", "pattern": "2:4" + " " * 40}, "pruning.pattern"),
    ],
)
def test_lists_and_strings_over_their_caps_are_422_naming_the_field(api, section, value, field):
    spec = api.spec(**{section: value})
    content = json.dumps(spec).encode()
    if len(content) > 1024 * 1024:  # the 350k-entry list of the issue: refused by the body cap already
        r = api.client.post("/v1/jobs", content=content, headers={**api.h(), "Content-Type": "application/json"})
        assert r.status_code == 413
        spec[section][next(iter(value))] = value[next(iter(value))][:MAX_EVAL_FILES + 1]
    r = api.client.post("/v1/jobs", json=spec, headers=api.h())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["code"] == "invalid_spec", err


def test_the_largest_spec_within_every_cap_is_accepted(api):
    """Every list full, every path PATH_MAX bytes long: accepted, and under the default body cap (its validation
    time is measured separately; see docs/api.md)."""
    data = api.root / "data"

    def longest(tag: str, name: str = "x") -> str:
        p, tail = f"{data}/{tag}", f"/{name}"
        return p + "/x" * ((PATH_MAX_BYTES - len(p) - len(tail)) // 2) + tail

    lists = ("perplexity", "response_perplexity", "tasks")
    stems = [f"{i:02d}" + "s" * (MAX_NAME_CHARS - 2) for i in range(MAX_LIMITS)]  # each file's name, a limits key
    assert len(lists) * MAX_EVAL_FILES == MAX_LIMITS
    spec = api.spec(
        restoration={"method": "lora", "lora_targets": [f"{i:02d}" + "t" * (MAX_NAME_CHARS - 2)
                                                        for i in range(MAX_LORA_TARGETS)]},
        data={"train": longest("t"), "calibration": longest("c")},
        evaluation={k: [longest(f"{k}{i}", stems[n * MAX_EVAL_FILES + i]) for i in range(MAX_EVAL_FILES)]
                    for n, k in enumerate(lists)}
        | {"limits": {stem: 5 for stem in stems}},
    )
    body = json.dumps(spec).encode()
    assert len(body) < Settings().max_body_bytes
    assert all(len(p.encode()) <= PATH_MAX_BYTES for p in spec["evaluation"]["tasks"])
    r = api.client.post("/v1/jobs", content=body, headers={**api.h(), "Content-Type": "application/json"})
    assert r.status_code == 202, r.text
    assert len(r.json()["spec"]["evaluation"]["tasks"]) == MAX_EVAL_FILES
