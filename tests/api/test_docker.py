"""What can be checked without a Docker engine: the compose file parses, is wired by environment variables,
and every service command is a real CLI subcommand; the Dockerfiles install the right extras."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.cli.main import build_parser

ROOT = Path(__file__).parents[2]


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_compose_services_and_commands():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "minio", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        cmd = services[name]["command"]
        assert cmd[0] == "restorelcc"
        args = _parse(cmd[1:])
        assert args.command == cmd[1] and callable(args.func)
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["REDIS_URL"].startswith("redis://") and env["RESTORELCC_S3_ENDPOINT_URL"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "RESTORELCC_API_KEYS" in services["api"]["environment"]


def test_dockerfiles_install_the_right_extras():
    api = (ROOT / "docker" / "api.Dockerfile").read_text()
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    pip_line = next(line for line in api.splitlines() if "pip install" in line)
    assert "python:3" in api and "slim" in api and '".[api]"' in pip_line and "worker]" not in pip_line
    assert "cuda" in worker.lower() and '".[worker]"' in worker
    for text in (api, worker):
        cmd = yaml.safe_load([line for line in text.splitlines() if line.startswith("CMD ")][-1][4:])
        assert _parse(cmd[1:]).func


def test_cli_has_the_service_commands():
    for argv in (["serve", "--dev-open"], ["worker", "--queue", "q"], ["submit", "s.json", "--wait", "--download", "d"],
                 ["status", "abc"], ["download", "abc", "d"]):
        assert _parse(argv).command == argv[0]
