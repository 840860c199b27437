"""Command templates made safe for the target shell.

Templates come from the inventory (written by engineers) and take parameters (host names, image ids,
service names) that must never be able to add a command. :func:`render` quotes every parameter for the
target shell as one literal string, and :func:`command_line` wraps a PowerShell script in
``-EncodedCommand`` so that nothing between the SSH server and PowerShell (Windows OpenSSH starts
``cmd.exe`` unless told otherwise) can reinterpret it.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Mapping
from enum import StrEnum

from restore_flows.errors import RestoreError


class Dialect(StrEnum):
    POWERSHELL = "powershell"
    POSIX = "posix"


class TemplateError(RestoreError):
    """A template names a parameter that was not given, or a value cannot be quoted safely."""


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# PowerShell treats the typographic single quotes as quotes too: doubling only ASCII ' would let
# "\u2018; Remove-Item ..." close the literal.
_PS_SINGLE_QUOTES = re.compile("['\u2018\u2019\u201a\u201b]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def quote(value: str, dialect: Dialect) -> str:
    """One literal string in ``dialect``, whatever ``value`` contains."""
    if _CONTROL.search(value):
        raise TemplateError(f"refusing to quote a value with control characters: {value!r}")
    if dialect is Dialect.POWERSHELL:
        return "'" + _PS_SINGLE_QUOTES.sub(lambda m: m.group(0) * 2, value) + "'"
    return shlex.quote(value)


def render(template: str, dialect: Dialect, params: Mapping[str, object]) -> str:
    """Fill ``{name}`` placeholders with quoted values; ``{{`` and ``}}`` are literal braces."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise TemplateError(
                f"template {template!r} uses {{{name}}}, which is not one of {sorted(params)}"
            )
        return quote(str(params[name]), dialect)

    escaped = template.replace("{{", "\0").replace("}}", "\1")
    filled = _PLACEHOLDER.sub(fill, escaped)
    return filled.replace("\0", "{").replace("\1", "}")


def command_line(script: str, dialect: Dialect) -> str:
    """What to send over SSH to run ``script``."""
    if dialect is Dialect.POWERSHELL:
        encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
        return f"powershell.exe -NoLogo -NoProfile -NonInteractive -EncodedCommand {encoded}"
    return script
