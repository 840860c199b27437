"""Hostile parameter values reach a real POSIX shell over SSH as plain text and run nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from restore_flows.drivers.commands import Dialect, render
from restore_flows.drivers.ssh import ParamikoShell
from tests.peers.sshd import SshdHost

pytestmark = pytest.mark.slow

HOSTILE = [
    "x; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "'; touch {canary}; '",
    '"; touch {canary}; "',
    "a && touch {canary}",
    "a | touch {canary}",
    "a\\'; touch {canary} #",
    "$(printf '%s' x > {canary})",
    "* ~ $HOME ${{PATH}} !! -n",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_a_hostile_value_is_printed_exactly_and_runs_nothing(
    shell: ParamikoShell, peer: SshdHost, tmp_path: Path, template: str
) -> None:
    canary = tmp_path / "pwned"
    value = template.format(canary=canary)
    command = render("printf '%s' {value}", Dialect.POSIX, {"value": value})

    result = shell.run(peer.inventory_host(), command, timeout=10)

    assert (result.exit_status, result.stdout, result.stderr) == (0, value, "")
    assert not canary.exists()


def test_the_canary_catches_an_unquoted_value(shell: ParamikoShell, peer: SshdHost, tmp_path: Path) -> None:
    """The check above can fail: the same value pasted in without quoting does run."""
    canary = tmp_path / "pwned"

    shell.run(peer.inventory_host(), f"printf '%s' x; touch {canary}", timeout=10)

    assert canary.exists()
