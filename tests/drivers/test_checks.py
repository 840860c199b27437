"""The verify stage's checks: shell checks against FakeShell, TCP and HTTP against real loopback servers."""

from __future__ import annotations

import base64
import http.server
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import httpx
import pytest

from restore_flows.drivers.base import CommandResult, DriverError, DriverTimeout
from restore_flows.drivers.checks import (
    MAX_FINDINGS,
    NO_CHECKS,
    OUTPUT_LIMIT,
    CheckRunner,
    clip,
    default_http_client,
    read_ioc_scan,
)
from restore_flows.drivers.fake import FakeShell
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import (
    Check,
    CommandCheck,
    EdrAgentCheck,
    GoldenImageCheck,
    HostKind,
    HttpCheck,
    IocScanCheck,
    RestoreMethod,
    Ssh,
    Stage,
    TcpPortCheck,
    WindowsServiceCheck,
)
from restore_flows.inventory.yamlsource import Location
from tests.peers.sushy import TlsFiles, make_tls

ENCODED_PREFIX = "powershell.exe -NoLogo -NoProfile -NonInteractive -EncodedCommand "
IMAGE = "win11-ltsc-2025.06"
Responder = Callable[[Host, str], CommandResult | None]


def _host(
    *checks: Check,
    shell: str | None = "powershell",
    address: str | None = "127.0.0.1",
    image: str | None = IMAGE,
) -> Host:
    return Host(
        name="ws-icu-001",
        kind=HostKind.WORKSTATION,
        site="arl",
        role="workstation",
        department="icu",
        services=("ehr",),
        depends_on=(),
        pools={},
        restore_method=RestoreMethod.REIMAGE,
        forensic_hold=False,
        location=Location("hosts.yaml", 1),
        golden_image=image,
        address=address,
        ssh=Ssh.model_validate({"shell": shell}) if shell is not None else None,
        checks=checks,
    )


def script_of(command: str) -> str:
    """The script a command line runs: PowerShell's -EncodedCommand decoded, a POSIX line as it is."""
    if command.startswith(ENCODED_PREFIX):
        return base64.b64decode(command.removeprefix(ENCODED_PREFIX)).decode("utf-16-le")
    return command


def on(script: str, exit_status: int = 0, stdout: str = "", stderr: str = "") -> Responder:
    """Answer the command whose decoded script is exactly ``script``."""

    def respond(host: Host, command: str) -> CommandResult | None:
        if script_of(command) == script:
            return CommandResult(exit_status, stdout, stderr)
        return None

    return respond


def raising(script: str, error: DriverError) -> Responder:
    def respond(host: Host, command: str) -> CommandResult | None:
        if script_of(command) == script:
            raise error
        return None

    return respond


def sent(shell: FakeShell) -> list[str]:
    return [script_of(command) for _, command in shell.commands]


PS_SERVICE = "(Get-Service -Name '{}' -ErrorAction Stop).Status"
PS_IMAGE = (
    r"(Get-ItemProperty -Path 'HKLM:\SOFTWARE\RestoreOrchestrator' -Name ImageId -ErrorAction Stop).ImageId"
)
PS_SCAN = "Get-MpThreatDetection -ErrorAction Stop | ForEach-Object { $_.ThreatID }"


def _verify(host: Host, *responders: Responder) -> tuple[tuple[str, ...], tuple[str, ...], FakeShell]:
    shell = FakeShell(responders=list(responders))
    result = CheckRunner(shell).verify(host)
    assert result.clean == (not result.failures and not result.ioc_findings)
    return result.failures, result.ioc_findings, shell


# --- Service and EDR checks ---


def test_powershell_service_check_is_sent_encoded_with_the_name_quoted() -> None:
    host = _host(WindowsServiceCheck(type="windows_service", service="Spooler"))
    failures, findings, shell = _verify(host, on(PS_SERVICE.format("Spooler"), stdout="Running\r\n"))
    assert (failures, findings) == ((), ())
    [(name, command)] = shell.commands
    assert name == "ws-icu-001"
    assert command.startswith(ENCODED_PREFIX)
    assert script_of(command) == "(Get-Service -Name 'Spooler' -ErrorAction Stop).Status"


def test_a_stopped_service_fails_with_its_state() -> None:
    host = _host(WindowsServiceCheck(type="windows_service", service="Spooler"))
    failures, _, _ = _verify(host, on(PS_SERVICE.format("Spooler"), stdout="Stopped\r\n"))
    assert failures == ("windows_service Spooler: Stopped, expected Running",)


