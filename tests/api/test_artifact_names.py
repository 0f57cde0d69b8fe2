"""Artifact names of any kind, over real HTTP (uvicorn): the download's Content-Disposition is RFC 6266 for every
name, and the Python client percent-encodes names so that the server looks up exactly the name it was given.

Real uvicorn rather than Starlette's TestClient, which percent-decodes a request path twice (``%2541`` reaches the
app as ``A``) and never checks a header value the way h11 does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from werkzeug.http import parse_options_header  # moto's server runs on werkzeug

from app.client import Client
from app.main import create_app
from app.routes.artifacts import content_disposition
from app.schemas import JobStatus
from app.store.artifacts import job_key
from tests.conftest import KEYS, api_settings, serve_in_thread

H = {"Authorization": f"Bearer {KEYS['alice']}"}
# attachment; filename="<printable ASCII but '"', '\' and '%'>"; filename*=UTF-8''<RFC 8187 attr-chars, pct-encoded>
DISPOSITION = re.compile(r"""attachment; filename="([\x20\x21\x23\x24\x26-\x5b\x5d-\x7e]*)"; """
                         r"""filename\*=UTF-8''((?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+)""")


@dataclass
class Served:
    url: str
    services: Any  # app.deps.Services
    root: Path

    def finished_job(self, files: dict[str, bytes]) -> str:
        """A succeeded job whose artifacts are ``files`` (name → bytes), each stored under a key of its own (a
        name the store's keys refuse, such as one with a backslash, can still be recorded)."""
        r = httpx.post(f"{self.url}/v1/jobs", headers=H, json={
            "model": {"id": str(self.root / "models" / "tiny")}, "pruning": {"method": "magnitude"},
            "restoration": {"method": "none"}})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        jobs, store = self.services.jobs, self.services.artifacts
        assert jobs.claim(job, "w")
        for i, (name, data) in enumerate(files.items()):
            src = self.root / f"file-{i}"
            src.write_bytes(data)
            stored = store.put_file(job_key(job, f"f{i}.bin", 1), src)
            jobs.add_artifact(job, name, stored.size, stored.sha256, stored.key)
        assert jobs.finish(job, JobStatus.succeeded)
        return job


@pytest.fixture
def served(tmp_path, db_url) -> Iterator[Served]:
    app = create_app(api_settings(tmp_path, db_url))
    with serve_in_thread(app) as url:
        yield Served(url, app.state.services, tmp_path)


ODD_NAMES = [
    "model/LICENSE-日本語.txt",  # not Latin-1: was a 500
    'model/TERMS "x".txt',  # was a broken quoted-string
    "model/café.txt",  # Latin-1 but not ASCII
    "model/back\\slash.txt",
    "model/tab\there.txt",
    "model/del\x7f.txt",
    "model/100%41.txt",  # '%41' must not reach a client that percent-decodes the fallback as 'A'
    "model/a;b=c,d.txt",
    "model/😀",
    "report.json",
]


def _disposition(header: str) -> tuple[str, str]:
    """The (ASCII fallback, exact name) of a Content-Disposition the service writes; fails on any other form."""
    m = DISPOSITION.fullmatch(header)
    assert m, header
    return m.group(1), unquote(m.group(2), errors="strict")


def test_content_disposition_is_rfc_6266_for_any_name(served):
    files = {name: f"contents of {name}".encode() for name in ODD_NAMES}
    job = served.finished_job(files)
    for name, data in files.items():
        r = httpx.get(f"{served.url}/v1/jobs/{job}/artifacts/{quote(name, safe='/')}", headers=H)
        assert r.status_code == 200, (name, r.status_code, r.text[:200])
        assert r.content == data, name
        header = r.headers["content-disposition"]
        assert header.isascii(), header
        base = name.rsplit("/", 1)[-1]
        fallback, exact = _disposition(header)
        assert exact == base, name
        assert len(fallback) == len(base), name  # one '_' for each character that cannot stand there
        assert all(f == b or f == "_" for f, b in zip(fallback, base, strict=True)), (name, fallback)
        assert parse_options_header(header) == ("attachment", {"filename": base}), header  # an independent reader
    assert _disposition(httpx.get(f"{served.url}/v1/jobs/{job}/artifacts/report.json", headers=H).headers[
        "content-disposition"]) == ("report.json", "report.json")


def test_content_disposition_for_names_no_request_path_reaches():
    """A line break (Starlette's path parameter stops at one) or a lone surrogate (a file name that was not UTF-8)
    still gives a well-formed header, should such a name be served some day."""
    for name, fallback, exact in (("model/new\nline.txt", "new_line.txt", "new\nline.txt"),
                                  ("cr\r\nlf", "cr__lf", "cr\r\nlf"), ("x\udce9y", "x_y", "x?y")):
        header = content_disposition(name)
        assert header.isascii() and _disposition(header) == (fallback, exact), name


def test_the_client_downloads_names_that_need_percent_encoding(served, tmp_path):
    """'#' would start a fragment, '?' a query, '%41' would be read as 'A': each asked for another name. A decoy
    named as a wrong decoding would be served holds other bytes, so a wrong lookup cannot pass as right."""
    names = ["model/LICENSE #2.txt", "model/TERMS?.txt", "model/LICENSE%41.txt", "model/LICENSE-中文.txt",
             "model/a b+c&d=e.txt", "model/semi;colon.txt", "model/pct%2Fslash.txt"]
    decoys = ["model/LICENSE ", "model/TERMS", "model/LICENSEA.txt", "model/pct/slash.txt"]
    files = {name: f"{name}: {i}".encode() * 100 for i, name in enumerate(names + decoys)}
    job = served.finished_job(files)
    with Client(served.url, api_key=KEYS["alice"]) as client:
        got = client.download_all(job, tmp_path / "dl")
        assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in got) == sorted(files)
        for name, data in files.items():
            assert (tmp_path / "dl" / name).read_bytes() == data, name
        one = client.download(job, "model/LICENSE%41.txt", tmp_path / "one.txt")  # checked against the ETag
        assert one.read_bytes() == files["model/LICENSE%41.txt"]
