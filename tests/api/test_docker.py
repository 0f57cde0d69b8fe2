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


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def test_compose_gives_a_stopping_worker_time_to_hand_its_job_back():
    """`docker stop` waits stop_grace_period before SIGKILL; the worker needs preempt_grace_s plus the upload."""
    from app.config import Settings

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grace = Settings.model_fields["preempt_grace_s"].default
    assert _seconds(services["worker"]["stop_grace_period"]) >= 2 * grace
    for name in ("api", "worker"):  # a crash, or a first boot that loses a race with the database, is not final
        assert services[name]["restart"] == "unless-stopped"
    pg = services["postgres"]["healthcheck"]["test"]
    assert pg[:2] == ["CMD", "pg_isready"] and pg[pg.index("-h") + 1] == "127.0.0.1"  # TCP, not the socket


def test_images_own_the_directories_their_volumes_mount_and_the_build_context_leaves_weights_out():
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    hf_home = next(part.split("=", 1)[1] for line in worker.splitlines() if line.startswith("ENV ")
                   for part in line.split() if part.startswith("HF_HOME="))
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert any(v.endswith(":" + hf_home) for v in services["worker"]["volumes"])
    mkdir = next(line for line in worker.splitlines() if line.startswith("RUN mkdir"))
    assert hf_home in mkdir and "chown -R restorelcc:restorelcc" in mkdir
    assert worker.index("RUN mkdir") < worker.index("USER restorelcc")
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"models", "data", ".venv", ".git"} <= ignored
    assert not {"app", "worker", "pyproject.toml", "README.md"} & ignored  # what the images copy