def test_a_missing_service_fails_with_the_error() -> None:
    host = _host(WindowsServiceCheck(type="windows_service", service="EhrAgent"))
    error = "Get-Service : Cannot find any service with service name 'EhrAgent'.\r\n    + CategoryInfo ..."
    failures, _, _ = _verify(host, on(PS_SERVICE.format("EhrAgent"), exit_status=1, stderr=error))
    assert failures == (
        "windows_service EhrAgent: exit 1: Get-Service : Cannot find any service with service name "
        "'EhrAgent'. + CategoryInfo ...; expected Running",
    )


def test_a_hostile_service_name_stays_one_literal() -> None:
    name = "x'; Stop-Computer; '"
    host = _host(WindowsServiceCheck(type="windows_service", service=name))
    _, _, shell = _verify(host)
    assert sent(shell) == ["(Get-Service -Name 'x''; Stop-Computer; ''' -ErrorAction Stop).Status"]

    posix = _host(WindowsServiceCheck(type="windows_service", service="x; rm -rf /"), shell="posix")
    _, _, shell = _verify(posix)
    assert sent(shell) == ["systemctl is-active 'x; rm -rf /'"]


def test_posix_service_check_uses_systemd_and_plain_command_line() -> None:
    host = _host(WindowsServiceCheck(type="windows_service", service="nginx"), shell="posix")
    failures, _, shell = _verify(host, on("systemctl is-active nginx", stdout="active\n"))
    assert failures == ()
    assert [command for _, command in shell.commands] == ["systemctl is-active nginx"]

    failures, _, _ = _verify(host, on("systemctl is-active nginx", exit_status=3, stdout="inactive\n"))
    assert failures == ("windows_service nginx: inactive, expected active (exit 3)",)


def test_edr_agent_checks_the_sense_service_by_default() -> None:
    host = _host(EdrAgentCheck(type="edr_agent"))
    failures, _, shell = _verify(host, on(PS_SERVICE.format("Sense"), stdout="Running"))
    assert failures == ()
    assert sent(shell) == ["(Get-Service -Name 'Sense' -ErrorAction Stop).Status"]

    failures, _, _ = _verify(host, on(PS_SERVICE.format("Sense"), stdout="StartPending"))
    assert failures == ("edr_agent Sense: StartPending, expected Running",)


def test_a_custom_service_command_is_rendered_with_the_check_fields() -> None:
    check = WindowsServiceCheck(
        type="windows_service", service="ehr", command="sc.exe-state {service} {host}"
    )
    failures, _, shell = _verify(_host(check), on("sc.exe-state 'ehr' 'ws-icu-001'", stdout="Running"))
    assert failures == ()
    assert shell.commands[0][1].startswith(ENCODED_PREFIX)


# --- Golden image ---


def test_golden_image_must_match_the_inventory() -> None:
    host = _host(GoldenImageCheck(type="golden_image"))
    failures, _, shell = _verify(host, on(PS_IMAGE, stdout=f"{IMAGE}\r\n"))
    assert failures == ()
    assert sent(shell) == [PS_IMAGE]

    failures, _, _ = _verify(host, on(PS_IMAGE, stdout="win10-old\r\n"))
    assert failures == (f"golden_image: host reports image 'win10-old', expected '{IMAGE}'",)

    failures, _, _ = _verify(host, on(PS_IMAGE, exit_status=1, stderr="Property ImageId does not exist"))
    assert failures == ("golden_image: cannot read the image id: exit 1: Property ImageId does not exist",)


def test_golden_image_on_posix_reads_the_id_file() -> None:
    host = _host(GoldenImageCheck(type="golden_image"), shell="posix")
    failures, _, shell = _verify(host, on("cat /etc/restore-orchestrator/image-id", stdout=IMAGE + "\n"))
    assert failures == ()
    assert sent(shell) == ["cat /etc/restore-orchestrator/image-id"]


def test_golden_image_without_an_image_in_the_inventory_fails_without_asking() -> None:
    host = _host(GoldenImageCheck(type="golden_image"), image=None)
    failures, _, shell = _verify(host, on(PS_IMAGE, stdout=""))
    assert failures == ("golden_image: no golden_image in the inventory",)
    assert shell.commands == []


# --- Command checks ---


