"""docs/api.md says what the service does: every operation of the OpenAPI description is in its endpoint table, and
every setting is in its settings table."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

DOC = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
DOC_PAGES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def test_every_operation_is_in_the_endpoint_table():
    from app.main import create_app

    schema = create_app(Settings(dev_open=True)).openapi()
    rows = set(re.findall(r"^\| (GET|POST|DELETE|PUT|PATCH) \| `([^`]+)` \|", DOC, re.M))
    documented = {(m, p.replace("{id}", "{job_id}")) for m, p in rows}
    operations = {(m.upper(), p) for p, ops in schema["paths"].items() if p not in DOC_PAGES for m in ops}
    assert operations - documented == set()
    assert documented - operations == set()


def test_every_setting_is_in_the_settings_table():
    names = set(re.findall(r"`((?:RESTORELCC_)?[A-Z0-9_]+)`", DOC))
    missing = []
    for name, field in Settings.model_fields.items():
        env = {f"RESTORELCC_{name.upper()}"}
        aliases = getattr(field.validation_alias, "choices", None) or []
        env |= {a for a in aliases if isinstance(a, str) and a.isupper()}
        if not env & names:
            missing.append(name)
    assert missing == []
