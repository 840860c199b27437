"""Timeouts and unreachable hosts against real sshd: every failure comes back fast as a DriverError."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from restore_flows.drivers.base import DriverError, DriverTimeout
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell
from restore_flows.inventory.estate import Host
from tests.peers.sshd import (
    CLIENT_KEY_SECRET,
    UNPRIVILEGED_USER,
    SshdHost,
    ensure_unprivileged_user,
    require_peers,
    sshd_hosts,
    unavailable_reason,
    wait_until,
)

pytestmark = pytest.mark.slow


def on_port(host: Host, port: int) -> Host:
    assert host.ssh is not None
    return dataclasses.replace(host, ssh=host.ssh.model_copy(update={"port": port}))


def test_a_hanging_command_times_out_fast_and_the_connection_lives_on(
    shell: ParamikoShell, peer: SshdHost
) -> None:
    host = peer.inventory_host()
    started = time.monotonic()

    with pytest.raises(DriverTimeout) as caught:
        shell.run(host, "sleep 30", timeout=1)

    assert 1 <= time.monotonic() - started < 3
    assert caught.value.retryable
    assert "did not finish within 1 s" in str(caught.value)
    assert shell.run(host, "echo still", timeout=10).stdout == "still\n"
    assert shell.connects == 1
    # The kill request reached sshd, which will not signal a root session (see ParamikoShell's notes).
    wait_until(lambda: "session signalling requires privilege separation" in peer.log(), what="kill request")


@pytest.fixture
def unprivileged_peer(tmp_path: Path) -> Iterator[SshdHost]:
    require_peers(unavailable_reason())
    try:
        user = ensure_unprivileged_user()
    except (OSError, subprocess.CalledProcessError) as exc:
        require_peers(f"cannot create the account {UNPRIVILEGED_USER}: {exc}")
        raise
    with sshd_hosts(tmp_path / "sshd-unprivileged", 1, user=user) as hosts:
        yield hosts[0]


def test_a_timed_out_command_is_killed_on_the_host(unprivileged_peer: SshdHost) -> None:
    peer = unprivileged_peer
    marker = f"{30 + random.random():.6f}"  # this test's own `sleep` among the host's processes

    def sleeping() -> bool:
        return any(command == f"sleep {marker}" for command in peer.session_commands())

    with (
        ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: peer.client_key_text})) as shell,
        ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(shell.run, peer.inventory_host(), f"sleep {marker}", timeout=2)
        wait_until(sleeping, what="the command started")
        with pytest.raises(DriverTimeout):
            running.result()

        wait_until(lambda: not sleeping(), what="the timed-out command was killed")


def test_a_closed_port_is_a_clear_retryable_error(shell: ParamikoShell, peer: SshdHost) -> None:
    host = peer.inventory_host()
    peer.stop()
    started = time.monotonic()

    with pytest.raises(DriverError) as caught:
        shell.run(host, "echo hi", timeout=10)

    assert time.monotonic() - started < 2
    assert not isinstance(caught.value, DriverTimeout)
    assert caught.value.retryable
    assert f"cannot connect to {peer.address}:{peer.port}: connection refused" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_a_host_that_never_answers_the_handshake_times_out(shell: ParamikoShell, peer: SshdHost) -> None:
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nobody ever speaks SSH
        silent.bind((peer.address, 0))
        silent.listen()
        host = on_port(peer.inventory_host(), silent.getsockname()[1])
        started = time.monotonic()

        with pytest.raises(DriverTimeout) as caught:
            shell.run(host, "echo hi", timeout=1)

    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert "SSH handshake with" in str(caught.value)


def test_a_frozen_connection_times_out_and_is_replaced(shell: ParamikoShell, peer: SshdHost) -> None:
    host = peer.inventory_host()
    shell.run(host, "true", timeout=10)
    (connection_pid,) = [pid for pid, command in peer.session_processes() if command.startswith("sshd:")]
    os.kill(connection_pid, signal.SIGSTOP)  # the host hangs: its TCP stays up, nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(DriverTimeout) as caught:
            shell.run(host, "true", timeout=1)
        assert time.monotonic() - started < 3
        assert "did not open a session in time" in str(caught.value)
    finally:
        os.kill(connection_pid, signal.SIGKILL)

    assert shell.run(host, "echo fresh", timeout=10).stdout == "fresh\n"
    assert shell.connects == 2


def test_a_host_without_ssh_settings_is_refused_before_any_connection(
    shell: ParamikoShell, peer: SshdHost
) -> None:
    host = dataclasses.replace(peer.inventory_host(), ssh=None)

    with pytest.raises(DriverError, match="no ssh settings") as caught:
        shell.run(host, "echo hi", timeout=10)

    assert not caught.value.retryable
    assert peer.log().count("Connection from") == 0
