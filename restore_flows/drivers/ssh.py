"""ParamikoShell: the remote shell over SSH, one pinned and reused connection per host.

A command goes: per-host session slot -> global session slot -> the host's cached transport (connected
on first use, again after it died) -> a new channel -> exec -> both streams read up to the capture
limit -> exit status. Everything from the first slot wait to the exit status fits in the caller's
``timeout``: Prefect cannot interrupt a blocking call, so ``run()`` must come back on its own.

Trust: a host key is never learnt from the host. It comes from :meth:`ParamikoShell.pin_host_key` (the
imaging step, from the deployment server's report), else the inventory's ``ssh.host_key``, else its
``ssh.known_hosts`` file; anything else is refused by a ``RejectPolicy``. The private key comes from the
secret named by ``ssh.key_secret`` and lives only in memory.

Quirks that shape the code:

- paramiko leaves Nagle's algorithm on: each request then waits for a delayed ACK, about 50 ms per
  command instead of 7 on loopback. We open the socket ourselves with ``TCP_NODELAY`` and pass it in.
- ``Channel.exec_command`` waits for the server's answer with no timeout. A watchdog thread closes the
  channel of any command past its deadline, which wakes every wait on that channel.
- OpenSSH allows 10 sessions per connection unless ``MaxSessions`` says otherwise; the 11th channel is
  refused. The per-host cap defaults to 8 to stay below a stock server.
- On a timeout we send the RFC 4254 "signal" request (KILL) before closing the channel, because closing
  alone leaves a silent command (``sleep``) running. OpenSSH acts on it only when the session runs with
  privilege separation, which it skips for root logins ("session signalling requires privilege
  separation" in its log); then the command runs on until it ends by itself.
- paramiko ignores "exit-signal": a command killed by a signal ends with exit status -1.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import io
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message
from paramiko.pkey import UnknownKeyType

from restore_flows.drivers.base import CommandResult, DriverError, DriverTimeout
from restore_flows.drivers.secrets import SecretNotFound, Secrets
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage

log = logging.getLogger(__name__)

Clock = Callable[[], float]
SocketFactory = Callable[[str, int, float], socket.socket]
"""(address, port, connect timeout) -> a connected socket."""
ClientFactory = Callable[[], paramiko.SSHClient]

OUTPUT_LIMIT = 64 * 1024
"""Bytes kept per stream; the rest is read (so the command can finish) and dropped."""
_CHUNK = 32 * 1024
_POLL_SECONDS = 0.05
"""How often stderr is drained while stdout is quiet, so a command that writes only to stderr cannot
fill the channel window and stall."""
_KILL_SIGNAL = "KILL"
"""The command has overrun its budget and the caller will retry or escalate: a process left running
could collide with the retry, so no chance to linger (TERM can be ignored)."""


def tcp_socket(address: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket with Nagle off (see the module notes)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def parse_host_key(line: str) -> paramiko.PKey:
    """'ssh-ed25519 AAAA... [comment]' -> the public key. Raises ValueError if it is not one."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError("expected '<type> <base64> [comment]'")
    key_type, blob = parts[0], parts[1]
    try:
        key = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob, validate=True))
    except (binascii.Error, UnknownKeyType, paramiko.SSHException, ValueError, TypeError) as exc:
        raise ValueError(f"not a {key_type} public key ({type(exc).__name__})") from exc
    if key.get_name() != key_type:  # the type inside the blob must be the one written in front
        raise ValueError(f"the key is {key.get_name()}, not {key_type}")
    return key


def describe_key(key: paramiko.PKey) -> str:
    """Type and OpenSSH-style fingerprint ('ssh-ed25519 SHA256:...'), as ``ssh-keygen -l`` shows it."""
    return f"{key.get_name()} {key.fingerprint}"


