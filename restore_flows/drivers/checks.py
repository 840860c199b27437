"""The verify stage: run every check the inventory declares for a host and gather one verdict.

As pyinfra's facts, a check is a command plus a pure parser of its result: :func:`plan_shell_check` decides
what to send and how to read the answer (``read_*``), and :meth:`CheckRunner.verify` only executes.

What each check type needs to pass:

* ``command``: exit status ``expect_exit`` and, if set, ``output_pattern`` found in stdout (``re.search``).
* ``windows_service``, ``edr_agent``: stdout is the running state in the host's shell language, 'Running'
  (``Get-Service``) or 'active' (``systemctl is-active``). A custom command must print the same.
* ``golden_image``: stdout, stripped, is the host's ``golden_image``.
* ``ioc_scan``: exit 0, and every non-empty stdout line is a *finding* (the host goes to quarantine), not a
  failure; another exit status is a failure, since a scan that did not run proves nothing.
* ``tcp_port``: a TCP connection to the host's address opens within the timeout.
* ``http``: a GET answers with ``status`` and, if set, ``body_pattern`` is found in the body.

A failure never stops the run: every check runs, so that one report shows all that is wrong with a host.
The one exception is a non-retryable shell error (host key refused, login refused, no SSH settings): the
host's remaining shell checks are then not sent, because each would fail the same way and repeated
refused logins can lock the account or raise the intrusion alarms of a hospital under attack.

Whatever a host prints is untrusted (the host may still be compromised): it reaches reports only
clipped to :data:`OUTPUT_LIMIT` characters, on one line, without control characters.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Final

import httpx

from restore_flows.drivers.base import CommandResult, DriverError, ShellDriver, Verification
from restore_flows.drivers.commands import Dialect, TemplateError, command_line, render
from restore_flows.errors import RestoreError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import (
    Check,
    CommandCheck,
    EdrAgentCheck,
    GoldenImageCheck,
    HttpCheck,
    IocScanCheck,
    TcpPortCheck,
    WindowsServiceCheck,
)

ShellCheck = CommandCheck | WindowsServiceCheck | GoldenImageCheck | EdrAgentCheck | IocScanCheck
TcpConnect = Callable[[tuple[str, int], float], socket.socket]

OUTPUT_LIMIT: Final = 200
"""Characters of a host's output kept in a failure or finding: enough to recognise the error."""
MAX_FINDINGS: Final = 100
"""Findings kept per scan; one host is quarantined by the first as surely as by the thousandth."""
MAX_BODY: Final = 1024 * 1024
"""Bytes of an HTTP body read for ``body_pattern``: a service that streams without end cannot hang the check
(httpx's timeout bounds each read, not the whole body)."""

NO_CHECKS: Final = "no checks in the inventory: nothing shows that the host is clean"

# --- Default commands, per check type and shell language (used when a check has no ``command``) ---

DEFAULT_COMMANDS: Final[Mapping[tuple[str, Dialect], str]] = {
    # The Service Control Manager's own view of the service. -ErrorAction Stop: "no such service" ends
    # the script with exit 1 and the error, instead of depending on how powershell.exe reports a
    # non-terminating one.
    ("windows_service", Dialect.POWERSHELL): "(Get-Service -Name {service} -ErrorAction Stop).Status",
    # Our Linux appliances run systemd; is-active prints the unit's state (active, inactive, failed...).
    ("windows_service", Dialect.POSIX): "systemctl is-active {service}",
    # An EDR agent is a service like any other (Defender for Endpoint: 'Sense'). On a POSIX host the
    # inventory must name the agent's unit (Defender for Linux: 'mdatp'), 'Sense' does not exist there.
    ("edr_agent", Dialect.POWERSHELL): "(Get-Service -Name {service} -ErrorAction Stop).Status",
    ("edr_agent", Dialect.POSIX): "systemctl is-active {service}",
    # Where the golden image records its id (the image build must write it there): a host restored from
    # anything else lacks it (exit 1) or names another image.
    ("golden_image", Dialect.POWERSHELL): (
        r"(Get-ItemProperty -Path 'HKLM:\SOFTWARE\RestoreOrchestrator' -Name ImageId -ErrorAction Stop)"
        ".ImageId"
    ),
    ("golden_image", Dialect.POSIX): "cat /etc/restore-orchestrator/image-id",
    # Microsoft Defender's detections, one threat id per line; sites with another scanner set their own
    # command. -ErrorAction Stop: a failing cmdlet (Defender off or broken) then exits 1; a non-terminating
    # error could print nothing and still exit 0, which would read as "nothing found".
    ("ioc_scan", Dialect.POWERSHELL): (
        "Get-MpThreatDetection -ErrorAction Stop | ForEach-Object { $_.ThreatID }"
    ),
    # No POSIX default for ioc_scan: there is no scanner every Linux appliance has. A missing entry
    # fails the check rather than passing a host nobody scanned.
}

