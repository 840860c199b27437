"""Secrets by name: the inventory names a secret, the driver asks for its value at run time.

Values live only in memory, wrapped in :class:`pydantic.SecretStr` so that a log line, an exception or
an artifact that formats one shows ``**********``. Sources: environment variables (the embedded default:
``RESTORE_SECRET_<NAME>``, with the name upper-cased and every character that is not a letter or digit
turned into ``_``) and Prefect Secret blocks (when a Prefect server is configured).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from restore_flows.errors import RestoreError

ENV_PREFIX = "RESTORE_SECRET_"


class SecretNotFound(RestoreError):
    """No source knows the secret. The message names the secret and where it was looked for, never a value."""


class Secrets(Protocol):
    def get(self, name: str) -> SecretStr: ...


def env_variable(name: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


@dataclass(frozen=True)
class EnvSecrets:
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def get(self, name: str) -> SecretStr:
        variable = env_variable(name)
        value = self.environ.get(variable)
        if value is None:
            raise SecretNotFound(f"secret {name!r} is not set (environment variable {variable})")
        return SecretStr(value)


@dataclass(frozen=True)
class PrefectSecrets:
    """Prefect Secret blocks; a block's name must be a slug, so the secret name is slugified."""

    load: Callable[[str], str] | None = None

    def get(self, name: str) -> SecretStr:
        slug = re.sub(r"[^a-z0-9-]", "-", name.lower())
        try:
            value = (self.load or _load_prefect_secret)(slug)
        except ValueError:  # Prefect raises ValueError for a missing block
            raise SecretNotFound(f"secret {name!r} is not a Prefect Secret block ({slug!r})") from None
        except Exception as exc:
            raise SecretNotFound(
                f"secret {name!r}: Prefect Secret block {slug!r} unreadable ({type(exc).__name__})"
            ) from None
        return SecretStr(value)


def _load_prefect_secret(slug: str) -> str:
    from prefect.blocks.system import Secret

    block: Secret[str] = Secret.load(slug, _sync=True)  # type: ignore[call-arg, assignment]
    value = block.get()
    if not isinstance(value, str):
        raise ValueError(f"Secret block {slug!r} does not hold a string")
    return value


@dataclass(frozen=True)
class ChainedSecrets:
    """The first source that knows the name wins."""

    sources: tuple[Secrets, ...]

    def get(self, name: str) -> SecretStr:
        misses: list[str] = []
        for source in self.sources:
            try:
                return source.get(name)
            except SecretNotFound as exc:
                misses.append(str(exc))
        raise SecretNotFound("; ".join(misses) or f"secret {name!r}: no secret source configured")


@dataclass(frozen=True)
class FakeSecrets:
    """Secrets for tests and rehearsals, given as a plain mapping."""

    values: Mapping[str, str]

    def get(self, name: str) -> SecretStr:
        if name not in self.values:
            raise SecretNotFound(f"secret {name!r} is not set (test secrets)")
        return SecretStr(self.values[name])


def split_credentials(name: str, secret: SecretStr) -> tuple[str, SecretStr]:
    """A credentials secret holds 'user:password' (the password may contain ':')."""
    user, sep, password = secret.get_secret_value().partition(":")
    if not sep or not user:
        raise SecretNotFound(f"secret {name!r} must hold 'user:password'")
    return user, SecretStr(password)


def secrets_from(sources: str) -> Secrets:
    """The chain named by ``Settings.secret_sources``, e.g. 'env,prefect'."""
    known: dict[str, Callable[[], Secrets]] = {"env": EnvSecrets, "prefect": PrefectSecrets}
    chain: list[Secrets] = []
    for name in (part.strip() for part in sources.split(",") if part.strip()):
        if name not in known:
            raise SecretNotFound(f"unknown secret source {name!r} (known: {', '.join(known)})")
        chain.append(known[name]())
    return ChainedSecrets(tuple(chain))