def load_private_key(text: str) -> paramiko.PKey:
    """An unencrypted ed25519, RSA or ECDSA private key (OpenSSH, PKCS#8 or traditional PEM text),
    parsed in memory.

    ``cryptography`` reads every format; paramiko reads only some (not PKCS#8) and only once told the
    key's class (what ``PKey.from_path`` works out from a file). So the key is read by ``cryptography``
    and handed to paramiko in OpenSSH format, which paramiko reads for all three types.
    """
    data = text.encode()
    loaded: object
    try:
        loaded = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        loaded = serialization.load_pem_private_key(data, password=None)
    key_class: type[paramiko.PKey]
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        key_class = paramiko.Ed25519Key
    elif isinstance(loaded, rsa.RSAPrivateKey):
        key_class = paramiko.RSAKey
    elif isinstance(loaded, ec.EllipticCurvePrivateKey):
        key_class = paramiko.ECDSAKey
    else:
        raise ValueError(f"unsupported key type {type(loaded).__name__}")
    openssh = loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return key_class.from_private_key(io.StringIO(openssh.decode()))


@dataclass(frozen=True, slots=True)
class _Target:
    address: str
    port: int
    user: str
    key_secret: str

    @property
    def host_key_name(self) -> str:
        return _known_hosts_name(self.address, self.port)


def _known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH's known_hosts (and paramiko) name a host: a port other than 22 goes in brackets, and
    an entry without one does not match such a port."""
    return host if port == 22 else f"[{host}]:{port}"


class _UnpinnedHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("host key not pinned")
        self.key = key


class _RejectUnpinned(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the presented key so the error can show its fingerprint."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> NoReturn:
        raise _UnpinnedHostKey(key)


@dataclass(eq=False)
class _Connection:
    client: paramiko.SSHClient
    transport: paramiko.Transport
    sock: socket.socket

    def close(self) -> None:
        self.client.close()
        # A transport that died on its own skips closing in Transport.close(); close our socket anyway.
        self.sock.close()


@dataclass(eq=False)
class _HostSlot:
    sessions: threading.BoundedSemaphore
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while connecting, so that concurrent commands wait for one connection instead of each
    opening their own."""
    connection: _Connection | None = None


class _Overran(Exception):
    pass


class _Capture:
    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._room = limit
        self.truncated = False

    def add(self, data: bytes) -> None:
        if len(data) > self._room:
            self.truncated = True
            data = data[: self._room]
        if data:
            self._parts.append(data)
            self._room -= len(data)

    def text(self) -> str:
        return b"".join(self._parts).decode("utf-8", errors="replace")


def _kill_and_close(channel: paramiko.Channel) -> None:
    transport = channel.transport
    if transport is not None and not channel.closed and transport.is_active():
        message = Message()
        message.add_byte(cMSG_CHANNEL_REQUEST)
        message.add_int(channel.remote_chanid)
        message.add_string("signal")
        message.add_boolean(False)
        message.add_string(_KILL_SIGNAL)
        try:
            # paramiko has no public call for the "signal" request; this is how its own requests go out.
            transport._send_user_message(message)  # type: ignore[attr-defined]
        except Exception as exc:  # the channel is closed next whatever happened
            log.debug("could not send the kill signal: %s", type(exc).__name__)
    _close_quietly(channel)


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whatever state its connection is in.

    paramiko marks the channel closed first, then sends EOF and CLOSE; the sending raises if the socket
    went away meanwhile (the host died, or another thread dropped the connection). The channel is
    closed on our side either way, and the error that matters is reported elsewhere.
    """
    try:
        channel.close()
    except Exception as exc:
        log.debug("closing a channel: %s", type(exc).__name__)


@dataclass(eq=False)
class _Watch:
    channel: paramiko.Channel | None
    fired: bool = False
    done: bool = False


class _Watchdog:
    """Closes the channel of every command still running at its deadline (see the module notes)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def watch(self, channel: paramiko.Channel, deadline: float) -> _Watch:
        entry = _Watch(channel)
        with self._cond:
            self._prune()
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="ssh-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is entry:
                self._cond.notify()
        return entry

    def finish(self, entry: _Watch) -> bool:
        """Stop watching; False if the watchdog fired first (the channel was closed under the command)."""
        with self._cond:
            entry.done = True
            entry.channel = None
            return not entry.fired

    def stop(self) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _prune(self) -> None:
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)

    def _loop(self) -> None:
        with self._cond:
            while not self._stopping:
                self._prune()
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)[2]
                channel, entry.channel, entry.fired = entry.channel, None, True
                if channel is not None:
                    self._cond.release()
                    try:
                        _kill_and_close(channel)
                    except Exception:  # one channel's trouble must not end the watch over all the others
                        log.exception("ssh watchdog: stopping a command that overran")
                    finally:
                        self._cond.acquire()