RUNNING: Final[Mapping[Dialect, str]] = {
    Dialect.POWERSHELL: "Running",  # System.ServiceProcess.ServiceControllerStatus.Running
    Dialect.POSIX: "active",
}
"""What a service check's command prints when the service runs."""


DIALECT_NAMES: Final[Mapping[Dialect, str]] = {Dialect.POWERSHELL: "PowerShell", Dialect.POSIX: "POSIX"}


class CheckNotRunnable(RestoreError):
    """The check cannot be run as the inventory gives it; the message is the check's failure."""


# --- Outcomes and the pure parsers of command results ---


@dataclass(frozen=True, slots=True)
class Outcome:
    failure: str | None = None
    findings: tuple[str, ...] = ()


PASSED: Final = Outcome()


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """``text`` on one line, no longer than ``limit``, with anything unprintable (terminal escapes from a
    hostile host) replaced by '?'."""
    flat = " ".join(text.split())
    safe = "".join(char if char.isprintable() else "?" for char in flat)
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"


def _exit_detail(result: CommandResult) -> str:
    said = clip(result.stderr) or clip(result.stdout)
    return f"exit {result.exit_status}: {said}" if said else f"exit {result.exit_status}"


def read_state(result: CommandResult, expected: str) -> Outcome:
    """A service check: stdout must be ``expected`` and the command must succeed."""
    state = result.stdout.strip()
    if result.exit_status == 0 and state == expected:
        return PASSED
    if state:
        # systemctl is-active exits 3 with "inactive": the state says more than the status.
        status = f" (exit {result.exit_status})" if result.exit_status else ""
        return Outcome(f"{clip(state)}, expected {expected}{status}")
    return Outcome(f"{_exit_detail(result)}; expected {expected}")


def read_image(result: CommandResult, expected: str) -> Outcome:
    if result.exit_status != 0:
        return Outcome(f"cannot read the image id: {_exit_detail(result)}")
    reported = result.stdout.strip()
    if reported != expected:
        return Outcome(f"host reports image {clip(reported)!r}, expected {expected!r}")
    return PASSED


def read_command(result: CommandResult, expect_exit: int, pattern: re.Pattern[str] | None) -> Outcome:
    if result.exit_status != expect_exit:
        return Outcome(f"{_exit_detail(result)}; expected exit {expect_exit}")
    if pattern is not None and not pattern.search(result.stdout):
        return Outcome(f"stdout does not match {pattern.pattern!r}: {clip(result.stdout)!r}")
    return PASSED


def read_ioc_scan(result: CommandResult) -> Outcome:
    """Exit 0: each distinct non-empty line is a finding. Another exit status: the scan failed."""
    if result.exit_status != 0:
        return Outcome(f"the scan failed: {_exit_detail(result)}")
    lines = list(dict.fromkeys(clip(line) for line in result.stdout.splitlines() if line.strip()))
    findings = [f"ioc_scan: {line}" for line in lines[:MAX_FINDINGS]]
    if len(lines) > MAX_FINDINGS:
        findings.append(f"ioc_scan: ... and {len(lines) - MAX_FINDINGS} more")
    return Outcome(findings=tuple(findings))


# --- Planning: what to send for a shell check, decided from the inventory alone ---