def test_command_check_compares_exit_status_and_output() -> None:
    check = CommandCheck(type="command", command="Test-Image {image} {host}", output_pattern=r"^OK\b")
    script = f"Test-Image '{IMAGE}' 'ws-icu-001'"
    assert _verify(_host(check), on(script, stdout="OK all good"))[0] == ()

    failures, _, _ = _verify(_host(check), on(script, stdout="NOT OK"))
    assert failures == ("command 'Test-Image {image} {host}': stdout does not match '^OK\\\\b': 'NOT OK'",)

    failures, _, _ = _verify(_host(check), on(script, exit_status=2, stderr="boom"))
    assert failures == ("command 'Test-Image {image} {host}': exit 2: boom; expected exit 0",)


def test_command_check_expecting_a_nonzero_exit() -> None:
    check = CommandCheck(type="command", command="test -e /etc/compromised", expect_exit=1)
    host = _host(check, shell="posix")
    assert _verify(host, on("test -e /etc/compromised", exit_status=1))[0] == ()
    failures, _, _ = _verify(host, on("test -e /etc/compromised", exit_status=0))
    assert failures == ("command 'test -e /etc/compromised': exit 0; expected exit 1",)


def test_a_template_naming_a_missing_address_fails_without_running() -> None:
    check = CommandCheck(type="command", command="ping {address}")
    failures, _, shell = _verify(_host(check, address=None))
    assert len(failures) == 1
    assert failures[0].startswith("command 'ping {address}': template 'ping {address}' uses {address}")
    assert shell.commands == []


def test_an_invalid_output_pattern_fails_the_check() -> None:
    # The inventory refuses such a pattern; the driver must still not trust that it was loaded from one.
    check = CommandCheck.model_construct(
        type="command", command="hostname", output_pattern="(", expect_exit=0, timeout=60
    )
    failures, _, shell = _verify(_host(check))
    assert len(failures) == 1
    assert failures[0].startswith("command 'hostname': invalid output_pattern '('")
    assert shell.commands == []


# --- IOC scan ---


def test_ioc_findings_are_findings_not_failures() -> None:
    host = _host(IocScanCheck(type="ioc_scan"))
    scan = on(PS_SCAN, stdout="2147735505\r\n\r\n2147519003\r\n2147735505\r\n")
    failures, findings, shell = _verify(host, scan)
    assert failures == ()
    assert findings == ("ioc_scan: 2147735505", "ioc_scan: 2147519003")
    assert shell.commands[0][1].startswith(ENCODED_PREFIX)
    assert sent(shell) == [PS_SCAN]


def test_an_empty_scan_is_clean() -> None:
    shell = FakeShell(responders=[on(PS_SCAN, stdout="\r\n")])
    assert CheckRunner(shell).verify(_host(IocScanCheck(type="ioc_scan"))).clean


def test_a_scan_that_fails_is_a_failure_not_a_finding() -> None:
    host = _host(IocScanCheck(type="ioc_scan"))
    failures, findings, _ = _verify(host, on(PS_SCAN, exit_status=2, stdout="partial", stderr="0x800106ba"))
    assert findings == ()
    assert failures == ("ioc_scan: the scan failed: exit 2: 0x800106ba",)


def test_a_posix_host_needs_its_own_scan_command() -> None:
    failures, findings, shell = _verify(_host(IocScanCheck(type="ioc_scan"), shell="posix"))
    assert failures == ("ioc_scan: no IOC scan command for a POSIX host; set the check's command",)
    assert (findings, shell.commands) == ((), [])

    custom = _host(IocScanCheck(type="ioc_scan", command="yara-scan {host}"), shell="posix")
    failures, findings, _ = _verify(custom, on("yara-scan ws-icu-001", stdout="Cobalt_Strike beacon.dll\n"))
    assert (failures, findings) == ((), ("ioc_scan: Cobalt_Strike beacon.dll",))


def test_findings_are_bounded_and_sanitised() -> None:
    lines = "\n".join(f"threat-{i}" for i in range(MAX_FINDINGS + 5))
    findings = read_ioc_scan(CommandResult(0, lines, "")).findings
    assert len(findings) == MAX_FINDINGS + 1
    assert findings[-1] == "ioc_scan: ... and 5 more"

    [hostile] = read_ioc_scan(CommandResult(0, "\x1b[2Jevil " + "A" * 500, "")).findings
    assert "\x1b" not in hostile
    assert len(hostile) == len("ioc_scan: ") + OUTPUT_LIMIT