class ParamikoShell:
    """The :class:`~restore_flows.drivers.base.ShellDriver` over SSH. Thread-safe: many threads may run
    commands on one host at once, each on its own channel of the host's one connection.

    ``stage`` goes into every :class:`DriverError`; ``run`` and ``pin_host_key`` take it per call too.
    """

    def __init__(
        self,
        secrets: Secrets,
        *,
        stage: Stage = Stage.VERIFY,
        max_sessions: int = 64,
        max_sessions_per_host: int = 8,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 15.0,
        output_limit: int = OUTPUT_LIMIT,
        connect: SocketFactory = tcp_socket,
        client_factory: ClientFactory = paramiko.SSHClient,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_sessions < 1 or max_sessions_per_host < 1:
            raise ValueError("session caps must be at least 1")
        self._secrets = secrets
        self._stage = stage
        self._sessions = threading.BoundedSemaphore(max_sessions)
        self._per_host = max_sessions_per_host
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._output_limit = output_limit
        self._connect = connect
        self._client_factory = client_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, _HostSlot] = {}
        self._pinned: dict[str, paramiko.PKey] = {}
        self._known_hosts: dict[tuple[str, int, int], paramiko.HostKeys] = {}
        self._watchdog = _Watchdog(clock)
        self.connects = 0
        """Connections opened so far (each one a TCP connect, key exchange and login)."""

    def __enter__(self) -> ParamikoShell:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- ShellDriver ---

    def run(
        self,
        host: Host,
        command: str,
        *,
        timeout: float,
        stage: Stage | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run ``command`` (already rendered for the host's shell) and return its exit status and output.
        ``stdin`` is written to the command's standard input, then closed.

        Raises :class:`DriverTimeout` when the whole of it (waiting for a session slot, connecting,
        running) takes longer than ``timeout`` seconds, :class:`DriverError` otherwise.
        """
        stage = stage if stage is not None else self._stage
        target = self._target(host, stage)
        deadline = self._clock() + timeout
        slot = self._slot(host.name)
        if not slot.sessions.acquire(timeout=self._remaining(deadline)):
            raise DriverTimeout(
                host.name, stage, f"no free session to the host within {timeout:g} s (cap {self._per_host})"
            )
        try:
            if not self._sessions.acquire(timeout=self._remaining(deadline)):
                raise DriverTimeout(host.name, stage, f"no free SSH session slot within {timeout:g} s")
            try:
                return self._execute(host, target, slot, command, deadline, timeout, stage, stdin)
            finally:
                self._sessions.release()
        finally:
            slot.sessions.release()

    def pin_host_key(self, host: Host, host_key: str, *, stage: Stage | None = None) -> None:
        try:
            key = parse_host_key(host_key)
        except ValueError as exc:
            raise DriverError(
                host.name,
                stage if stage is not None else self._stage,
                f"cannot pin host key: {exc}",
                retryable=False,
            ) from exc
        with self._lock:
            self._pinned[host.name] = key
            slot = self._slots.get(host.name)
        if slot is not None:
            # The cached connection was verified against the old key (the old installation): drop it.
            with slot.lock:
                self._drop(host, slot, "host key re-pinned")
        log.debug("ssh %s: pinned %s", host.name, describe_key(key))

    def close(self) -> None:
        # The watchdog first: it may be closing a channel of a connection about to go.
        self._watchdog.stop()
        with self._lock:
            slots = list(self._slots.items())
        for name, slot in slots:
            with slot.lock:
                if slot.connection is not None:
                    slot.connection.close()
                    slot.connection = None
                    log.debug("ssh %s: connection closed", name)

    # --- running a command ---

    def _execute(
        self,
        host: Host,
        target: _Target,
        slot: _HostSlot,
        command: str,
        deadline: float,
        timeout: float,
        stage: Stage,
        stdin: str | None = None,
    ) -> CommandResult:
        overran = f"command did not finish within {timeout:g} s: channel closed, kill requested"
        channel, connection = self._open_channel(host, target, slot, deadline, stage)
        watch = self._watchdog.watch(channel, deadline)
        # From exec_command on, the command may run whatever happens next.
        sent = False
        try:
            try:
                sent = True
                channel.exec_command(command)
                if stdin is not None:
                    channel.sendall(stdin.encode())
                    channel.shutdown_write()
                stdout, stderr, status = self._collect(channel, deadline)
            except _Overran:
                self._watchdog.finish(watch)
                _kill_and_close(channel)
                raise DriverTimeout(host.name, stage, overran, command_sent=sent) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if not self._watchdog.finish(watch):
                    raise DriverTimeout(host.name, stage, overran, command_sent=sent) from exc
                raise DriverError(
                    host.name, stage, f"SSH session failed: {_reason(exc)}", command_sent=sent
                ) from exc
            if not self._watchdog.finish(watch):
                raise DriverTimeout(host.name, stage, overran, command_sent=sent)
        finally:
            _close_quietly(channel)
        if status == -1 and not connection.transport.is_active():
            with slot.lock:
                if slot.connection is connection:
                    self._drop(host, slot, "connection lost during a command")
            raise DriverError(
                host.name,
                stage,
                "connection lost while the command ran; it may or may not have finished",
                command_sent=True,
            )
        return CommandResult(status, stdout.text(), stderr.text(), stdout.truncated or stderr.truncated)

    def _collect(self, channel: paramiko.Channel, deadline: float) -> tuple[_Capture, _Capture, int]:
        stdout, stderr = _Capture(self._output_limit), _Capture(self._output_limit)
        stderr_open = True
        while True:
            channel.settimeout(min(self._remaining(deadline, overrun=True), _POLL_SECONDS))
            try:
                data: bytes | None = channel.recv(_CHUNK)
            except TimeoutError:
                data = None
            while stderr_open and channel.recv_stderr_ready():
                chunk = channel.recv_stderr(_CHUNK)
                stderr_open = bool(chunk)
                stderr.add(chunk)
            if data == b"":
                break
            if data:
                stdout.add(data)
        while stderr_open:
            channel.settimeout(self._remaining(deadline, overrun=True))
            try:
                chunk = channel.recv_stderr(_CHUNK)
            except TimeoutError:
                continue
            stderr_open = bool(chunk)
            stderr.add(chunk)
        if not channel.status_event.wait(self._remaining(deadline, overrun=True)):
            raise _Overran
        return stdout, stderr, channel.recv_exit_status()

    def _remaining(self, deadline: float, *, overrun: bool = False) -> float:
        remaining = deadline - self._clock()
        if overrun and remaining <= 0:
            raise _Overran
        return max(remaining, 0.0)

    # --- connections ---

    def _slot(self, name: str) -> _HostSlot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = _HostSlot(threading.BoundedSemaphore(self._per_host))
            return slot

    def _open_channel(
        self, host: Host, target: _Target, slot: _HostSlot, deadline: float, stage: Stage
    ) -> tuple[paramiko.Channel, _Connection]:
        while True:
            connection, reused = self._connection(host, target, slot, deadline, stage)
            try:
                channel = connection.transport.open_session(timeout=self._remaining(deadline))
            except paramiko.ChannelException as exc:  # the server refused this channel, not the connection
                raise DriverError(host.name, stage, f"sshd refused a session: {_reason(exc)}") from exc
            except (paramiko.SSHException, EOFError, OSError) as exc:
                with slot.lock:
                    if slot.connection is connection:
                        self._drop(host, slot, f"cannot open a channel ({_reason(exc)})")
                if self._clock() >= deadline:
                    raise DriverTimeout(
                        host.name, stage, f"the host did not open a session in time: {_reason(exc)}"
                    ) from exc
                # A cached transport can die between is_active() and this request (the host rebooted):
                # nothing ran yet, so one fresh connection is safe. A new one failing is an error.
                if reused:
                    continue
                raise DriverError(host.name, stage, f"cannot open a session: {_reason(exc)}") from exc
            return channel, connection

    def _connection(
        self, host: Host, target: _Target, slot: _HostSlot, deadline: float, stage: Stage
    ) -> tuple[_Connection, bool]:
        if not slot.lock.acquire(timeout=self._remaining(deadline)):
            raise DriverTimeout(host.name, stage, "timed out waiting for another connect to the host")
        try:
            if slot.connection is not None:
                if slot.connection.transport.is_active():
                    return slot.connection, True
                self._drop(host, slot, "transport died")
            slot.connection = self._new_connection(host, target, deadline, stage)
            return slot.connection, False
        finally:
            slot.lock.release()

    def _drop(self, host: Host, slot: _HostSlot, why: str) -> None:
        """Close the host's cached connection. The caller holds ``slot.lock``."""
        if slot.connection is not None:
            slot.connection.close()
            slot.connection = None
            log.debug("ssh %s: dropped the connection: %s", host.name, why)

    def _new_connection(self, host: Host, target: _Target, deadline: float, stage: Stage) -> _Connection:
        trusted = self._trusted_keys(host, target, stage)
        pkey = self._private_key(host, target, stage)
        started = self._clock()
        where = f"{target.address}:{target.port}"
        remaining = self._remaining(deadline)
        if remaining <= 0:
            raise DriverTimeout(host.name, stage, f"no time left to connect to {where}")
        try:
            sock = self._connect(target.address, target.port, min(self._connect_timeout, remaining))
        except TimeoutError as exc:
            raise DriverTimeout(host.name, stage, f"cannot connect to {where}: timed out") from exc
        except OSError as exc:
            raise DriverError(host.name, stage, f"cannot connect to {where}: {_reason(exc)}") from exc
        client = self._client_factory()
        client.set_missing_host_key_policy(_RejectUnpinned())
        for key in trusted:
            client.get_host_keys().add(target.host_key_name, key.get_name(), key)
        handshake = max(min(self._handshake_timeout, self._remaining(deadline)), 0.001)
        try:
            client.connect(
                target.address,
                port=target.port,
                username=target.user,
                pkey=pkey,
                sock=sock,
                timeout=handshake,
                banner_timeout=handshake,
                auth_timeout=handshake,
                channel_timeout=handshake,
                allow_agent=False,
                look_for_keys=False,
            )
        except Exception as exc:
            client.close()
            sock.close()
            error = self._handshake_error(host, target, stage, pkey, trusted, exc, deadline)
            if error is None:
                raise
            raise error from exc
        except BaseException:
            client.close()
            sock.close()
            raise
        transport = client.get_transport()
        if transport is None:  # connect() returned, so paramiko set one; keep mypy and the reader sure
            client.close()
            sock.close()
            raise DriverError(host.name, stage, f"SSH connection to {where} has no transport")
        with self._lock:
            self.connects += 1
        log.debug(
            "ssh %s: connected to %s as %s in %.0f ms",
            host.name,
            where,
            target.user,
            (self._clock() - started) * 1000,
        )
        return _Connection(client, transport, sock)

    def _handshake_error(
        self,
        host: Host,
        target: _Target,
        stage: Stage,
        pkey: paramiko.PKey,
        trusted: list[paramiko.PKey],
        exc: Exception,
        deadline: float,
    ) -> DriverError | None:
        where = f"{target.address}:{target.port}"
        if isinstance(exc, paramiko.BadHostKeyException):
            pinned = ", ".join(describe_key(k) for k in trusted) or describe_key(exc.expected_key)
            return DriverError(
                host.name,
                stage,
                f"host key mismatch at {where}: it presented {describe_key(exc.key)}, pinned is {pinned}; "
                "if the host was reimaged, pin its new key from the deployment server, never from the host",
                retryable=False,
            )
        if isinstance(exc, _UnpinnedHostKey):
            return DriverError(
                host.name,
                stage,
                f"unknown host key at {where}: it presented {describe_key(exc.key)} and no key is pinned "
                f"for it ({self._key_sources(host, target)}); refusing to trust a key on first use",
                retryable=False,
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return DriverError(
                host.name,
                stage,
                f"login as {target.user!r} at {where} refused for the key in secret {target.key_secret!r} "
                f"({describe_key(pkey)}): {_reason(exc)}",
                retryable=False,
            )
        if isinstance(exc, TimeoutError) or self._clock() >= deadline:
            # paramiko reports most of its own timeouts as a plain SSHException ("Error reading SSH
            # protocol banner", "Authentication timeout.").
            return DriverTimeout(host.name, stage, f"SSH handshake with {where} timed out ({_reason(exc)})")
        if isinstance(exc, paramiko.SSHException | EOFError | OSError):
            return DriverError(host.name, stage, f"SSH handshake with {where} failed: {_reason(exc)}")
        return None

    def _key_sources(self, host: Host, target: _Target) -> str:
        ssh = host.ssh
        if ssh is not None and ssh.known_hosts:
            by_name = _known_hosts_name(host.name, target.port)
            return f"known_hosts {ssh.known_hosts} has no entry for {target.host_key_name} or {by_name}"
        return "no ssh.host_key or ssh.known_hosts in the inventory"

    # --- trust and credentials ---

    def _target(self, host: Host, stage: Stage) -> _Target:
        ssh = host.ssh
        if ssh is None:
            raise DriverError(host.name, stage, "the inventory gives no ssh settings", retryable=False)
        if not ssh.user or not ssh.key_secret:
            missing = "ssh.user" if not ssh.user else "ssh.key_secret"
            raise DriverError(host.name, stage, f"the inventory gives no {missing}", retryable=False)
        return _Target(host.address or host.name, ssh.port, ssh.user, ssh.key_secret)

    def _trusted_keys(self, host: Host, target: _Target, stage: Stage) -> list[paramiko.PKey]:
        """The keys the host may present: the re-pinned one, else the inventory's, else known_hosts."""
        with self._lock:
            pinned = self._pinned.get(host.name)
        if pinned is not None:
            return [pinned]
        ssh = host.ssh
        if ssh is None:
            return []
        if ssh.host_key:
            try:
                return [parse_host_key(ssh.host_key)]
            except ValueError as exc:
                raise DriverError(
                    host.name, stage, f"ssh.host_key in the inventory is unusable: {exc}", retryable=False
                ) from exc
        if ssh.known_hosts:
            known = self._load_known_hosts(host, ssh.known_hosts, stage)
            for name in (target.host_key_name, _known_hosts_name(host.name, target.port)):
                entry = known.lookup(name)
                if entry is not None:
                    return list(entry.values())
        return []

    def _load_known_hosts(self, host: Host, path: str, stage: Stage) -> paramiko.HostKeys:
        """Parsed once per file version: one file may hold every host of the estate."""
        try:
            info = os.stat(path)
            cache_key = (str(Path(path).resolve()), info.st_mtime_ns, info.st_size)
            with self._lock:
                cached = self._known_hosts.get(cache_key)
            if cached is not None:
                return cached
            known = paramiko.HostKeys(path)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise DriverError(
                host.name, stage, f"known_hosts file {path} is unreadable: {_reason(exc)}", retryable=False
            ) from exc
        with self._lock:
            self._known_hosts[cache_key] = known
        return known

    def _private_key(self, host: Host, target: _Target, stage: Stage) -> paramiko.PKey:
        try:
            secret = self._secrets.get(target.key_secret)
        except SecretNotFound as exc:
            raise DriverError(host.name, stage, str(exc), retryable=False) from exc
        try:
            return load_private_key(secret.get_secret_value())
        except Exception as exc:
            # Not chained: parser exceptions may carry the key's bytes (paramiko's UnknownKeyType does).
            raise DriverError(
                host.name,
                stage,
                f"secret {target.key_secret!r} does not hold an unencrypted ed25519, RSA or ECDSA "
                f"private key ({type(exc).__name__})",
                retryable=False,
            ) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, paramiko.ChannelException):
        return f"{exc.text} (code {exc.code})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
