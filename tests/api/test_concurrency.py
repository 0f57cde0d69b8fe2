"""50 concurrent POSTs with one Idempotency-Key create exactly one job (real uvicorn, real store)."""

from __future__ import annotations

import threading

import httpx

from app.main import create_app
from tests.conftest import KEYS, api_settings, serve_in_thread


def test_concurrent_posts_with_one_idempotency_key_create_one_job(tmp_path, db_url):
    settings = api_settings(tmp_path, db_url)
    app = create_app(settings)
    spec = {"model": {"id": str(tmp_path / "models" / "m")}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "none"}}
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "Idempotency-Key": "same-key"}
    with serve_in_thread(app) as url:
        results: list[tuple[int, str]] = []
        barrier = threading.Barrier(50)

        def post() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                barrier.wait()
                r = c.post("/v1/jobs", json=spec, headers=headers)
                results.append((r.status_code, r.json().get("id", r.text)))

        threads = [threading.Thread(target=post) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        listed = httpx.get(f"{url}/v1/jobs", headers=headers).json()["items"]
    assert len(results) == 50
    assert {code for code, _ in results} == {202}, results
    assert len({job_id for _, job_id in results}) == 1
    assert [j["id"] for j in listed] == [results[0][1]]
