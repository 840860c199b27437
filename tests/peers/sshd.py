"""Real OpenSSH servers on loopback, one per simulated host, for the SSH driver's tests and benchmarks.

    with sshd_hosts(tmp_path, 3) as hosts:
        shell = ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: hosts[0].client_key_text}))
        shell.run(hosts[0].inventory_host(), "echo hi", timeout=5)

Each host is its own ``sshd -D -e`` listener on its own 127.x.y.z address (a random block, so parallel
runs do not meet) and a free port there, with its own ed25519 host key and a directory holding its config,
keys, pid file and log. One client key pair, made per ``sshd_hosts`` call, is authorized on all of them.
The config follows the field notes: ``MaxStartups 200:30:400`` and ``MaxSessions 64`` (the defaults drop
parallel handshakes and refuse an 11th channel), ``SetEnv SHLVL=1`` (root's shell start-up otherwise costs
about 230 ms per command here), no PAM, no passwords. sshd needs root (privilege separation, logging in).

:meth:`SshdHost.reimage` stands in for a reimage: a new host key, every process of the old "installation"
(the listener, its connection processes, their commands) killed, and the listener started again. Every
session gets ``RESTORE_SSHD_PEER=<host token>`` in its environment, so that stopping a host also finds
commands that outlived their connection.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, RestoreMethod, Ssh
from restore_flows.inventory.yamlsource import Location

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
CLIENT_KEY_SECRET = "sshd-peer-client-key"
"""The secret name :meth:`SshdHost.inventory_host` puts in ``ssh.key_secret``."""
UNPRIVILEGED_USER = "restore-peer"
"""A login with no rights, created on demand by :func:`ensure_unprivileged_user`."""
START_SECONDS = 10.0
ENV_MARK = "RESTORE_SSHD_PEER"


def unavailable_reason() -> str | None:
    """Why real sshd peers cannot run here, or None if they can."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "running sshd peers needs root (privilege separation, logging in as a user)"
    return None


