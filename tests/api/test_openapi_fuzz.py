"""The OpenAPI description matches the answers: a schema-driven fuzzer (schemathesis) against the real app.

The app runs under uvicorn with the model and data roots pointed at an empty directory and no worker, so an
accepted job (an allowed hub id) just stays queued. Bounded and deterministic: a fixed seed, a few examples per
operation and phase, no shrinking, no stateful phase, no example database.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from app.config import Settings
from app.main import create_app
from tests.conftest import KEYS, serve_in_thread

# Every status, media type, body and header the service sends must be documented; a 5xx fails by itself.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "unsupported_method",
          "allow_header_conformance")

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20250101,
    "headers": {"Authorization": f"Bearer {KEYS['alice']}"},
    "generation": {"mode": "all", "max-examples": 12, "deterministic": True, "no-shrink": True,
                   "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
})


def fuzz_app(root: Path) -> Any:
    """The real app: SQLite, local artifacts, roots at an empty directory, hub ids allowed, no worker."""
    empty = root / "roots"
    empty.mkdir(exist_ok=True)
    return create_app(Settings(
        data_dir=root / "state", database_url=f"sqlite:///{root / 'jobs.db'}",
        api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        model_roots=[empty], data_roots=[empty], allow_hub_models=True,
    ))


with tempfile.TemporaryDirectory() as _d:  # the description does not depend on the settings
    OPENAPI = fuzz_app(Path(_d)).openapi()

schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Any:
    with serve_in_thread(fuzz_app(tmp_path_factory.mktemp("fuzz"))) as url:
        assert httpx.get(f"{url}/openapi.json").json() == OPENAPI
        yield url


ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def error_answers_are_documented_error_bodies(ctx: Any, response: Any, case: Any) -> None:
    """Schema conformance alone passes ``{"error": ...}`` against FastAPI's default 422 schema (no required
    keys): every error answer must be the service's error body, and be documented as exactly that."""
    if response.status_code < 400 or case.path == "/readyz":  # not ready: a documented Readiness body
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    documented = OPENAPI["paths"][case.path].get(case.method.lower())
    if documented is not None:  # else an undocumented method: 405, checked by unsupported_method
        assert documented["responses"][str(response.status_code)]["content"] == ERROR_BODY


@schema.parametrize()
def test_every_answer_matches_the_openapi_description(case, base_url):
    case.call_and_validate(base_url=base_url, additional_checks=[error_answers_are_documented_error_bodies])


def _responses(path: str, method: str) -> dict[str, Any]:
    return OPENAPI["paths"][path][method]["responses"]


def test_the_description_lists_the_real_statuses_bodies_and_media_types():
    assert "HTTPValidationError" not in str(OPENAPI)
    assert set(_responses("/v1/jobs", "post")) == {"202", "400", "401", "409", "413", "415", "422", "429", "503"}
    for path, ops in OPENAPI["paths"].items():  # every job operation reads the job store, which can be down
        assert all("503" in op["responses"] for op in ops.values() if path.startswith("/v1/")), path
    assert {"200", "202", "404", "409"} <= set(_responses("/v1/jobs/{job_id}/cancel", "post"))
    assert _responses("/readyz", "get")["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"}
    assert set(_responses("/metrics", "get")["200"]["content"]) == {"text/plain"}
    download = _responses("/v1/jobs/{job_id}/artifacts/{name}", "get")
    for status in ("200", "206"):
        assert download[status]["content"] == {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status[0] in "45" and (path, status) != ("/readyz", "503"):
                    assert answer["content"] == ERROR_BODY, (method, path, status)


def test_405_allows_every_method_the_path_serves(base_url):
    h = {"Authorization": f"Bearer {KEYS['alice']}"}
    for path, documented in (("/v1/jobs/abc", "DELETE, GET"), ("/v1/jobs", "GET, POST"),
                             ("/v1/jobs/abc/cancel", "POST")):
        r = httpx.put(f"{base_url}{path}", headers=h)
        assert r.status_code == 405 and r.headers["allow"] == documented, (path, r.headers.get("allow"))
        assert r.json()["error"]["code"] == "method_not_allowed"
