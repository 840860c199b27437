"""Checks of one file's shape, before merging: secrets, unknown keys, types.

Each finding becomes a :class:`Diagnostic` that points at the line where the key or value was written and
names the field path (``groups[2].hosts[0].bmc.adress``). Pydantic gives the path as a tuple; the
``SourceMap`` / ``SourceList`` values from :mod:`yamlsource` turn it into a line.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from restore_flows.errors import Diagnostic
from restore_flows.inventory.yamlsource import SourceList, SourceMap

Loc = tuple[int | str, ...]

# Keys whose value would be a credential. The inventory names secrets (``credentials_secret: bmc-arl``);
# it never holds them, because the YAML is read, copied and committed by many people.
SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "token",
        "api_key",
        "apikey",
        "access_key",
        "secret_key",
        "private_key",
        "passphrase",
        "credentials",
        "client_secret",
    }
)
# Private keys in any string: PEM and OpenSSH ("-----BEGIN RSA PRIVATE KEY-----"), PGP ("-----BEGIN PGP
# PRIVATE KEY BLOCK-----") and PuTTY's .ppk ("PuTTY-User-Key-File-3: ssh-ed25519").
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|PuTTY-User-Key-File-[0-9]+:"
)
# A value that is a placeholder or names a variable is not a secret: '{token}', '$PW', '$env:PW', '%PW%'.
_NOT_A_VALUE = r"(?![{$%])"
# https://user:password@host/ (a user without a password, ssh://admin@host, is fine).
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*:" + _NOT_A_VALUE + r"[^\s/?#@]+@")
_URL_QUERY_SECRET = re.compile(
    r"(?i)[?&](?:access_token|token|password|passwd|pwd|api_?key|secret|client_secret|sig|signature)="
    + _NOT_A_VALUE
    + r"[^&\s#]"
)
# A password given to a command: --password=x, -Password x, /password:x, sshpass -p x, mysql -px,
# net use ... /user:NAME PASSWORD, ConvertTo-SecureString ... -AsPlainText.
_PASSWORD_ARGUMENT = re.compile(
    r"(?i)(?:^|[\s'\"])(?:--?|/)(?:password|passwd|pass|pwd|passphrase|token|secret|client[-_]?secret"
    r"|api[-_]?key|access[-_]?key|secret[-_]?key)(?:[=:]|\s+)" + _NOT_A_VALUE + r"[^\s-]"
    r"|\bsshpass\s+-p\s*" + _NOT_A_VALUE + r"\S"
    r"|\bmysql\w*\b.*?\s-p" + _NOT_A_VALUE + r"\S"
    r"|\bnet\s+use\b.*?/user:\S+\s+(?![{$%/])\S"
    r"|\bConvertTo-SecureString\b.*-AsPlainText"
)
# Keys whose value is a user name: 'admin:Hunter2!' is a user and its password.
_USER_KEYS = frozenset({"user", "username", "login"})
# An address with user-info but no scheme: 'root:calvin@10.0.0.9'.
_ADDRESS_KEYS = frozenset({"address", "url", "host"})
_BARE_USERINFO = re.compile(r"^[^\s/@:]+:[^\s/@]+@")
# A cheap pre-check on the file's text, so that the walk over every value runs only for files that
# might hold a secret. It may say yes wrongly (a comment, a description); it never says no wrongly:
# every rule above needs one of these marks in the text (each secret key contains one, so do the
# password options and 'net use ... /user:'). Plain substring searches: a regex over 10 MB of hosts
# costs more than the walk it saves.
_MARKS = (
    *("pass", "pwd", "secret", "token", "api", "access", "private_key", "credentials"),
    *("-----begin", "putty-user-key", "://", "@", "user", "login", "mysql", "plaintext"),
)


def may_hold_secrets(text: str) -> bool:
    lowered = text.lower()
    return any(mark in lowered for mark in _MARKS)


def secret_in_value(key: object, value: str) -> str | None:
    """What kind of credential ``value`` (written under ``key``) holds, or None.

    The answer never quotes the value: a message that repeated it would leak it a second time, into
    terminals, logs and CI output.
    """
    if ("-----BEGIN" in value or "PuTTY-User-Key-File" in value) and _PRIVATE_KEY.search(value):
        return "a private key"
    if "://" in value:
        if _URL_PASSWORD.search(value):
            return "a password in a URL (user:password@)"
        if _URL_QUERY_SECRET.search(value):
            return "a credential in a URL's query"
    if isinstance(key, str) and key.lower() in _USER_KEYS and ":" in value:
        return "a user name followed by ':' and a password"
    if isinstance(key, str) and key.lower() in _ADDRESS_KEYS and "@" in value and _BARE_USERINFO.match(value):
        return "a password in an address (user:password@)"
    if _PASSWORD_ARGUMENT.search(value):
        return "a password given as a command argument"
    return None


def looks_secret(path: Sequence[int | str], value: object) -> bool:
    """A field whose value must never be repeated in a message: a secret's name may be a secret written
    in the wrong place, and any value that one of the rules above calls a credential is one."""
    key = next((step for step in reversed(path) if isinstance(step, str)), "")
    lowered = key.lower()
    if lowered.endswith("_secret") or lowered in SECRET_KEYS or lowered in _USER_KEYS or "key" in lowered:
        return True
    if lowered == "generates":  # a procedure step's secret names: a value written there is a secret
        return True
    return isinstance(value, str) and secret_in_value(key, value) is not None


def find_literal_secrets(raw: Any, file: str) -> tuple[list[Diagnostic], set[Loc]]:
    """Credentials written as values. Returns the findings and their paths (so that the same key is not
    reported again as merely unknown)."""
    found: list[Diagnostic] = []
    paths: set[Loc] = set()
    # Iterative and allocation-light: this visits every value of every file on each load.
    stack: list[tuple[Any, Loc]] = [(raw, ())]
    while stack:
        container, loc = stack.pop()
        if isinstance(container, SourceMap):
            items: Iterator[tuple[Any, Any, int]] = (
                (key, value, container.key_lines.get(key, container.line)) for key, value in container.items()
            )
        else:
            items = ((index, value, container.item_lines[index]) for index, value in enumerate(container))
        for key, value, line in items:
            if isinstance(value, SourceMap | SourceList):
                stack.append((value, (*loc, key)))
            if isinstance(key, str) and (kind := secret_in_value(None, key)) is not None:
                # Written as a key: the field path must not name it either.
                paths.add((*loc, key))
                found.append(
                    Diagnostic(
                        file,
                        line,
                        format_path((*loc, "(a key)")),
                        f"{kind} is written in the inventory, as a key; remove it and rotate it, it must "
                        "be considered leaked",
                    )
                )
            elif isinstance(key, str) and key.lower() in SECRET_KEYS and value not in (None, ""):
                where = (*loc, key)
                paths.add(where)
                found.append(
                    Diagnostic(
                        file,
                        line,
                        format_path(where),
                        f"a literal secret in '{key}': the inventory refers to secrets by name only "
                        f"(for example '{key}_secret: NAME'); remove the value and rotate it, "
                        "it must be considered leaked",
                    )
                )
            elif isinstance(value, str) and (kind := secret_in_value(key, value)) is not None:
                where = (*loc, key)
                paths.add(where)
                if kind == "a private key":
                    advice = "refer to it by name ('key_secret: NAME')"
                elif "command" in kind:
                    advice = "let the command read it from a variable the run sets, never the inventory"
                else:
                    advice = "name the secret instead (credentials_secret, key_secret)"
                found.append(
                    Diagnostic(
                        file,
                        line,
                        format_path(where),
                        f"{kind} is written in the inventory: {advice}; remove it and rotate it, "
                        "it must be considered leaked",
                    )
                )
    return found, paths


def format_path(loc: Sequence[int | str]) -> str:
    parts: list[str] = []
    for step in loc:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(f".{step}" if parts else str(step))
    return "".join(parts)


def line_of(raw: Any, loc: Sequence[int | str], default: int = 1) -> tuple[int, Loc]:
    """The line of the deepest part of ``loc`` present in ``raw``, and the path actually found.

    Steps that are not in the data (the tag pydantic adds for a union member) are skipped.
    """
    line = getattr(raw, "line", default)
    node = raw
    found: list[int | str] = []
    for step in loc:
        if isinstance(node, SourceMap) and node.get("type") == step:
            continue  # the tag pydantic names a union member by, not a key (a check's 'command')
        if isinstance(node, SourceMap) and not isinstance(step, int) and step in node:
            line = node.key_lines.get(step, line)
            node = node[step]
        elif isinstance(node, SourceList) and isinstance(step, int) and 0 <= step < len(node):
            line = node.item_lines[step]
            node = node[step]
        else:
            continue
        found.append(step)
    return line, tuple(found)


def validation_diagnostics(
    exc: ValidationError,
    raw: Any,
    file: str,
    model: type[BaseModel],
    prefix: Loc = (),
    skip: set[Loc] | None = None,
) -> list[Diagnostic]:
    """Turn pydantic's errors into diagnostics, one per problem, with a "did you mean" for typos."""
    out: list[Diagnostic] = []
    errors = exc.errors(include_url=False)
    for error in errors:
        loc: Loc = tuple(error["loc"])
        if _explained_by_another_member(loc, error, errors):
            continue
        line, path = line_of(raw, loc)
        full = (*prefix, *path)
        if skip and full in skip:
            continue
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(path[-1]) if path else str(loc[-1])
            message = f"unknown key '{key}'"
            allowed = _fields_at(model, loc[:-1])
            suggestion = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if suggestion:
                message += f" (did you mean '{suggestion[0]}'?)"
            elif allowed:
                message += f" (allowed here: {', '.join(sorted(allowed))})"
        elif kind == "missing":
            message = f"missing required key '{loc[-1]}'"
            full = (*full, loc[-1])
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            given = error.get("input")
            if looks_secret(full, given) or (kind == "value_error" and isinstance(given, dict)):
                pass  # never repeat what may be a credential
            elif isinstance(given, str | int | float | bool) or given is None:
                message += f" (got {given!r})"
                if kind in ("float_type", "int_type") and isinstance(given, str) and _is_number(given):
                    # YAML 1.1 reads 1e3 (no dot) and quoted numbers as text.
                    message += "; this is text to YAML: write a plain number such as 1000 or 1.0e+3"
            elif isinstance(given, dict):
                message += " (got a mapping)"
            elif isinstance(given, list):
                message += " (got a list)"
        out.append(Diagnostic(file, line, format_path(full), message))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _explained_by_another_member(loc: Loc, error: Any, errors: Sequence[Any]) -> bool:
    """A mapping written where a union allows a string or a mapping (``depends_on: [{host: ...}]``):
    the mapping member's own errors say what is wrong; "should be a valid string" would only mislead."""
    if error["type"] != "string_type" or not isinstance(error.get("input"), dict) or not loc:
        return False
    parent = loc[:-1]
    return any(
        tuple(other["loc"])[: len(parent)] == parent
        and tuple(other["loc"])[len(parent) : len(loc)] != loc[-1:]
        for other in errors
        if other is not error
    )


def _fields_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys allowed in the mapping at ``loc``, by walking the model's annotations."""
    current: Any = model
    for step in loc:
        candidates = _models_in(current)
        if isinstance(step, int):
            current = _unwrap_container(current)
            continue
        chosen: Any = None
        for candidate in candidates:
            if step == candidate.__name__:  # pydantic names the union member it tried
                chosen = candidate
                break
            if step in candidate.model_fields:
                chosen = candidate.model_fields[step].annotation
                break
            tag = candidate.model_fields.get("type")
            if tag is not None and step in typing.get_args(tag.annotation):
                chosen = candidate
                break
        if chosen is None:
            return []
        current = chosen
    models = _models_in(current)
    return sorted({name for m in models for name in m.model_fields})


def _unwrap_container(annotation: Any) -> Any:
    for arg in _flatten(annotation):
        origin = typing.get_origin(arg)
        if origin in (list, tuple, set):
            return typing.get_args(arg)[0]
        if origin is dict:
            return typing.get_args(arg)[1]
    return annotation


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    for arg in _flatten(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            found.append(arg)
    return found


def _flatten(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flatten(typing.get_args(annotation)[0])
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _flatten(arg)]
    return [annotation]