def require_peers(reason: str | None) -> None:
    """In a test: skip with ``reason`` (sshd missing, not root...), or fail if the run demands real peers
    (CI sets ``RESTORE_TEST_PEERS_REQUIRED=1``). Nothing when ``reason`` is None."""
    if reason is None:
        return
    import pytest  # here, not at the top: the benchmarks use this module without pytest

    if os.environ.get("RESTORE_TEST_PEERS_REQUIRED") == "1":
        pytest.fail(f"RESTORE_TEST_PEERS_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def ensure_unprivileged_user() -> str:
    """A system account with a shell, for sessions that should run with OpenSSH's privilege separation
    (sshd skips it for root). Created once per machine and left in place for later runs."""
    try:
        subprocess.run(["id", "-u", UNPRIVILEGED_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        # Password field '*' rather than useradd's '!': without PAM, sshd refuses a '!' (locked) account
        # even for public-key logins.
        subprocess.run(
            [
                *("useradd", "--system", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh"),
                *("--password", "*", UNPRIVILEGED_USER),
            ],
            check=True,
            capture_output=True,
        )
    return UNPRIVILEGED_USER


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_text: str
    """OpenSSH private key format, unencrypted."""
    public_line: str
    """'ssh-ed25519 AAAA...'"""


def generate_key_pair() -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return KeyPair(private, public)


class SshdHost:
    """One simulated host: an sshd listener on ``address``:``port``."""

    def __init__(self, directory: Path, address: str, client: KeyPair, client_key_path: Path, user: str):
        self.directory = directory
        self.address = address
        self.port = 0
        self.user = user
        self.client_key_text = client.private_text
        self.client_key_path = client_key_path
        self.log_path = directory / "sshd.log"
        self._host_key_path = directory / "ssh_host_ed25519_key"
        self._config_path = directory / "sshd_config"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.token = f"{os.getpid()}-{random.getrandbits(48):012x}-{address}"
        """Set as RESTORE_SSHD_PEER in every session's environment, to find the commands it left."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "authorized_keys").write_text(client.public_line + "\n")
        self.host_key_line = self._write_host_key()

    def __repr__(self) -> str:
        return f"SshdHost({self.address}:{self.port})"

    @property
    def pid(self) -> int | None:
        """The listener's process id while it runs."""
        return self._process.pid if self._process is not None else None

    # --- inventory views of this host ---

    def ssh(self, *, host_key: str | None = None, known_hosts: Path | None = None, pin: bool = True) -> Ssh:
        """Inventory SSH settings for this host; pinned to its current key unless told otherwise."""
        if host_key is None and pin and known_hosts is None:
            host_key = self.host_key_line
        return Ssh(
            user=self.user,
            port=self.port,
            host_key=host_key,
            known_hosts=str(known_hosts) if known_hosts is not None else None,
            key_secret=CLIENT_KEY_SECRET,
            shell="posix",
        )

    def inventory_host(
        self,
        name: str | None = None,
        *,
        host_key: str | None = None,
        known_hosts: Path | None = None,
        pin: bool = True,
    ) -> Host:
        """An estate host reaching this sshd; the keywords go to :meth:`ssh`."""
        return Host(
            name=name or f"peer-{self.address}",
            kind=HostKind.SERVER,
            site="loopback",
            role="sshd-peer",
            department="test",
            services=(),
            depends_on=(),
            pools={},
            restore_method=RestoreMethod.REIMAGE,
            forensic_hold=False,
            location=Location(str(self._config_path), 1),
            address=self.address,
            ssh=self.ssh(host_key=host_key, known_hosts=known_hosts, pin=pin),
        )

    def known_hosts_line(self, name: str | None = None) -> str:
        return f"[{name or self.address}]:{self.port} {self.host_key_line}"

    # --- what happened on the host ---

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def accepted_logins(self) -> int:
        """Logins so far: one per SSH connection that authenticated."""
        return self.log().count("Accepted publickey for ")

    def session_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process under the listener: connection processes and commands."""
        if self._process is None:
            return []
        return [(pid, _cmdline(pid)) for pid in _descendants(self._process.pid)]

    def session_commands(self) -> list[str]:
        return [command for _, command in self.session_processes()]

    def authorize(self, public_line: str) -> None:
        """Accept one more client key (sshd reads the file at each login: no restart)."""
        with (self.directory / "authorized_keys").open("a") as keys:
            keys.write(public_line + "\n")

    # --- life cycle ---

    def start(self) -> None:
        if self._process is not None:
            return
        for _attempt in range(5):
            self._launch(_free_port(self.address))
            if self._wait_ready():
                return
            if "Address already in use" not in self._new_log():
                break  # anything but a lost race for the port will not go away by retrying
        raise RuntimeError(f"sshd on {self.address} did not start:\n{self._new_log()}")

    def stop(self, *, sweep: bool = True) -> None:
        """Kill every process of this host, as pulling the plug would, then end the listener.

        ``sweep``: also kill commands its sessions left behind that are no longer under the listener
        (a command outlives its channel, and then its connection process, when sshd cannot signal it).
        """
        process, self._process = self._process, None
        if process is not None:
            _kill_tree(process.pid)
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if sweep:
            kill_left_behind({self.token})

    def restart(self) -> None:
        """A reboot: every session gone, sshd back on the same address, port and host key."""
        self.stop()
        self._relaunch()

    def reimage(self) -> str:
        """A new installation: a new host key, the old sessions gone, sshd started again on the same
        address and port. Returns the new 'ssh-ed25519 AAAA...' line (the deployment server's report)."""
        self.stop()
        self.host_key_line = self._write_host_key()
        self._relaunch()
        return self.host_key_line

    def _relaunch(self) -> None:
        self._launch(self.port)
        if not self._wait_ready():
            raise RuntimeError(f"sshd on {self.address}:{self.port} did not restart:\n{self._new_log()}")

    def _launch(self, port: int) -> None:
        self.port = port
        self._write_config()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self._config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
            )

    def _write_host_key(self) -> str:
        pair = generate_key_pair()
        self._host_key_path.unlink(missing_ok=True)
        # sshd refuses a host key file that others can read.
        fd = os.open(self._host_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key_file:
            key_file.write(pair.private_text)
        return pair.public_line

    def _write_config(self) -> None:
        d = self.directory
        authorized = d / "authorized_keys"
        if self.user == "root":
            keys = f"AuthorizedKeysFile {authorized}"
        else:
            # sshd opens AuthorizedKeysFile as the user, who cannot reach into a root-only temporary
            # directory; a command run as root hands the same file over instead.
            keys = f"AuthorizedKeysFile none\nAuthorizedKeysCommand /usr/bin/cat {authorized}\n"
            keys += "AuthorizedKeysCommandUser root"
        self._config_path.write_text(
            f"""\
ListenAddress {self.address}
Port {self.port}
HostKey {self._host_key_path}
PidFile {d / "sshd.pid"}
{keys}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
MaxStartups 200:30:400
MaxSessions 64
SetEnv SHLVL=1 {ENV_MARK}={self.token}
UseDNS no
PrintMotd no
LogLevel VERBOSE
"""
        )

    def _wait_ready(self) -> bool:
        """Until the log says the listener is up (printed after listen()); False if sshd died first
        (then it is reaped and forgotten)."""
        assert self._process is not None
        ready = f"Server listening on {self.address} port {self.port}."
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if ready in self._new_log():
                return True
            if self._process.poll() is not None:
                self._process = None
                return False
            time.sleep(0.005)
        raise RuntimeError(f"sshd on {self.address} not ready after {START_SECONDS:g} s:\n{self._new_log()}")

    def _new_log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._log_offset)
            return log_file.read().decode(errors="replace")


@contextlib.contextmanager
def sshd_hosts(directory: Path, count: int = 1, *, user: str | None = None) -> Iterator[list[SshdHost]]:
    """Start ``count`` sshd hosts under ``directory``; stop every one (and its sessions) on exit.

    ``user``: who logs in (default: the current user). Hosts start in parallel; the whole start of 100
    takes well under a second on two cores.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    client = generate_key_pair()
    client_key_path = directory / "client_ed25519"
    fd = os.open(client_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as key_file:
        key_file.write(client.private_text)
    login = user or getpass.getuser()
    hosts = [
        SshdHost(directory / f"sshd-{i:03d}", address, client, client_key_path, login)
        for i, address in enumerate(_loopback_addresses(count))
    ]
    try:
        _start_all(hosts)
        yield hosts
    finally:
        for host in hosts:
            host.stop(sweep=False)
        kill_left_behind({host.token for host in hosts})


def _start_all(hosts: list[SshdHost]) -> None:
    """Launch every listener first, then wait: the start-ups overlap instead of queueing."""
    for host in hosts:
        host._launch(_free_port(host.address))
    for host in hosts:
        if not host._wait_ready():
            host.start()  # lost a race for the port (or worse): retries, or raises with sshd's log


def wait_until(condition: Callable[[], bool], seconds: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; AssertionError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {seconds:g} s")
        time.sleep(0.01)


def _loopback_addresses(count: int) -> list[str]:
    """``count`` addresses in a random block of 127.0.0.0/8 (all of it is local on Linux)."""
    second, third = random.randrange(16, 250), random.randrange(0, 256)
    addresses = []
    for i in range(count):
        block, host = divmod(i, 250)
        addresses.append(f"127.{second}.{(third + block) % 256}.{host + 2}")
    return addresses


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may itself hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children()
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL everything under ``pid`` until nothing is left (a dying sshd may fork once more)."""
    deadline = time.monotonic() + START_SECONDS
    while (pids := _descendants(pid)) and time.monotonic() < deadline:
        for child in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        time.sleep(0.005)


def kill_left_behind(tokens: set[str]) -> None:
    """SIGKILL every process whose environment carries one of these hosts' tokens."""
    marks = {f"{ENV_MARK}={token}".encode() for token in tokens}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marks.intersection(environ.split(b"\0")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
