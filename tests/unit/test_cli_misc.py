"""Small CLI behaviours that need no database or server."""

from __future__ import annotations

from typer.testing import CliRunner

from restore_flows.cli import app


def test_live_run_is_refused_clearly() -> None:
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    assert "live mode needs the real drivers" in result.stderr
    assert "nothing was done" in result.stderr