def test_clip_bounds_output_to_one_printable_line() -> None:
    assert clip("a\r\n  b\tc") == "a b c"
    assert clip("x" * 1000) == "x" * (OUTPUT_LIMIT - 1) + "…"
    assert clip("\x1b]0;title\x07ok") == "?]0;title?ok"


# --- Running every check, whatever fails ---


def test_every_check_runs_and_every_failure_is_reported() -> None:
    host = _host(
        WindowsServiceCheck(type="windows_service", service="Spooler"),
        GoldenImageCheck(type="golden_image"),
        EdrAgentCheck(type="edr_agent"),
        IocScanCheck(type="ioc_scan"),
    )
    failures, findings, shell = _verify(
        host,
        on(PS_SERVICE.format("Spooler"), stdout="Stopped"),
        on(PS_IMAGE, stdout="other"),
        on(PS_SERVICE.format("Sense"), stdout="Running"),
        on(PS_SCAN, stdout="42"),
    )
    assert failures == (
        "windows_service Spooler: Stopped, expected Running",
        f"golden_image: host reports image 'other', expected '{IMAGE}'",
    )
    assert findings == ("ioc_scan: 42",)
    assert len(shell.commands) == 4


def test_a_shell_timeout_fails_only_that_check() -> None:
    host = _host(
        WindowsServiceCheck(type="windows_service", service="Spooler"),
        IocScanCheck(type="ioc_scan"),
        EdrAgentCheck(type="edr_agent"),
    )
    timeout = DriverTimeout("ws-icu-001", Stage.VERIFY, "command timed out after 900 s")
    failures, findings, shell = _verify(
        host,
        on(PS_SERVICE.format("Spooler"), stdout="Running"),
        raising(PS_SCAN, timeout),
        on(PS_SERVICE.format("Sense"), stdout="Running"),
    )
    assert failures == ("ioc_scan: command timed out after 900 s",)
    assert findings == ()
    assert len(shell.commands) == 3


def test_a_refused_login_stops_further_shell_checks_but_not_network_ones(tcp_listener: int) -> None:
    host = _host(
        WindowsServiceCheck(type="windows_service", service="Spooler"),
        TcpPortCheck(type="tcp_port", port=tcp_listener),
        EdrAgentCheck(type="edr_agent"),
    )
    refused = DriverError("ws-icu-001", Stage.VERIFY, "login as 'svc' refused", retryable=False)
    failures, _, shell = _verify(host, raising(PS_SERVICE.format("Spooler"), refused))
    assert failures == (
        "windows_service Spooler: login as 'svc' refused",
        "edr_agent Sense: not run, the shell failed before: login as 'svc' refused",
    )
    assert len(shell.commands) == 1
    # Checking again cannot help until someone fixes the key: the verdict says so.
    assert (
        not CheckRunner(FakeShell(responders=[raising(PS_SERVICE.format("Spooler"), refused)]))
        .verify(host)
        .retryable
    )


def test_a_timed_out_check_may_pass_when_checked_again() -> None:
    host = _host(WindowsServiceCheck(type="windows_service", service="Spooler"))
    slow = DriverTimeout("ws-icu-001", Stage.VERIFY, "command did not finish within 30 s")
    report = CheckRunner(FakeShell(responders=[raising(PS_SERVICE.format("Spooler"), slow)])).verify(host)
    assert report.failures == ("windows_service Spooler: command did not finish within 30 s",)
    assert report.retryable


def test_a_host_without_checks_is_not_clean() -> None:
    failures, findings, shell = _verify(_host())
    assert (failures, findings, shell.commands) == ((NO_CHECKS,), (), [])
    assert not CheckRunner(FakeShell()).verify(_host()).retryable


# --- TCP: a real listening socket on loopback ---


@pytest.fixture
def tcp_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel completes them from the backlog)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def test_tcp_port_open_passes(tcp_listener: int) -> None:
    shell = FakeShell()
    assert CheckRunner(shell).verify(_host(TcpPortCheck(type="tcp_port", port=tcp_listener))).clean
    assert shell.commands == []  # a network check runs from here, not on the host


def test_tcp_port_closed_fails(closed_port: int) -> None:
    failures, _, _ = _verify(_host(TcpPortCheck(type="tcp_port", port=closed_port)))
    assert failures == (
        f"tcp_port {closed_port}: cannot connect to 127.0.0.1:{closed_port}: "
        "ConnectionRefusedError: Connection refused",
    )


