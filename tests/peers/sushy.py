"""Real Redfish BMCs for tests: sushy-tools' ``sushy-emulator`` on loopback, plus a small loopback HTTP
server that records what it is sent (power-change notifications, image downloads, scripted BMCs).

    with loopback_http() as sink, sushy_emulator(
        tmp_path, systems=[SushySystem("srv-1", power_state="On", external_notifier=True)],
        auth=("admin", "pw"), tls=True, notify_url=sink.url,
    ) as bmc:
        bmc.url, bmc.systems["srv-1"], bmc.ca_bundle, bmc.credentials

Each emulator is its own process with its own port and state directory, stopped (terminate, then wait)
when the block ends. Facts about sushy-tools 2.2.0 that shape this module (measured, see NOTES.md):

- A power change lands 1-11 s after the reset and only when the system is read: poll with a timeout of
  at least 12 s. ForceRestart reads Off at once.
- With ``external_notifier``, every change of the system (the pending change too) is PUT as JSON to
  EXTERNAL_NOTIFICATION_URL *inside* the request that made it; when nothing listens there, that request
  answers 500. Hence: no notifier without ``notify_url``.
- Basic auth checks a bcrypt hash on every request: hashes here use the cheapest cost (4 rounds), or
  polling slows to a few requests per second.
- TLS is TLS 1.2 only; the service root (/redfish/v1/) needs no credentials.

If sushy-tools is missing, the tests that need it are skipped, or fail when RESTORE_TEST_PEERS_REQUIRED=1
(as in CI), so that a broken environment cannot pass as green.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REQUIRED_ENV = "RESTORE_TEST_PEERS_REQUIRED"
START_TIMEOUT = 20.0
"""Seconds for an emulator to answer its service root; it usually does in under 1 s."""

# --- Availability ---


def sushy_command() -> list[str] | None:
    """The command that runs sushy-emulator in this environment, or None when it is not installed."""
    beside_python = Path(sys.executable).parent / "sushy-emulator"
    if beside_python.exists():
        return [str(beside_python)]
    on_path = shutil.which("sushy-emulator")
    if on_path is not None:
        return [on_path]
    if importlib.util.find_spec("sushy_tools") is not None:
        return [sys.executable, "-m", "sushy_tools.emulator.main"]
    return None


def require_sushy(find: Callable[[], list[str] | None] = sushy_command) -> list[str]:
    """The sushy-emulator command; skips the test when it is missing, fails instead if peers are required."""
    command = find()
    if command is None:
        reason = "sushy-emulator is not installed (pip install sushy-tools)"
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRED_ENV}=1", pytrace=False)
        pytest.skip(reason)
    return command


# --- TLS: a throw-away CA and a server certificate for loopback ---


@dataclass(frozen=True)
class TlsFiles:
    ca_bundle: Path
    """The CA certificate (PEM): what a client must trust."""
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A new CA and a server certificate it signed for ``hosts`` (IP addresses or DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "restore-orchestrator test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_bundle.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


# --- sushy-emulator ---


@dataclass(frozen=True)
class SushySystem:
    """One fake system (the fake driver's SUSHY_EMULATOR_FAKE_SYSTEMS entry)."""

    name: str
    power_state: Literal["On", "Off"] = "Off"
    external_notifier: bool = False
    """PUT the system's JSON to the emulator's notify_url on every change."""
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    nics: tuple[tuple[str, str], ...] = ()
    """(mac, ip) pairs."""

    def config(self) -> dict[str, object]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "power_state": self.power_state,
            "external_notifier": self.external_notifier,
            "nics": [{"mac": mac, "ip": ip} for mac, ip in self.nics],
        }


