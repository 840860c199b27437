"""Procedure steps on the real estate: a command on each target host over SSH, or one HTTP call, then
the step's check. The simulated fleet's stand-in is ``SimulatedFleet.run_step`` (drivers/fake.py).

Secrets generated for a step reach its command on standard input only, one ``NAME=value`` line each
(a PowerShell step reads them with ``[Console]::In.ReadToEnd()``, a POSIX one with ``read``): never on
its command line (visible in the host's process list and event logs), never in what this module
returns or raises. What the command prints may echo them: it is kept only as a digest, and any text
shown (an error) has every secret value replaced by ``[secret]``.

Whether a failure happened before the command could run matters: a step that never reached its
target may be tried again; one that may have run (a credential reset half done) waits for an operator.
"""

from __future__ import annotations

import hashlib
import secrets as random
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import httpx

from restore_flows.drivers.base import DriverError, ShellDriver, Verification
from restore_flows.drivers.checks import CheckRunner, clip, default_http_client, dialect_of
from restore_flows.drivers.commands import TemplateError, command_line, render
from restore_flows.errors import RestoreError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HttpCheck
from restore_flows.inventory.procedures import HttpAction, ProcedureStep, ShellAction

SECRET_LENGTH = 32
_ALPHABETS = (string.ascii_uppercase, string.ascii_lowercase, string.digits, "-_.~!%^*+=")


class StepError(RestoreError):
    """A procedure step did not succeed. ``started``: its command (or call) may have run."""

    def __init__(self, step: str, detail: str, *, started: bool) -> None:
        super().__init__(f"step {step}: {detail}")
        self.step = step
        self.detail = detail
        self.started = started


@dataclass(frozen=True, slots=True)
class StepOutput:
    output_sha256: str
    """Of everything the command(s) printed: kept instead of the output, which may hold secrets."""
    summary: str
    """For the step's log, in a few words (never any output)."""


class StepDriver(Protocol):
    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        """Run the step with its generated ``secrets`` (name -> value); raise :class:`StepError`."""
        ...


def generate_secret(length: int = SECRET_LENGTH) -> str:
    """A password any Windows complexity policy accepts: every character class, from the OS's CSPRNG."""
    every = "".join(_ALPHABETS)
    while True:
        value = "".join(random.choice(every) for _ in range(length))
        if all(any(c in alphabet for c in value) for alphabet in _ALPHABETS):
            return value


def fingerprint(value: str) -> str:
    """Enough to match the vault's copy later; nothing to recover the value from."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def stdin_of(secrets: Mapping[str, str]) -> str | None:
    return "".join(f"{name}={value}\n" for name, value in secrets.items()) or None


def scrub(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value:
            text = text.replace(value, "[secret]")
    return text


@dataclass
class LiveSteps:
    shell: ShellDriver
    hosts: Mapping[str, Host]
    checks: CheckRunner
    http_client_factory: Callable[[], httpx.Client] = field(default=default_http_client)

    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        values = list(secrets.values())
        if isinstance(step.action, ShellAction):
            digest, summary = self._shell(step, step.action, secrets)
        else:
            digest, summary = self._http(step, step.action, values)
        if step.check is not None:
            self._check(step, values)
            summary += "; check passed"
        return StepOutput(digest, summary)

    def _shell(self, step: ProcedureStep, action: ShellAction, secrets: Mapping[str, str]) -> tuple[str, str]:
        values = list(secrets.values())
        digest = hashlib.sha256()
        done: list[str] = []
        for name in action.hosts:
            host = self.hosts[name]
            dialect = dialect_of(host)
            params = {"host": host.name, "address": host.address or "", "step": step.name}
            try:
                line = command_line(render(action.command, dialect, params), dialect)
            except TemplateError as exc:
                raise StepError(step.name, f"{name}: {exc}", started=bool(done)) from exc
            try:
                result = self.shell.run(host, line, timeout=action.timeout, stdin=stdin_of(secrets))
            except DriverError as exc:
                # On an earlier host it ran: the step as a whole may have run.
                started = exc.command_sent or bool(done)
                raise StepError(step.name, f"{name}: {scrub(exc.detail, values)}", started=started) from None
            digest.update(f"{name}\0{result.exit_status}\0".encode())
            digest.update(result.stdout.encode() + b"\0" + result.stderr.encode() + b"\0")
            if result.exit_status != 0:
                said = clip(scrub(result.stderr or result.stdout, values))
                raise StepError(
                    step.name,
                    f"{name}: exit {result.exit_status}" + (f": {said}" if said else ""),
                    started=True,
                )
            done.append(name)
        return digest.hexdigest(), f"ran on {', '.join(done)}"

    def _http(self, step: ProcedureStep, action: HttpAction, values: list[str]) -> tuple[str, str]:
        try:
            with self.http_client_factory() as client:
                response = client.request(
                    action.method, action.url, content=action.body, timeout=action.timeout
                )
                body = response.text
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise StepError(
                step.name,
                f"{action.method} {action.url}: cannot connect ({type(exc).__name__})",
                started=False,
            ) from None
        except httpx.HTTPError as exc:
            raise StepError(
                step.name, f"{action.method} {action.url} failed ({type(exc).__name__})", started=True
            ) from None
        digest = hashlib.sha256(f"{response.status_code}\0".encode() + body.encode()).hexdigest()
        if response.status_code != action.status:
            said = clip(scrub(body, values))
            raise StepError(
                step.name,
                f"{action.method} {action.url} answered {response.status_code}, expected {action.status}"
                + (f": {said}" if said else ""),
                started=True,
            )
        return digest, f"{action.method} {action.url} answered {response.status_code}"

    def _check(self, step: ProcedureStep, values: list[str]) -> None:
        assert step.check is not None
        targets = step.target_hosts
        if not targets:
            verdict = self._url_check(step)
            if verdict is not None:
                raise StepError(step.name, f"check failed: {scrub(verdict, values)}", started=True)
            return
        for name in targets:
            found: Verification = self.checks.verify(replace(self.hosts[name], checks=(step.check,)))
            if not found.clean:
                problems = "; ".join((*found.failures, *found.ioc_findings))
                raise StepError(step.name, f"check failed on {name}: {scrub(problems, values)}", started=True)

    def _url_check(self, step: ProcedureStep) -> str | None:
        check = step.check
        if not isinstance(check, HttpCheck):
            return (
                f"a {check.type if check else '?'} check needs a host: only http checks go with an http step"
            )
        try:
            with self.http_client_factory() as client:
                response = client.get(check.url, timeout=check.timeout)
        except httpx.HTTPError as exc:
            return f"GET {check.url} failed ({type(exc).__name__})"
        if response.status_code != check.status:
            return f"GET {check.url}: status {response.status_code}, expected {check.status}"
        return None
