"""/metrics against the real job store: the store's families while it can be read, and an explicit
``restorelcc_database_up 0`` (those families left out, not zeros) while it cannot."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PG_BASE, api_settings, free_port

STORE_FAMILIES = ("restorelcc_jobs", "restorelcc_checkpoint_bytes", "restorelcc_webhook_deliveries")


def _samples(text: str) -> dict[str, float]:
    """Sample lines of a Prometheus exposition: name{labels} → value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_the_store_families_and_database_up_while_the_store_is_readable(api):
    api.create()
    samples = _samples(api.client.get("/metrics").text)
    assert samples["restorelcc_database_up"] == 1.0
    assert samples['restorelcc_jobs{status="queued"}'] == 1.0 and samples['restorelcc_jobs{status="failed"}'] == 0.0
    assert samples["restorelcc_checkpoint_bytes"] == 0.0
    assert samples['restorelcc_webhook_deliveries{state="pending"}'] == 0.0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_unreachable_store_is_database_up_0_with_its_families_left_out(tmp_path, backend):
    """A real engine that cannot connect: SQLite in a directory that does not exist, PostgreSQL on a closed port.
    Every store gauge reading 0 would look like an idle service; the scrape says the store could not be read."""
    url = (f"sqlite:///{tmp_path / 'missing' / 'jobs.db'}" if backend == "sqlite"
           else PG_BASE.replace(":5432/", f":{free_port()}/"))
    from app.main import create_app

    app = create_app(api_settings(tmp_path, url), migrate=False)
    with TestClient(app) as client:
        r = client.get("/metrics")
    assert r.status_code == 200, r.text
    samples = _samples(r.text)
    assert samples["restorelcc_database_up"] == 0.0
    for family in STORE_FAMILIES:
        assert not [s for s in samples if s == family or s.startswith(family + "{")], family
        assert f"# HELP {family} " not in r.text, family