@dataclass(frozen=True)
class SushyEmulator:
    """A running emulator: one BMC managing ``systems``."""

    url: str
    """Base URL, e.g. https://127.0.0.1:40123 (without /redfish/v1)."""
    systems: Mapping[str, str]
    """System name -> UUID (the Redfish system id; the name also works, answered with a 307)."""
    ca_bundle: Path | None
    """The CA to trust when the emulator speaks TLS."""
    user: str | None
    password: str | None
    state_dir: Path
    log_path: Path

    @property
    def credentials(self) -> str | None:
        """The 'user:password' a credentials secret holds, or None without auth."""
        return None if self.user is None else f"{self.user}:{self.password}"

    def system_url(self, name: str) -> str:
        return f"{self.url}/redfish/v1/Systems/{self.systems[name]}"

    def client(self) -> httpx.Client:
        """A client that trusts the emulator and sends its credentials: for reading state in tests."""
        verify: ssl.SSLContext | bool = True
        if self.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_bundle))
        auth = (
            None if self.user is None or self.password is None else httpx.BasicAuth(self.user, self.password)
        )
        return httpx.Client(verify=verify, auth=auth, timeout=10.0, trust_env=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def _child_environment() -> dict[str, str]:
    """The emulator's environment: no SUSHY_* settings and no proxies (it fetches images and sends
    notifications with requests, which would send loopback traffic to a proxy)."""
    dropped = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SUSHY_EMULATOR") and name.lower() not in dropped
    }