def test_tcp_port_timeout_and_missing_address() -> None:
    calls: list[tuple[tuple[str, int], float]] = []

    def silent(address: tuple[str, int], timeout: float) -> socket.socket:
        calls.append((address, timeout))
        raise TimeoutError("timed out")

    host = _host(TcpPortCheck(type="tcp_port", port=3389, timeout=2.5))
    result = CheckRunner(FakeShell(), tcp_connect=silent).verify(host)
    assert result.failures == ("tcp_port 3389: no answer from 127.0.0.1:3389 within 2.5 s",)
    assert calls == [(("127.0.0.1", 3389), 2.5)]

    no_address = _host(TcpPortCheck(type="tcp_port", port=3389), address=None)
    result = CheckRunner(FakeShell(), tcp_connect=silent).verify(no_address)
    assert result.failures == ("tcp_port 3389: no address in the inventory",)
    assert len(calls) == 1


# --- HTTP: a real ThreadingHTTPServer on loopback ---


ROUTES: Final = {
    "/health": (200, b"<h1>EHR</h1> status: healthy"),
    "/down": (503, b"maintenance"),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ROUTES.get(self.path, (404, b"no such page"))
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read the verdicts
        pass


@contextmanager
def _serve(tls: TlsFiles | None = None) -> Iterator[str]:
    """Serve :class:`_Handler` on 127.0.0.1 for the block; yields the URL root."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def web() -> Iterator[str]:
    with _serve() as url:
        yield url


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def test_http_status_and_body_pass(web: str) -> None:
    check = HttpCheck(type="http", url="http://{address}:" + _port(web) + "/health", body_pattern="healthy")
    assert CheckRunner(FakeShell()).verify(_host(check)).clean


def test_http_wrong_status_fails(web: str) -> None:
    failures, _, _ = _verify(_host(HttpCheck(type="http", url=f"{web}/down")))
    assert failures == (f"http {web}/down: status 503, expected 200",)
    failures, _, _ = _verify(_host(HttpCheck(type="http", url=f"{web}/down", status=503)))
    assert failures == ()


def test_http_body_mismatch_fails(web: str) -> None:
    failures, _, _ = _verify(_host(HttpCheck(type="http", url=f"{web}/health", body_pattern="status: ok")))
    assert failures == (
        f"http {web}/health: body does not match 'status: ok': '<h1>EHR</h1> status: healthy'",
    )


def test_http_connection_error_names_url_and_error(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/health"
    failures, _, _ = _verify(_host(HttpCheck(type="http", url=url)))
    assert len(failures) == 1
    assert failures[0].startswith(f"http {url}: GET failed: ConnectError: ")


def test_http_address_placeholder_needs_an_address() -> None:
    check = HttpCheck(type="http", url="https://{address}/health")
    failures, _, _ = _verify(_host(check, address=None))
    assert failures == (
        "http https://{address}/health: the URL needs the host's address and there is no address in the "
        "inventory",
    )


def test_http_ipv6_address_is_bracketed(closed_port: int) -> None:
    check = HttpCheck(type="http", url="http://{address}:" + str(closed_port) + "/")
    failures, _, _ = _verify(_host(check, address="::1"))
    assert failures[0].startswith(f"http http://[::1]:{closed_port}/: GET failed: ")


def test_https_certificate_is_verified(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    with _serve(tls) as url:
        check = HttpCheck(type="http", url=f"{url}/health")
        failures, _, _ = _verify(_host(check))
        assert len(failures) == 1
        assert failures[0].startswith(f"http {url}/health: GET failed: ConnectError: ")
        assert "CERTIFICATE_VERIFY_FAILED" in failures[0]

        trusting = CheckRunner(
            FakeShell(), http_client_factory=lambda: default_http_client(str(tls.ca_bundle))
        )
        assert trusting.verify(_host(check)).clean


def test_the_runner_closes_the_client_it_made(web: str) -> None:
    clients: list[httpx.Client] = []

    def factory() -> httpx.Client:
        clients.append(default_http_client())
        return clients[-1]

    runner = CheckRunner(FakeShell(), http_client_factory=factory)
    host = _host(HttpCheck(type="http", url=f"{web}/health"), HttpCheck(type="http", url=f"{web}/down"))
    assert runner.verify(host).failures == (f"http {web}/down: status 503, expected 200",)
    assert len(clients) == 1
    assert clients[0].is_closed
    runner.verify(_host(TcpPortCheck(type="tcp_port", port=1), address=None))
    assert len(clients) == 1  # no HTTP check, no client
