"""The CLI's service commands: serve and worker are offered exactly when the API extras are installed, and a
service module that fails to import is an error to see, never a quietly shorter command list."""

from __future__ import annotations

import sys

import pytest

from worker.cli import main
from worker.cli.service import cmd_serve, cmd_status, cmd_worker


def test_serve_and_worker_are_offered_with_the_api_extras() -> None:
    parser = main.build_parser()
    assert main.service_extras_installed()  # the dev install has them
    assert parser.parse_args(["serve"]).func is cmd_serve
    assert parser.parse_args(["worker"]).func is cmd_worker
    assert parser.epilog is None


def test_without_the_api_extras_only_the_client_commands_are_offered(monkeypatch, capsys) -> None:
    monkeypatch.setattr(main, "SERVICE_PACKAGES", ("restorelcc_no_such_package",))
    parser = main.build_parser()
    for command in ("serve", "worker"):
        with pytest.raises(SystemExit):
            parser.parse_args([command])
        assert f"invalid choice: '{command}'" in capsys.readouterr().err
    assert parser.parse_args(["status", "job-1"]).func is cmd_status  # httpx only: the base install
    assert "pip install 'restorelcc[api]'" in parser.format_help()


def test_a_service_module_that_fails_to_import_is_not_hidden(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "worker.cli.service", None)  # `import worker.cli.service` raises ImportError
    with pytest.raises(ImportError):
        main.build_parser()