@dataclass(frozen=True, slots=True)
class ShellPlan:
    command: str
    """The command line to send, rendered and wrapped for the host's shell."""
    timeout: float
    read: Callable[[CommandResult], Outcome]


def dialect_of(host: Host) -> Dialect:
    # Without SSH settings the host is taken for what most of the estate is: Windows. (The shell driver
    # then refuses to connect anyway, and says why.)
    return Dialect(host.ssh.shell) if host.ssh is not None else Dialect.POWERSHELL


def template_params(host: Host, check: Check) -> dict[str, object]:
    """What a template may name: the check's own fields, ``host``, ``image`` and ``address``.

    ``address`` is left out when the host has none, so that a template using it fails by name instead
    of running with an empty string.
    """
    params: dict[str, object] = {
        name: value
        for name, value in check.model_dump(exclude={"type", "command"}).items()
        if value is not None
    }
    params["host"] = host.name
    params["image"] = host.golden_image or ""
    if host.address:
        params["address"] = host.address
    return params


def _compile(pattern: str | None, field: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckNotRunnable(f"invalid {field} {pattern!r}: {exc}") from exc


def plan_shell_check(host: Host, check: ShellCheck) -> ShellPlan:
    """Raises :class:`CheckNotRunnable` when the inventory does not give enough to run the check."""
    dialect = dialect_of(host)
    read: Callable[[CommandResult], Outcome]
    if isinstance(check, CommandCheck):
        read = partial(
            read_command,
            expect_exit=check.expect_exit,
            pattern=_compile(check.output_pattern, "output_pattern"),
        )
    elif isinstance(check, WindowsServiceCheck | EdrAgentCheck):
        read = partial(read_state, expected=RUNNING[dialect])
    elif isinstance(check, GoldenImageCheck):
        if not host.golden_image:
            raise CheckNotRunnable("no golden_image in the inventory")
        read = partial(read_image, expected=host.golden_image)
    else:
        read = read_ioc_scan
    template = check.command if check.command is not None else DEFAULT_COMMANDS.get((check.type, dialect))
    if template is None:
        what = "IOC scan command" if isinstance(check, IocScanCheck) else f"default {check.type} command"
        raise CheckNotRunnable(f"no {what} for a {DIALECT_NAMES[dialect]} host; set the check's command")
    try:
        script = render(template, dialect, template_params(host, check))
    except TemplateError as exc:
        raise CheckNotRunnable(str(exc)) from exc
    return ShellPlan(command_line(script, dialect), check.timeout, read)


# --- Network checks: run from here, not on the host ---


def _url_host(address: str) -> str:
    # An IPv6 literal must be bracketed in a URL (RFC 3986) and in "address:port".
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return f"[{address}]" if ip.version == 6 else address


def check_url(check: HttpCheck, host: Host) -> str | None:
    """The URL to GET, or None when it needs the host's address and the host has none.

    A plain replacement, not :func:`render`: a URL is not shell, and shell quotes would break it.
    """
    if "{address}" not in check.url:
        return check.url
    if not host.address:
        return None
    return check.url.replace("{address}", _url_host(host.address))


def check_label(check: Check, host: Host) -> str:
    """How a report names the check: its type and what it is about."""
    if isinstance(check, CommandCheck):
        return f"command {clip(check.command, 80)!r}"
    if isinstance(check, WindowsServiceCheck | EdrAgentCheck):
        return f"{check.type} {check.service}"
    if isinstance(check, TcpPortCheck):
        return f"tcp_port {check.port}"
    if isinstance(check, HttpCheck):
        return f"http {check_url(check, host) or check.url}"
    return check.type


DEFAULT_HTTP_TIMEOUT: Final = httpx.Timeout(10.0)
"""Only for a client used outside :class:`CheckRunner`: each check passes its own ``timeout``."""


def default_http_client(ca_bundle: str | None = None) -> httpx.Client:
    """A client that checks certificates against the system store (where a hospital installs its
    internal CA) or ``ca_bundle``; httpx's own default would trust certifi's public CAs only."""
    verify = ssl.create_default_context(cafile=ca_bundle)
    # trust_env=False: a proxy from the worker's environment must not carry quarantine-VLAN traffic, and
    # no .netrc credentials are added. No redirects: the status checked is the URL's own.
    return httpx.Client(verify=verify, timeout=DEFAULT_HTTP_TIMEOUT, trust_env=False, follow_redirects=False)


@dataclass(frozen=True)
class CheckRunner:
    """Runs the checks of one host at a time, in inventory order; safe to call from several threads (the
    caller runs hosts in parallel), since nothing is kept between calls."""

    shell: ShellDriver
    http_client_factory: Callable[[], httpx.Client] = default_http_client
    """Called once per :meth:`verify` that has an HTTP check; the client is closed when it ends. A fresh
    client per host costs one TLS context, and a host's address is never another's, so a shared
    connection pool would save nothing."""
    tcp_connect: TcpConnect = socket.create_connection

    def verify(self, host: Host) -> Verification:
        if not host.checks:
            return Verification(failures=(NO_CHECKS,), retryable=False)
        failures: list[str] = []
        findings: list[str] = []
        shell_down: str | None = None
        with ExitStack() as stack:
            http: httpx.Client | None = None
            for check in host.checks:
                if isinstance(check, TcpPortCheck):
                    outcome = self._tcp(host, check)
                elif isinstance(check, HttpCheck):
                    if http is None:
                        http = stack.enter_context(self.http_client_factory())
                    outcome = self._http(host, check, http)
                elif shell_down is not None:
                    outcome = Outcome(f"not run, the shell failed before: {shell_down}")
                else:
                    outcome, error = self._shell(host, check)
                    if error is not None and not error.retryable:
                        shell_down = error.detail
                if outcome.failure is not None:
                    failures.append(f"{check_label(check, host)}: {outcome.failure}")
                findings.extend(outcome.findings)
        return Verification(
            failures=tuple(failures), ioc_findings=tuple(findings), retryable=shell_down is None
        )

    def _shell(self, host: Host, check: ShellCheck) -> tuple[Outcome, DriverError | None]:
        try:
            plan = plan_shell_check(host, check)
        except CheckNotRunnable as exc:
            return Outcome(str(exc)), None
        try:
            result = self.shell.run(host, plan.command, timeout=plan.timeout)
        except DriverError as exc:
            return Outcome(exc.detail), exc
        return plan.read(result), None

    def _tcp(self, host: Host, check: TcpPortCheck) -> Outcome:
        if not host.address:
            return Outcome("no address in the inventory")
        where = f"{_url_host(host.address)}:{check.port}"
        try:
            with self.tcp_connect((host.address, check.port), check.timeout):
                pass
        except TimeoutError:
            return Outcome(f"no answer from {where} within {check.timeout:g} s")
        except OSError as exc:
            return Outcome(
                f"cannot connect to {where}: {type(exc).__name__}: {clip(exc.strerror or str(exc))}"
            )
        return PASSED

    def _http(self, host: Host, check: HttpCheck, client: httpx.Client) -> Outcome:
        url = check_url(check, host)
        if url is None:
            return Outcome("the URL needs the host's address and there is no address in the inventory")
        try:
            pattern = _compile(check.body_pattern, "body_pattern")
        except CheckNotRunnable as exc:
            return Outcome(str(exc))
        try:
            with client.stream("GET", url, timeout=check.timeout) as response:
                if response.status_code != check.status:
                    return Outcome(f"status {response.status_code}, expected {check.status}")
                body = _read_body(response) if pattern is not None else ""
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return Outcome(f"GET failed: {type(exc).__name__}: {clip(str(exc))}")
        if pattern is not None and not pattern.search(body):
            return Outcome(f"body does not match {pattern.pattern!r}: {clip(body)!r}")
        return PASSED


def _read_body(response: httpx.Response) -> str:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= MAX_BODY:
            break
    try:
        return bytes(data[:MAX_BODY]).decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return bytes(data[:MAX_BODY]).decode("utf-8", errors="replace")