@contextmanager
def sushy_emulator(
    directory: Path,
    systems: Sequence[SushySystem] = (SushySystem("system-1"),),
    *,
    auth: tuple[str, str] | None = None,
    tls: bool | TlsFiles = False,
    notify_url: str | None = None,
    address: str = "127.0.0.1",
    extra_config: Mapping[str, object] | None = None,
) -> Iterator[SushyEmulator]:
    """Run sushy-emulator (fake driver) for the block. ``directory``: its own, fresh (state, config,
    log). ``auth``: (user, password) for HTTP basic. ``tls``: True for a new test CA, or given files.
    ``notify_url``: where systems with ``external_notifier`` report their changes."""
    command = require_sushy()
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"tests only use loopback, not {address}")
    if any(system.external_notifier for system in systems) and notify_url is None:
        # sushy would notify its default http://localhost:9999, and answer 500 to every power change.
        raise ValueError("a system with external_notifier needs notify_url")
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = directory / "state"
    state_dir.mkdir(exist_ok=True)
    config: dict[str, object] = {
        "SUSHY_EMULATOR_LISTEN_IP": address,
        "SUSHY_EMULATOR_FAKE_DRIVER": True,
        "SUSHY_EMULATOR_STATE_DIR": str(state_dir),
        "SUSHY_EMULATOR_FAKE_SYSTEMS": [system.config() for system in systems],
    }
    if notify_url is not None:
        config["EXTERNAL_NOTIFICATION_URL"] = notify_url
    user = password = None
    if auth is not None:
        user, password = auth
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        auth_file = directory / "htpasswd"
        auth_file.write_text(f"{user}:{hashed}\n")
        config["SUSHY_EMULATOR_AUTH_FILE"] = str(auth_file)
    tls_files: TlsFiles | None = None
    if isinstance(tls, TlsFiles):
        tls_files = tls
    elif tls:
        tls_files = make_tls(directory / "tls", (address, "localhost"))
    if tls_files is not None:
        config["SUSHY_EMULATOR_SSL_CERT"] = str(tls_files.cert)
        config["SUSHY_EMULATOR_SSL_KEY"] = str(tls_files.key)
    config.update(extra_config or {})
    scheme = "https" if tls_files is not None else "http"
    ca_bundle = tls_files.ca_bundle if tls_files is not None else None

    log_path = directory / "sushy.log"
    # A free port can be taken between choosing it and the emulator binding it: try a few.
    for attempt in range(3):
        port = _free_port(address)
        config["SUSHY_EMULATOR_LISTEN_PORT"] = port
        config_path = directory / "sushy.conf"
        config_path.write_text("".join(f"{key} = {value!r}\n" for key, value in config.items()))
        emulator = SushyEmulator(
            url=f"{scheme}://{address}:{port}",
            systems={system.name: system.uuid for system in systems},
            ca_bundle=ca_bundle,
            user=user,
            password=password,
            state_dir=state_dir,
            log_path=log_path,
        )
        with ExitStack() as stack:
            log_file = stack.enter_context(log_path.open("ab"))
            process = subprocess.Popen(
                [*command, "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_child_environment(),
            )
            stack.callback(_stop, process)
            if _wait_ready(emulator, process):
                yield emulator
                return
            if attempt == 2 or "Address already in use" not in emulator.log():
                raise RuntimeError(f"sushy-emulator did not start; its log:\n{emulator.log()}")


def _wait_ready(emulator: SushyEmulator, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    with emulator.client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.get(f"{emulator.url}/redfish/v1/").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling for start-up, within a deadline
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def start_sushy(tmp_path: Path) -> Iterator[Callable[..., SushyEmulator]]:
    """Start emulators (the arguments of :func:`sushy_emulator`, without the directory); all of them
    stop at the test's end."""
    with ExitStack() as stack:
        count = 0

        def start(
            systems: Sequence[SushySystem] = (SushySystem("system-1"),),
            *,
            auth: tuple[str, str] | None = None,
            tls: bool | TlsFiles = False,
            notify_url: str | None = None,
            address: str = "127.0.0.1",
            extra_config: Mapping[str, object] | None = None,
        ) -> SushyEmulator:
            nonlocal count
            count += 1
            return stack.enter_context(
                sushy_emulator(
                    tmp_path / f"sushy-{count}",
                    systems,
                    auth=auth,
                    tls=tls,
                    notify_url=notify_url,
                    address=address,
                    extra_config=extra_config,
                )
            )

        yield start


# --- A loopback HTTP server that records requests and answers through a handler ---

Handler = Callable[[httpx.Request], httpx.Response]


def _no_content(request: httpx.Request) -> httpx.Response:
    return httpx.Response(204)


class LoopbackHttp:
    """Records every request; answers with ``handler`` (the same signature as httpx.MockTransport's, so
    one scripted service runs in-process and over a real socket alike)."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self._condition = threading.Condition()
        self.requests: list[httpx.Request] = []
        self.handler: Handler = _no_content
        host, port = server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def record(self, request: httpx.Request) -> None:
        with self._condition:
            self.requests.append(request)
            self._condition.notify_all()

    def wait_for(
        self, predicate: Callable[[list[httpx.Request]], bool], timeout: float = 10.0
    ) -> list[httpx.Request]:
        """Block until ``predicate(requests so far)`` holds; fail the test after ``timeout`` seconds."""
        with self._condition:
            if not self._condition.wait_for(lambda: predicate(list(self.requests)), timeout):
                seen = [f"{r.method} {r.url.path}" for r in self.requests]
                raise AssertionError(
                    f"{self.url} did not get the expected requests within {timeout} s: {seen}"
                )
            return list(self.requests)


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = httpx.Request(
            self.command,
            f"{self.server.recorder.url}{self.path}",
            headers=list(self.headers.items()),
            content=body,
        )
        self.server.recorder.record(request)
        try:
            response = self.server.recorder.handler(request)
            response.read()
        except Exception as exc:
            response = httpx.Response(500, text=f"test handler failed: {exc!r}")
        self.send_response(response.status_code)
        for name, value in response.headers.multi_items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.content)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read the recorded requests
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorder: LoopbackHttp


@contextmanager
def loopback_http(handler: Handler | None = None, address: str = "127.0.0.1") -> Iterator[LoopbackHttp]:
    """A recording HTTP server on ``address`` (a free port) for the block. ``handler`` answers; by default
    every request gets 204. It can be swapped while running (``server.handler = ...``)."""
    server = _Server((address, 0), _RequestHandler)
    recorder = LoopbackHttp(server)
    if handler is not None:
        recorder.handler = handler
    server.recorder = recorder
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
