"""Quoting for the target shell: no inventory value can add a command."""

from __future__ import annotations

import base64
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from restore_flows.drivers.commands import Dialect, TemplateError, command_line, quote, render

HOSTILE = [
    "'; Remove-Item -Recurse C:\\ ; '",
    "\u2018; Stop-Computer; \u2019",
    "$(Stop-Computer)",
    "`whoami`",
    'a"b',
    "x; rm -rf /",
    "$(echo injected)",
    "a b\tc",
    "",
]


QUOTES = "'\u2018\u2019\u201a\u201b"


def _powershell_literal(text: str) -> tuple[str, int]:
    """Parse a single-quoted PowerShell literal the way PowerShell does: any of the single-quote
    characters opens or closes it, and two in a row stand for one. Returns the value and where it ends."""
    assert text[0] in QUOTES
    value, i = [], 1
    while i < len(text):
        if text[i] in QUOTES:
            if i + 1 < len(text) and text[i + 1] in QUOTES:
                value.append(text[i])
                i += 2
                continue
            return "".join(value), i + 1
        value.append(text[i])
        i += 1
    raise AssertionError(f"unterminated literal: {text!r}")


@pytest.mark.parametrize("value", HOSTILE)
def test_powershell_quote_is_exactly_one_literal(value: str) -> None:
    quoted = quote(value, Dialect.POWERSHELL)
    parsed, end = _powershell_literal(quoted + "; Stop-Computer")
    assert (parsed, end) == (value, len(quoted))


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))))
def test_posix_quote_round_trips_through_a_real_shell(value: str) -> None:
    out = subprocess.run(
        ["sh", "-c", "printf '%s' " + quote(value, Dialect.POSIX)], capture_output=True, check=True
    )
    assert out.stdout.decode() == value


def test_render_quotes_every_parameter_and_keeps_escaped_braces() -> None:
    script = render(
        "Get-Service -Name {service} | ConvertTo-Json {{x}}", Dialect.POWERSHELL, {"service": "a'b"}
    )
    assert script == "Get-Service -Name 'a''b' | ConvertTo-Json {x}"


def test_render_refuses_an_unknown_parameter_and_control_characters() -> None:
    with pytest.raises(TemplateError, match=r"\{missing\}"):
        render("echo {missing}", Dialect.POSIX, {"host": "x"})
    with pytest.raises(TemplateError, match="control characters"):
        render("echo {host}", Dialect.POSIX, {"host": "a\nb"})


def test_hostile_value_runs_as_data_in_a_real_shell(tmp_path: object) -> None:
    for value in HOSTILE:
        script = render("printf '%s' {value}", Dialect.POSIX, {"value": value})
        out = subprocess.run(
            ["sh", "-c", command_line(script, Dialect.POSIX)], capture_output=True, check=True
        )
        assert out.stdout.decode() == value


def test_powershell_command_line_is_encoded_and_decodes_to_the_script() -> None:
    script = render("Write-Output {v}", Dialect.POWERSHELL, {"v": "'; Stop-Computer"})
    line = command_line(script, Dialect.POWERSHELL)
    encoded = line.rsplit(" ", 1)[1]
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    assert base64.b64decode(encoded).decode("utf-16-le") == "Write-Output '''; Stop-Computer'"
    assert line.startswith("powershell.exe -NoLogo -NoProfile -NonInteractive -EncodedCommand ")
